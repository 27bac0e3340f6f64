"""What the chat and complete CLIs share: the engine and sampling flags (vLLM.rs names) and error exits."""

from __future__ import annotations

import inspect
import sys

import fire

from .engine import Engine, EngineConfig, parse_devices
from formats.errors import KilnError
from .sampling import SamplingParams


def engine_and_params(w: str = "artifacts/", d: int | str | tuple = 0, kvmem: float | None = None, max: int = 512,
                      temperature: float = 0.7, top_p: float = 1.0, top_k: int = -1, min_p: float = 0.0,
                      repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
                      presence_penalty: float = 0.0, seed: int | None = None, stop: str | None = None,
                      ignore_eos: bool = False,
                      max_num_seqs: int = 64, max_model_len: int | None = None) -> tuple[Engine, SamplingParams]:
    """--w artifact (or a folder of them: the newest), --d device number (0,1: tensor-parallel over devices
    0 and 1), --kvmem KV cache MB (or fraction of memory ≤ 1), --max tokens per answer, sampling:
    --temperature (0 = greedy) --top-p --top-k --min-p --repetition-penalty --frequency-penalty
    --presence-penalty --seed --stop STRING --ignore-eos, --max-num-seqs, --max-model-len."""
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                            presence_penalty=presence_penalty, seed=seed, max_tokens=max, stop=stop,
                            ignore_eos=ignore_eos)
    params.check()
    devices = parse_devices(d)
    engine = Engine(EngineConfig(model_path=w, device_id=devices[0], device_ids=devices if len(devices) > 1 else None,
                                 kvmem=kvmem, max_num_seqs=max_num_seqs, max_model_len=max_model_len))
    return engine, params


def check_flags(flags: dict) -> None:
    """Unknown flags are a user mistake, not a traceback."""
    try:
        inspect.signature(engine_and_params).bind(**flags)
    except TypeError:
        known = ", ".join("--" + n.replace("_", "-") for n in inspect.signature(engine_and_params).parameters)
        raise KilnError(f"unknown flag among {', '.join('--' + f for f in flags)}; known: {known}") from None


def run(main, name: str) -> None:
    """fire.Fire(main); a KilnError prints one line and exits 1."""
    try:
        fire.Fire(main, name=name)
    except KilnError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
