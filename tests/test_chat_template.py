"""Chat templates render exactly as transformers' apply_chat_template (Qwen3, Llama 3, Mistral v0.1)."""

import json
from pathlib import Path

import pytest

from runtime.chat_template import apply_chat_template
from formats.errors import KilnError

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
SYSTEM = {"role": "system", "content": "You are terse. Answer in one line."}
TURNS = [
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello. How can I help?"},
    {"role": "user", "content": "  Name three colours, then say \"done\".\nÄpfel? 🍎"},
]
CONVERSATIONS = {"one-turn": TURNS[:1], "multi-turn": TURNS, "system+multi-turn": [SYSTEM] + TURNS,
                 "system+one-turn": [SYSTEM] + TURNS[:1]}


def _reference(template, messages, **kwargs):
    from transformers.utils.chat_template_utils import render_jinja_template as render
    rendered, _ = render(conversations=[messages], chat_template=template, **kwargs)
    return rendered[0]


@pytest.mark.parametrize("model", ["qwen3", "llama3", "mistral-v1"])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(model, conversation, add_generation_prompt):
    cfg = json.loads((TEMPLATES / f"{model}.json").read_text())
    specials = {"bos_token": cfg["bos_token"], "eos_token": cfg["eos_token"]}
    messages = CONVERSATIONS[conversation]
    expected = _reference(cfg["chat_template"], messages, add_generation_prompt=add_generation_prompt, **specials)
    got = apply_chat_template(messages, cfg["chat_template"], add_generation_prompt=add_generation_prompt, **specials)
    assert got == expected
    assert TURNS[0]["content"] in got


def test_qwen3_template_kwargs_and_reasoning():
    """enable_thinking reaches the template; reasoning_content of an earlier turn is handled as transformers does."""
    template = json.loads((TEMPLATES / "qwen3.json").read_text())["chat_template"]
    messages = [TURNS[0], {**TURNS[1], "reasoning_content": "The user greets me."}, TURNS[2],
                {"role": "assistant", "content": "Red, green, blue. done", "reasoning_content": "Pick three."}]
    for kwargs in ({"enable_thinking": False}, {}):
        assert apply_chat_template(messages, template, add_generation_prompt=False, **kwargs) == \
            _reference(template, messages, add_generation_prompt=False, **kwargs)


def test_template_errors_are_kiln_errors():
    mistral = json.loads((TEMPLATES / "mistral-v1.json").read_text())["chat_template"]
    with pytest.raises(KilnError, match="alternate user/assistant"):
        apply_chat_template([TURNS[0], TURNS[0]], mistral, bos_token="<s>", eos_token="</s>")
    with pytest.raises(KilnError, match="syntax error on line 1"):
        apply_chat_template(TURNS, "{% for m in messages %}")
    with pytest.raises(KilnError, match="chat message #0"):
        apply_chat_template(["hello"], mistral)


def test_fallback_without_template():
    assert apply_chat_template([SYSTEM] + TURNS[:2]) == (
        f"System: {SYSTEM['content']}\n\nUser: Hi there!\n\nAssistant: Hello. How can I help?\n\nAssistant:")


def test_tokenizer_finds_the_template(tmp_path):
    """tokenizer_config.json's template (string or named list) and chat_template.jinja, which wins."""
    from runtime.tokenizer import Tokenizer
    stories = Path(__file__).resolve().parents[1] / "model_defs" / "stories260K"
    cfg = json.loads((TEMPLATES / "mistral-v1.json").read_text())
    (tmp_path / "tokenizer.json").write_bytes((stories / "tokenizer.json").read_bytes())
    named = [{"name": "default", "template": cfg["chat_template"]}, {"name": "tool_use", "template": "x"}]
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": named}))
    tok = Tokenizer(tmp_path)
    assert tok.apply_chat_template(TURNS) == apply_chat_template(TURNS, cfg["chat_template"], bos_token="<s>",
                                                                 eos_token="</s>")
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    assert Tokenizer(tmp_path).apply_chat_template(TURNS) == "<s>Hi there!"
