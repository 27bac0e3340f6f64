"""Chat messages → prompt text with the model's own Jinja2 chat template.

Renders exactly as transformers' `apply_chat_template` does (same sandboxed environment, filters,
globals and variables), because the model was fine-tuned on that exact text: a stray space or
newline changes the tokens and the answers.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from formats.errors import KilnError

# For models without a template (base models such as stories260K): plain role-prefixed turns, the
# format a base model is most likely to continue sensibly; it needs no special tokens.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; templates expect plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise KilnError(f"chat template: syntax error on line {e.lineno}: {e.message}") from None


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise KilnError(f"chat messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise KilnError(f"chat message #{i} must be a dict with a 'role' and 'content', got {m!r:.80}")
        # transformers fills `thinking` and `reasoning_content` from whichever reasoning field is set.
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        out.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
    return out


def apply_chat_template(messages: list[dict], template: str | None = None, *, add_generation_prompt: bool = True,
                        bos_token: str | None = None, eos_token: str | None = None, tools: list | None = None,
                        documents: list | None = None, **kwargs) -> str:
    """The prompt text for `messages` ({'role': 'system'|'user'|'assistant', 'content': str} dicts).

    `template` is the model's chat_template (None: FALLBACK_TEMPLATE); bos_token/eos_token are the
    token strings the template may print; extra kwargs (e.g. enable_thinking) reach the template.
    A template error (including the template's own raise_exception) is a KilnError."""
    compiled = _compile(template if template is not None else FALLBACK_TEMPLATE)
    special = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None}
    try:
        return compiled.render(messages=_check_messages(messages), tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **special, **kwargs)
    except jinja2.TemplateError as e:
        raise KilnError(f"chat template: {e.message if hasattr(e, 'message') else e}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise KilnError(f"chat template failed on these messages: {type(e).__name__}: {e}") from None
