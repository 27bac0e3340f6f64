"""What the runtime CLIs share: the seed's flag names (long forms as aliases), their checks and --help
with defaults. A bad value is a KilnError; every CLI ends through formats.errors.exit_on_error (one line,
exit 1; Ctrl-C exits 130), never with a traceback.

    --w PATH       artifact, folder of artifacts, HF folder or .gguf (runtime/model_file.py)
    --d N          device number          --dtype bf16|f16|f32   --quant Q (model files)
    --kvmem MB     KV cache memory        --max N  tokens per answer (capped by the context)
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from formats.dtypes import canonical_dtype
from formats.errors import KilnError

DEFAULT_MAX_TOKENS = 4096
DEFAULT_KVMEM_MB = 4096


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """argparse's usage + exit 2 becomes the house style: a one-line error, exit 1."""
        raise KilnError(f"{message} (see {self.prog} --help)")


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    return _Parser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def _flag(group, names: list[str], **kwargs) -> None:
    """A flag under its seed name and long forms, each also with underscores (--top-p and --top_p)."""
    spelled = [n for name in names for n in dict.fromkeys([name, "--" + name[2:].replace("-", "_")])]
    group.add_argument(*spelled, **kwargs)


def number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False):
    """An argparse type: `kind` within [low, high] ((low, high] if low_open), else a one-line message."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if value != value or value in (math.inf, -math.inf):
            raise argparse.ArgumentTypeError(f"'{text}' is not {'an integer' if kind is int else 'a number'}")
        if low is not None and (value <= low if low_open else value < low) or high is not None and value > high:
            bound = f"{'>' if low_open else '>='} {low}" if high is None else \
                f"in {'(' if low_open else '['}{low}, {high}]"
            raise argparse.ArgumentTypeError(f"{text} must be {bound}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _dtype(text: str) -> str:
    try:
        return canonical_dtype(text)
    except KilnError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class Devices(list):
    """--d's device numbers; `kind` is the target named with them (cuda:1), which must be the artifact's."""

    def __init__(self, ids: list[int], kind: str | None = None):
        super().__init__(ids)
        self.kind = kind

    def check(self, target: str) -> None:
        if self.kind is not None and self.kind != target:
            raise KilnError(f"--d {self.kind}:{','.join(map(str, self))}: this artifact runs on {target}, not "
                            f"{self.kind} (pass --d {target}:N, or compile for {self.kind})")


def _devices(text: str) -> Devices:
    """'1' or 'cuda:1' → [1] (cuda: checked against the artifact's target); '0,1' → [0, 1], the devices of a
    tensor-parallel artifact (python -m compile --tp 2)."""
    kind, _, numbers = text.rpartition(":")
    if not all(n.strip().isdigit() for n in numbers.split(",")):
        raise argparse.ArgumentTypeError(f"'{text}' is not a device number (0, 1, ... or cuda:1) or a list (0,1)")
    return Devices([int(n) for n in numbers.split(",")], kind or None)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--w --d --dtype --quant --cache: which model, compiled how, on which device."""
    g = p.add_argument_group("model")
    _flag(g, ["--w", "--model", "--weight-path"], default="artifacts/", metavar="PATH",
          help="an artifact folder, a folder of artifacts (the newest that runs here), an HF model folder or a "
               ".gguf file (compiled on first use for this machine and cached)")
    _flag(g, ["--d", "--device"], type=_devices, default=Devices([0]), metavar="N",
          help="device number on the artifact's target; 0,1,...: a tensor-parallel artifact's devices")
    _flag(g, ["--dtype"], type=_dtype, default=None, help="activations and KV cache: bf16, f16 or f32; None: the "
          "artifact's, and for a model file bf16 on CUDA, f16 on Metal, f32 on the CPU")
    _flag(g, ["--quant"], default=None, help="weight quantization a model file is compiled with (python -m compile "
          "--quant)")
    _flag(g, ["--cache"], default=None, metavar="DIR", help="where compiled model files go; None: $KILN_CACHE or "
          "~/.cache/kiln/artifacts")


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """The model flags, plus the engine's memory and batch limits."""
    add_model_flags(p)
    g = p.add_argument_group("engine")
    _flag(g, ["--kvmem"], type=number(float, 0, low_open=True), default=DEFAULT_KVMEM_MB, metavar="MB",
          help="KV cache memory in MB (a value <= 1: that fraction of the device's memory)")
    _flag(g, ["--max-num-seqs"], type=number(int, 1), default=64, metavar="N", help="sequences per step")
    _flag(g, ["--max-model-len"], type=number(int, 1), default=None, metavar="N",
          help="tokens per sequence, prompt + output; None: the model's context, as far as --kvmem holds")
    _flag(g, ["--max-num-batched-tokens"], type=number(int, 1), default=2048, metavar="N",
          help="tokens per engine step (prompt chunks + one per decoding sequence)")
    _flag(g, ["--no-overlap"], action="store_true",
          help="read each step's tokens before launching the next (the overlapped loop's reference)")


def add_sampling_flags(p: argparse.ArgumentParser, temperature: float = 0.7) -> None:
    g = p.add_argument_group("sampling")
    _flag(g, ["--max", "--max-tokens"], type=number(int, 1), default=DEFAULT_MAX_TOKENS, metavar="N",
          help="tokens per answer (capped by the context, with a notice)")
    _flag(g, ["--temperature"], type=number(float, 0), default=temperature, help="0: greedy")
    _flag(g, ["--top-p"], type=number(float, 0, 1, low_open=True), default=1.0,
          help="sample from the most likely tokens holding this share of the probability")
    _flag(g, ["--top-k"], type=number(int), default=-1, help="-1: the whole vocabulary")
    _flag(g, ["--min-p"], type=number(float, 0, 1), default=0.0,
          help="drop tokens less likely than this fraction of the most likely one")
    _flag(g, ["--repetition-penalty"], type=number(float, 0, low_open=True), default=1.0,
          help="> 1 makes tokens of the prompt and answer so far less likely")
    _flag(g, ["--frequency-penalty"], type=number(float), default=0.0,
          help="subtracted from a token's logit once per time it was generated")
    _flag(g, ["--presence-penalty"], type=number(float), default=0.0,
          help="subtracted from the logit of every token generated at least once")
    _flag(g, ["--seed"], type=number(int, 0, 2 ** 63 - 1), default=None,
          help="makes sampling reproducible; None: fresh randomness")
    _flag(g, ["--stop"], default=None, metavar="TEXT", help="stop when the answer contains TEXT")
    _flag(g, ["--ignore-eos"], action="store_true", help="keep going past end-of-sequence tokens")


def use_cache_flag(args: argparse.Namespace) -> None:
    """--cache reaches runtime/model_file.py's cache through $KILN_CACHE (also seen by what this process starts)."""
    if args.cache:
        os.environ["KILN_CACHE"] = args.cache


def engine_config(args: argparse.Namespace):
    """EngineConfig from the parsed engine flags."""
    from .engine import EngineConfig

    use_cache_flag(args)
    return EngineConfig(model_path=args.w, device_id=args.d[0], device_ids=args.d if len(args.d) > 1 else None,
                        dtype=args.dtype, quant=args.quant, kvmem=args.kvmem,
                        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                        max_num_batched_tokens=args.max_num_batched_tokens, overlap=False if args.no_overlap else None)


def engine_and_params(args: argparse.Namespace):
    """(Engine, SamplingParams) from the parsed flags; --max above the context is capped with a notice."""
    from .engine import Engine
    from .sampling import SamplingParams

    engine = Engine(engine_config(args))
    args.d.check(engine.runner.artifact.target)
    max_tokens = args.max
    if max_tokens > engine.max_model_len:
        max_tokens = engine.max_model_len
        print(f"kiln: --max {args.max} capped at {max_tokens} tokens ({engine.limit_hint})", file=sys.stderr)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                            presence_penalty=args.presence_penalty, seed=args.seed, max_tokens=max_tokens,
                            stop=args.stop, ignore_eos=args.ignore_eos)
    params.check()
    return engine, params

