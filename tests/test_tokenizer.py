"""Tokenizer parity on real vocabularies (llama.cpp's test vectors, HF/SentencePiece references) and
streaming detokenization; tokenizers rebuilt from GGUF metadata must match the originals."""

import gzip
import json
from pathlib import Path

import pytest

from conftest import DATA, STORIES_EXPECTED, STORIES_HF

from formats.errors import KilnError
from runtime.tokenizer import IncrementalDetokenizer, Tokenizer

VOCAB = DATA / "llama.cpp-vocab"
TOKS = DATA / "tokenizers"
EXPECTED = STORIES_EXPECTED

def llama_cpp_rows(name):
    texts = (VOCAB / f"ggml-vocab-{name}.gguf.inp").read_text().split("\n__ggml_vocab_test__\n")
    ids = (VOCAB / f"ggml-vocab-{name}.gguf.out").read_text().split("\n")
    assert len(texts) == len(ids) == 47
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, ids)]

def jsonl_rows(path):
    return [(r["text"], r["ids"]) for r in map(json.loads, path.read_text().splitlines())]

@pytest.fixture(scope="module")
def unpacked(tmp_path_factory):
    """The gzipped files (tokenizer.json of qwen3, llama3, mistral-v1; llama.cpp's BPE vocab GGUF) unpacked once."""
    root = tmp_path_factory.mktemp("tok")
    for name in ("qwen3", "llama3", "mistral-v1"):
        (root / name).mkdir()
        (root / name / "tokenizer.json").write_bytes(gzip.decompress((TOKS / name / "tokenizer.json.gz").read_bytes()))
        for extra in ("tokenizer_config.json", "tokenizer.model"):
            if (TOKS / name / extra).is_file():
                (root / name / extra).write_bytes((TOKS / name / extra).read_bytes())
    (root / "ggml-vocab-llama-bpe.gguf").write_bytes(gzip.decompress((VOCAB / "ggml-vocab-llama-bpe.gguf.gz").read_bytes()))
    return root

def assert_parity(tok, rows):
    """Every row encodes to its ids; streaming its ids concatenates to the full decode, never broken UTF-8."""
    wrong = [(text, tok.encode(text, add_special_tokens=False), ids) for text, ids in rows
             if tok.encode(text, add_special_tokens=False) != ids]
    assert not wrong, f"{len(wrong)}/{len(rows)} rows differ, first: {wrong[0]}"
    for text, ids in rows:
        full = tok.decode(ids)
        stream = IncrementalDetokenizer(tok)
        pieces = [stream.add(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == full, text
        if "\ufffd" not in full:
            assert not any("\ufffd" in p for p in pieces), text

@pytest.mark.parametrize("name", ["llama-bpe", "llama-spm"])
def test_llama_cpp_vocab_gguf(name, unpacked):
    """47/47 of llama.cpp's own test-tokenizer-0 vectors with the tokenizer built from the vocab GGUF."""
    folder = unpacked if name == "llama-bpe" else VOCAB
    assert_parity(Tokenizer(folder / f"ggml-vocab-{name}.gguf"), llama_cpp_rows(name))

@pytest.mark.parametrize("name", ["qwen3", "llama3", "mistral-v1", "llama2"])
def test_real_tokenizers(name, unpacked):
    """tokenizer.json (qwen3, llama3, mistral) or SentencePiece tokenizer.model (llama2) vs. the reference ids."""
    folder = unpacked / name if name != "llama2" else TOKS / name
    assert_parity(Tokenizer(folder), jsonl_rows(TOKS / name / "vectors.jsonl"))

def test_mistral_tokenizer_model_directly():
    assert_parity(Tokenizer(TOKS / "mistral-v1" / "tokenizer.model"), jsonl_rows(TOKS / "mistral-v1" / "vectors.jsonl"))

@pytest.mark.parametrize("form", ["hf", "gguf/stories260K-f32.gguf", "gguf/stories260K-q4_0.gguf"])
def test_stories260k_tok512(form):
    tok = Tokenizer(STORIES_HF if form == "hf" else DATA / "stories260K" / form)
    assert_parity(tok, jsonl_rows(DATA / "stories260K" / "tok512_vectors.jsonl"))
    assert tok.encode("Once upon a time") == EXPECTED["greedy_once_upon_a_time"]["prompt_ids"]
    assert (tok.bos_token_id, tok.eos_token_ids) == (1, {2})

def _gguf_vocab(path, hf_tokenizer_json: dict, pre: str, bos: str, eos: str, eot: str, chat_template: str):
    """A vocab-only GGUF in the layout llama.cpp's convert_hf_to_gguf writes for a byte-level BPE tokenizer.json."""
    import gguf
    model = hf_tokenizer_json["model"]
    added = {t["id"]: t for t in hf_tokenizer_json["added_tokens"]}
    size = max(list(model["vocab"].values()) + list(added)) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in model["vocab"].items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for i, t in added.items():
        tokens[i], types[i] = t["content"], gguf.TokenType.CONTROL if t["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index(bos))
    w.add_eos_token_id(tokens.index(eos))
    w.add_eot_token_id(tokens.index(eot))
    w.add_add_bos_token(False)
    w.add_chat_template(chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path

@pytest.mark.parametrize("name,pre,bos,eos,eot", [
    ("qwen3", "qwen2", "<|endoftext|>", "<|im_end|>", "<|im_end|>"),
    ("llama3", "llama-bpe", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")])
def test_bpe_tokenizer_rebuilt_from_gguf_metadata(name, pre, bos, eos, eot, unpacked, tmp_path):
    """The real Qwen3 / Llama 3 vocabularies and chat templates written to GGUF as llama.cpp does,
    read back by us: same ids, stop tokens, and chat prompt as transformers renders it."""
    hf = json.loads((unpacked / name / "tokenizer.json").read_text())
    template = json.loads((unpacked / name / "tokenizer_config.json").read_text())["chat_template"]
    path = _gguf_vocab(tmp_path / f"{name}.gguf", hf, pre, bos, eos, eot, template)
    tok = Tokenizer(path)
    assert_parity(tok, jsonl_rows(TOKS / name / "vectors.jsonl"))
    assert tok.eos_token_ids == {tok.hf.token_to_id(eos), tok.hf.token_to_id(eot)}
    assert tok.bos_token_id == tok.hf.token_to_id(bos)
    from transformers.utils.chat_template_utils import render_jinja_template as render
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    expected = render(conversations=[messages], chat_template=template, add_generation_prompt=True,
                      bos_token=bos, eos_token=eos)[0][0]
    assert tok.apply_chat_template(messages) == expected

def test_gguf_write_tokenizer_round_trip(tmp_path):
    """GGUFSource.write_tokenizer's folder loads back to the same tokenizer (what an artifact ships)."""
    from formats.gguf import GGUFSource
    GGUFSource(DATA / "stories260K" / "gguf" / "stories260K-q8_0.gguf").write_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("<s>", "</s>", True)
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    assert_parity(Tokenizer(tmp_path), jsonl_rows(DATA / "stories260K" / "tok512_vectors.jsonl"))
    assert Tokenizer(tmp_path).encode("Hello")[0] == 1

def test_streaming_holds_back_split_characters():
    """Byte-fallback pieces of one character come out together, once complete."""
    tok = Tokenizer(TOKS / "llama2")
    ids = tok.encode("a🍎b", add_special_tokens=False)
    stream = IncrementalDetokenizer(tok)
    pieces = [stream.add(i) for i in ids]
    assert "".join(pieces) == "a🍎b" and "🍎" in pieces and len(ids) > 3

def test_missing_tokenizer_is_a_kiln_error(tmp_path):
    with pytest.raises(KilnError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\xff\xff\xff")
    with pytest.raises(KilnError, match="corrupt protobuf"):
        Tokenizer(tmp_path)

@pytest.mark.parametrize("meta,message", [
    ({"tokenizer.ggml.merges": ["a c"]}, "does not make a tokenizer"),
    ({"tokenizer.ggml.merges": ["ab"]}, "not two tokens"),
    ({"tokenizer.ggml.pre": "jais"}, "tokenizer.ggml.pre = 'jais' is not supported"),
    ({"tokenizer.ggml.model": "t5"}, "'t5' is not supported"),
    ({"tokenizer.ggml.tokens": ["a", 3]}, "tokenizer.ggml.tokens is not an array of str"),
    ({"tokenizer.ggml.eos_token_id": 7}, "eos_token_id = 7 is outside the 3-token vocabulary"),
])
def test_bad_gguf_vocabulary(meta, message):
    from formats.vocab import gguf_tokenizer_files
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
            "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(KilnError, match=message.replace("(", r"\(").replace("[", r"\[")):
        gguf_tokenizer_files(base | meta, "x.gguf")
    assert gguf_tokenizer_files(base, "x.gguf")[0].encode("abab").ids == [2, 2]

def _tokenize_cli(*args):
    import os
    import subprocess
    import sys
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "runtime.tokenize", *args], cwd=repo, env=env,
                          capture_output=True, text=True)

def test_tokenize_cli():
    gguf_file = str(DATA / "stories260K" / "gguf" / "stories260K-q4_0.gguf")
    ref = EXPECTED["greedy_once_upon_a_time"]
    out = _tokenize_cli("--model", gguf_file, ref["prompt"])
    assert out.stdout.split() == [str(i) for i in ref["prompt_ids"]]
    out = _tokenize_cli("--model", gguf_file, "--ids", ",".join(map(str, ref["prompt_ids"])))
    assert out.stdout == "<s> " + ref["prompt"] + "\n"
    bad = _tokenize_cli("--model", gguf_file, "--ids", "7 100000")
    assert bad.returncode == 1 and bad.stderr.startswith("error: --ids needs token ids between 0 and 511")


def test_tokenize_cli_on_a_folder_of_artifacts(stories_artifact, tmp_path):
    import shutil
    shutil.copytree(stories_artifact, tmp_path / "stories260k-float32-cpu")
    ref = EXPECTED["greedy_once_upon_a_time"]
    out = _tokenize_cli("--model", str(tmp_path), ref["prompt"])
    assert out.stdout.split() == [str(i) for i in ref["prompt_ids"]], out.stderr
