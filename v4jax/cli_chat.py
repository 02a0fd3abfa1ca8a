"""The interactive loop of `infer.py chat`, and the terminal output `infer.py generate` shares with it.

* A reply is capped to the room the context has left (with a note); when there is none the message is
  refused and the conversation kept (`/reset` starts a new one).
* Lines starting with `/` are commands: the quick instructions (`/title`, `/query`, `/action`, `/domain`,
  `/authority`, `/read_url URL`), `/reset`, `/help`, `/exit`; an unknown one is answered with the list,
  never sent to the model. `//text` sends `/text`.
* Ctrl-C during a reply stops it; at the prompt it asks before leaving; Ctrl-D leaves.
* `--speculative` replies use MTP speculative decoding (greedy) and report the acceptance rate.
* Generated text written to a terminal has its control characters escaped (a model can emit any byte).
"""
from __future__ import annotations

import dataclasses
import re
import signal
import sys

from . import chat
from .serving import ChatSession

HELP = ("commands: /title /query /action /domain /authority /read_url URL (quick instructions), /reset, "
        "/help, /exit; //text sends a message starting with /")
LEAVE_PROMPT = "leave? [y/N] "
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 but \t and \n, DEL, C1


def escape_controls(text: str) -> str:
    """`text` with every terminal control character (C0 except tab and newline, DEL, C1) as a visible
    \\xNN escape, so generated text cannot move the cursor, retitle the window or change colours."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def stream_writer(stream):
    """A generate/send `on_text` callback: each piece to `stream` (flushed), escaped when it is a terminal."""
    tty = getattr(stream, "isatty", lambda: False)()

    def write(_, piece: str) -> None:
        stream.write(escape_controls(piece) if tty else piece)
        stream.flush()

    return write


def speed(res: dict, speculative: bool = False) -> str:
    """The decode rate of a generate / send result (no rate when no token came from a decode step)."""
    rate = f"decode {res['tokens_per_s']:.1f} tokens/s" if res["tokens_per_s"] > 0 else "no decode steps"
    return rate + (f", MTP acceptance {res['acceptance']:.2f}" if speculative and "acceptance" in res else "")


ReplSession = ChatSession  # the chat loop's session (speculative=True: MTP replies with their acceptance)


def reply_room(session: ChatSession, text: str) -> tuple[int, int]:
    """(prompt tokens with `text` as the next user message, new tokens the context has room for): the
    bound `serving.generate` enforces, prompt + new (x2 when speculative: a verify step may commit two)
    + 2 <= max_context."""
    msgs = session.messages + [{"role": "user", "content": text}]
    used = len(session.encode(chat.render(msgs, mode=session.mode, texts=session.texts)))
    per = 2 if getattr(session, "speculative", False) else 1
    return used, (session.engine.max_context - used - 2) // per


def read_line(input_fn=None) -> str | None:
    """The next line typed, or None to leave: at the end of the input, or on Ctrl-C confirmed with y.
    `input_fn` (default: the builtin input, looked up at each call) reads one line after a prompt."""
    input_fn = input_fn or input
    while True:
        try:
            return input_fn("> ")
        except EOFError:
            print(file=sys.stderr)
            return None
        except KeyboardInterrupt:
            try:
                answer = input_fn("\n" + LEAVE_PROMPT)
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return None
            if answer.strip().lower() in ("y", "yes"):
                return None


def reply(session: ChatSession, text: str, asked) -> None:
    """One user message -> the streamed reply and its one-line summary (stderr); `asked` is the
    SamplingConfig of the command line, its max_new_tokens capped to the room left."""
    used, room = reply_room(session, text)
    limit = session.engine.max_context
    if asked.max_new_tokens and room < 1:
        print(f"error: this message would fill the context ({used} of --max-context {limit} tokens): "
              "shorten it, or /reset to start a new conversation", file=sys.stderr)
        return
    n = max(0, min(asked.max_new_tokens, room))
    if n < asked.max_new_tokens:
        print(f"[reply capped at {n} new tokens: {used} of --max-context {limit} are in use]", file=sys.stderr)
    session.sampling = dataclasses.replace(asked, max_new_tokens=n)
    interrupted = []
    old = signal.signal(signal.SIGINT, lambda *_: interrupted.append(1))
    try:
        res = session.send(text, on_text=stream_writer(sys.stdout), should_stop=lambda: bool(interrupted))
    except ValueError as e:
        if session.messages and session.messages[-1] == {"role": "user", "content": text}:
            session.messages.pop()
        print(f"\nerror: {e}", file=sys.stderr)
        return
    finally:
        signal.signal(signal.SIGINT, old)
    print(f"\n[{res['finish']}, {speed(res, getattr(session, 'speculative', False))}]", file=sys.stderr)


def run(new_session, asked, input_fn=None) -> int:
    """The loop: `new_session()` -> a fresh ChatSession (at the start and on /reset)."""
    session = new_session()
    print(f"v4jax chat ({session.mode}). {HELP}. Ctrl-C stops a reply.", file=sys.stderr)
    while (line := read_line(input_fn)) is not None:
        cmd, _, rest = line.strip().partition(" ")
        if not cmd:
            continue
        if cmd.startswith("/") and not cmd.startswith("//"):
            if cmd in ("/exit", "/quit"):
                return 0
            if cmd == "/reset":
                session = new_session()
            elif cmd[1:] in chat.TASKS:
                try:
                    out = session.quick(cmd[1:], url=rest.strip() or None)
                    print(f"[{cmd[1:]}] " + (escape_controls(out) if sys.stdout.isatty() else out))
                except ValueError as e:
                    print(f"error: {e}", file=sys.stderr)
            else:
                print(("" if cmd == "/help" else f"unknown command {cmd}; ") + HELP, file=sys.stderr)
            continue
        reply(session, line.lstrip()[1:] if cmd.startswith("//") else line, asked)
    return 0
