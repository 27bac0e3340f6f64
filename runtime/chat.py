"""Interactive chat: history through the model's chat template, streamed answers, a stats line each.

    python -m runtime.chat --w artifacts/ [--system "You are terse."] [--temperature 0.7 --max 512 ...]

/reset clears the history, /quit (or Ctrl-D) leaves; Ctrl-C stops the answer being written.
"""

from __future__ import annotations

from .cli import check_flags, engine_and_params, run
from formats.errors import KilnError
from .request import Message

HELP = "/reset clears the history, /quit or Ctrl-D leaves, Ctrl-C stops an answer"


def main(w: str = "artifacts/", system: str | None = None, **flags):
    """Chat with the artifact at W. Flags: --system PROMPT, --d --kvmem --max --temperature --top-p
    --top-k --min-p --seed --stop, penalties (see runtime/cli.py)."""
    check_flags(flags)
    engine, params = engine_and_params(w, **flags)
    start = [Message("system", system)] if system else []
    history = list(start)
    print(f"kiln chat: {engine.runner.artifact.path.name} ({HELP})")
    while True:
        try:
            line = input("> ").strip()
        except KeyboardInterrupt:
            print()
            continue
        except EOFError:
            print()
            break
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history = list(start)
            print("(history cleared)")
            continue
        if not line:
            continue
        history.append(Message("user", line))
        stream, stopped = None, False
        try:
            stream = engine.generate_stream(params, engine.apply_chat_template(history, True))
            for piece in stream:
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            stopped = True
        except KilnError as e:
            history.pop()
            print(f"error: {e} (/reset clears the history)")
            continue
        if stream is None:
            history.pop()
            print("(stopped)")
            continue
        stream.cancel()
        out = stream.output
        history.append(Message("assistant", out.text))
        tokens, seconds = out.num_output_tokens, out.elapsed
        ttft = out.time_to_first_token
        print(f"\n[{tokens} tokens, {tokens / seconds:.1f} tokens/s, first token "
              f"{'-' if ttft is None else f'{ttft * 1000:.0f} ms'}{', stopped' if stopped else ''}]")


if __name__ == "__main__":
    run(main, "python -m runtime.chat")
