"""Interactive chat: history through the model's chat template, streamed answers, a stats line each.

    python -m runtime.chat --i --w model.gguf [--system "You are terse."] [--temperature 0.7 --max 4096 ...]

Line editing and history (readline: arrows, Ctrl-R), multi-line input (a paste, or a line ending in a
backslash continues), and commands: /help, /reset, /think (Qwen3's thinking on/off), /quit.
"""

from __future__ import annotations

import sys

from .cli import add_engine_flags, add_sampling_flags, engine_and_params, parser
from formats.errors import KilnError, exit_on_error
from .request import Message

COMMANDS = """/help    this list
/reset   forget the conversation (the system prompt stays)
/think   switch thinking on or off (models whose chat template reads enable_thinking, e.g. Qwen3)
/quit    leave (or Ctrl-D)
Ctrl-C stops an answer; a line ending in \\ continues on the next line; a paste may span lines."""


def _enable_line_editing() -> None:
    """readline gives input() arrow keys, history and Ctrl-R; missing on some platforms (then plain input)."""
    try:
        import readline  # noqa: F401  (importing it is what switches input() over)
    except ImportError:
        pass


def _pending_input(timeout: float = 0.05) -> bool:
    """Whether more typed or pasted text is already waiting: the rest of a multi-line paste."""
    import select

    try:
        return bool(select.select([sys.stdin], [], [], timeout)[0])
    except (OSError, ValueError):
        return False


def read_message(prompt: str = "> ") -> str:
    """One user turn: a line, continued while it ends in a backslash or while a paste is still arriving."""
    lines = [input(prompt)]
    while True:
        if lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(input("... "))
        elif _pending_input():
            lines.append(input())
        else:
            return "\n".join(lines).strip()


def answer(engine, params, history: list[Message], thinking: bool | None) -> tuple[str, str] | None:
    """Stream one answer to the terminal; (text, stats line), or None if it failed before starting."""
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    stream, stopped = None, False
    try:
        prompt = engine.apply_chat_template(history, True, **kwargs)
        stream = engine.generate_stream(params, prompt)
        for piece in stream:
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        stopped = True
    except KilnError as e:
        print(f"error: {e} (/reset clears the history)")
        return None
    if stream is None:
        return None
    stream.cancel()
    out = stream.output
    tokens, seconds, ttft = out.num_output_tokens, out.elapsed, out.time_to_first_token
    stats = (f"[{tokens} tokens, {tokens / max(seconds, 1e-9):.1f} tokens/s, first token "
             f"{'-' if ttft is None else f'{ttft * 1000:.0f} ms'}{', stopped' if stopped else ''}]")
    return out.text, stats


def chat(engine, params, system: str | None) -> None:
    start = [Message("system", system)] if system else []
    history = list(start)
    thinking: bool | None = None  # None: the template's own default
    print(f"kiln chat: {engine.runner.artifact.path.name} (/help for commands, /quit or Ctrl-D to leave)")
    while True:
        try:
            line = read_message()
        except KeyboardInterrupt:
            print()
            continue
        except EOFError:
            print()
            return
        if line in ("/quit", "/exit"):
            return
        if line == "/help":
            print(COMMANDS)
        elif line == "/reset":
            history = list(start)
            print("(history cleared)")
        elif line == "/think":
            thinking = not (thinking is None or thinking)
            print(f"(thinking {'on' if thinking else 'off'})")
        elif line.startswith("/") and " " not in line:
            print(f"unknown command {line}; /help lists them")
        elif line:
            history.append(Message("user", line))
            result = answer(engine, params, history, thinking)
            if result is None:
                history.pop()
                continue
            text, stats = result
            history.append(Message("assistant", text))
            print(f"\n{stats}")


def main(argv: list[str] | None = None) -> None:
    p = parser("python -m runtime.chat", "Chat with a model in the terminal.")
    p.add_argument("--i", "--interactive", action="store_true", help="interactive mode (the seed's flag; chat "
                   "always is)")
    p.add_argument("--system", default=None, metavar="TEXT", help="system prompt")
    add_engine_flags(p)
    add_sampling_flags(p)
    args = p.parse_args(argv)
    _enable_line_editing()
    engine, params = engine_and_params(args)
    with engine:  # the engine thread stops between steps before the process ends
        chat(engine, params, args.system)


if __name__ == "__main__":
    exit_on_error(main)
