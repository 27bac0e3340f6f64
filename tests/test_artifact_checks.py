"""Damaged artifacts (stories260K's, edited): every one is a one-line KilnError naming the file and
field at load, or, when the edit is harmless, an artifact that loads and runs. Never a traceback or
a crash (the accepted ones run in a child process, so a crash would show as its exit status).

Crafted cases are the issue's (vocab_size beyond the embedding: was SIGSEGV; page_size 0: was
SIGFPE) and their kin; the fuzz mutates kiln.yaml fields, params.json and the shards' bytes with a
fixed seed and a bounded budget.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from formats.errors import KilnError
from runtime.artifact import Artifact

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def copy(stories_artifact, tmp_path):
    """A fresh copy of the artifact to damage (the library is linked, not copied)."""
    out = tmp_path / "art"
    shutil.copytree(stories_artifact, out, ignore=shutil.ignore_patterns("model.so"))
    (out / "model.so").symlink_to(stories_artifact / "model.so")
    return out


def edit_yaml(art: Path, change) -> None:
    manifest = yaml.safe_load((art / "kiln.yaml").read_text())
    change(manifest)
    (art / "kiln.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))


def edit_params(art: Path, change) -> None:
    params = json.loads((art / "params.json").read_text())
    change(params)
    (art / "params.json").write_text(json.dumps(params))


def set_path(manifest: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        manifest = manifest[p]
    if value is _DELETE:
        manifest.pop(last, None)
    else:
        manifest[last] = value


class _Deleted:
    """The field is removed; its repr names the test case the same way in every process (pytest-xdist
    requires its workers to collect the same test IDs; object()'s repr holds an address)."""

    def __repr__(self) -> str:
        return "<deleted>"


_DELETE = _Deleted()
CRAFTED = [  # (kiln.yaml field, value, words of the error)
    ("config.vocab_size", 100000, "vocab_size is 100000 but model.embed_tokens.weight has 512 rows"),
    ("config.vocab_size", 0, "vocab_size"),
    ("config.hidden_size", 64.0, "hidden_size is 64.0"),
    ("config.hidden_size", 128, "hidden_size is 128 but the embedding"),
    ("config.num_hidden_layers", 6, "num_hidden_layers is 6 but the weights hold layers 0..4"),
    ("config.num_attention_heads", 3, "not a multiple"),
    ("config.num_key_value_heads", -4, "num_key_value_heads"),
    ("config", [1, 2], "config is list"),
    ("page_size", 0, "page_size is 0"),
    ("page_size", -16, "page_size"),
    ("page_size", "16", "page_size is '16'"),
    ("page_size", 2 ** 40, "page_size"),
    ("context_length", 0, "context_length"),
    ("prefill_chunk", True, "prefill_chunk"),
    ("max_batch", _DELETE, "max_batch is None"),
    ("dtype", "float8", "dtype is 'float8'"),
    ("target", "tpu", "target is 'tpu'"),
    ("library", "../../etc/passwd", "library"),
    ("weights", "/etc", "weights"),
    ("content_hash", "xyz", "content_hash"),
    ("tvm_version", _DELETE, "tvm_version"),
]


@pytest.mark.parametrize("field, value, words", CRAFTED, ids=[f"{c[0]}={c[1]!r}"[:40] for c in CRAFTED])
def test_crafted_kiln_yaml(copy, field, value, words):
    edit_yaml(copy, lambda m: set_path(m, field, value))
    with pytest.raises(KilnError, match="kiln.yaml") as e:
        Artifact.open(copy)
    assert words in str(e.value) and "\n" not in str(e.value) and "make compile" in str(e.value)


def test_other_tvm_version_is_refused_before_loading(copy):
    from runtime.model_runner import ModelRunner

    edit_yaml(copy, lambda m: m.update(tvm_version="0.19.0"))
    with pytest.raises(KilnError, match=r"compiled with TVM 0\.19\.0, but this is TVM 0\.27.*make compile"):
        ModelRunner(copy)


def _first(params):
    return params[0]


PARAMS = [  # (change to params.json, words)
    (lambda p: _first(p).update(shape=[512, 32]), "F32 [512, 64], but params.json says F32 [512, 32]"),
    (lambda p: _first(p).update(dtype="float16"), "but params.json says F16"),
    (lambda p: _first(p).update(shape=[512, 0]), "shape of positive integers"),
    (lambda p: _first(p).update(shape=[512, 64.0]), "shape of positive integers"),
    (lambda p: _first(p).update(name="model.nothing"), "no tensor model.nothing"),
    (lambda p: p.append(dict(p[1])), "listed twice"),
    (lambda p: p.clear(), "non-empty list"),
]


@pytest.mark.parametrize("change, words", PARAMS, ids=[w[:30] for _, w in PARAMS])
def test_params_json_against_the_shards(copy, change, words):
    edit_params(copy, change)
    with pytest.raises(KilnError) as e:
        Artifact.open(copy)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_shards_damaged(copy):
    shard = copy / "weights" / "params-00000.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    with pytest.raises(KilnError, match="truncated"):
        Artifact.open(copy)
    shard.write_bytes(data)
    (copy / "weights" / "index.json").write_text('{"shards": ["../kiln.yaml"]}')
    with pytest.raises(KilnError, match="file names"):
        Artifact.open(copy)
    (copy / "weights" / "index.json").write_text('{"shards": ["gone.safetensors"]}')
    with pytest.raises(KilnError, match="no such safetensors file"):
        Artifact.open(copy)


# ---- fuzz: random damage, a fixed seed, a bounded budget
ABSURD = [0, -1, 1.5, 2 ** 63, "x", None, [], {}, True, "16", 1e308]
FIELDS = ["page_size", "context_length", "prefill_chunk", "max_batch", "dtype", "target", "library", "weights",
          "tvm_version", "content_hash", "config", "config.vocab_size", "config.hidden_size",
          "config.num_hidden_layers", "config.num_attention_heads", "config.num_key_value_heads", "config.head_dim",
          "config.intermediate_size"]


def damage(art: Path, rnd: random.Random) -> str:
    """One random edit of the artifact; returns what it did."""
    kind = rnd.randrange(4)
    if kind == 0:
        field, value = rnd.choice(FIELDS), rnd.choice(ABSURD)
        edit_yaml(art, lambda m: set_path(m, field, value))
        return f"kiln.yaml {field}={value!r}"
    target = rnd.choice([art / "kiln.yaml", art / "params.json", art / "weights" / "index.json",
                         art / "weights" / "params-00000.safetensors"])
    data = bytearray(target.read_bytes())
    head = min(len(data), 4096 if target.suffix == ".safetensors" else len(data))  # the header, not the numbers
    if kind == 1:  # truncate
        cut = rnd.randrange(len(data))
        target.write_bytes(bytes(data[:cut]))
        return f"{target.name} cut at {cut}"
    if kind == 2:  # flip bytes in the header
        for _ in range(rnd.randint(1, 4)):
            data[rnd.randrange(head)] = rnd.randrange(256)
        target.write_bytes(bytes(data))
        return f"{target.name} bytes flipped"
    i = rnd.randrange(head)  # overwrite a digit run with another number
    data[i:i + 1] = str(rnd.choice([0, 9, 99999, 2 ** 31])).encode()
    target.write_bytes(bytes(data))
    return f"{target.name} number at {i}"


RUN_ACCEPTED = """
import sys
from formats.errors import KilnError
from runtime.model_runner import ModelRunner
for path in sys.argv[1:]:
    try:
        runner = ModelRunner(path, max_batch=2, kv_tokens=256)
    except KilnError as e:  # found once loading (e.g. the TVM version): still one clean line
        assert "\\n" not in str(e)
        print("ran", path, "refused:", e, flush=True)
        continue
    runner.add_sequence(0)
    logits = runner.forward([0], [[1, runner.vocab_size - 1, 2]])
    assert logits.shape == (1, runner.vocab_size)
    print("ran", path, flush=True)
"""


def test_fuzz_artifacts(stories_artifact, tmp_path):
    rnd = random.Random(1234)
    outcomes, accepted = [], []
    for i in range(80):
        art = tmp_path / f"a{i}"
        shutil.copytree(stories_artifact, art, ignore=shutil.ignore_patterns("model.so"))
        (art / "model.so").symlink_to(stories_artifact / "model.so")
        what = damage(art, rnd)
        try:
            Artifact.open(art)
        except KilnError as e:
            assert "\n" not in str(e) and str(art) in str(e), (what, str(e))
            outcomes.append("error")
        else:
            accepted.append(str(art))
            outcomes.append("accepted")
        # anything else (a traceback) fails the test here, naming `what` in pytest's report
    print(f"80 damaged artifacts: {outcomes.count('error')} one-line errors at open, {len(accepted)} accepted")
    assert outcomes.count("error") >= 60, outcomes
    if accepted:  # harmless edits: they must load and run, in a child so that a crash is seen as one
        r = subprocess.run([sys.executable, "-c", RUN_ACCEPTED, *accepted], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0 and r.stdout.count("ran ") == len(accepted), r.stderr[-2000:]


def test_tokenizer_ids_beyond_the_embedding_fail_only_their_request(copy):
    """A tokenizer.json with an added token past the embedding's 512 rows: that prompt is refused at submission,
    the others run (the step would otherwise fail every request in flight)."""
    from runtime import Engine, EngineConfig, SamplingParams

    tok = json.loads((copy / "tokenizer.json").read_text())
    tok["added_tokens"].append({"id": 600, "content": "<zap>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": False})
    (copy / "tokenizer.json").write_text(json.dumps(tok))
    with Engine(EngineConfig(model_path=str(copy), max_num_seqs=4)) as engine:
        bad, good = engine.generate_sync(SamplingParams(temperature=0, max_tokens=4), ["Once <zap>", "Once upon"])
    assert bad.finish_reason == "error" and "beyond the model's vocabulary (size 512)" in bad.error
    assert int(bad.error.split("token id ")[1].split(",")[0]) >= 512  # tokenizers renumbers it to the next free id
    assert good.finish_reason == "length" and len(good.token_ids) == 4
