"""The `infer.py chat` loop (hardening issue, item 19): replies capped to the context's room, unknown
/commands answered with the list, Ctrl-C at the prompt asks before leaving, --speculative reports its
acceptance rate, control characters escaped on a terminal. The loop runs on a stand-in session (no model)
except in the last test, which drives the real command once."""
import builtins
import io
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import fixture_dir
from v4jax import chat, cli_chat
from v4jax.data import ByteTokenizer
from v4jax.sampling import SamplingConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import infer  # noqa: E402


class FakeSession:
    """What the loop uses of a ChatSession; `send` records the text and the max_new_tokens it got."""

    def __init__(self, max_context=4096, speculative=False, reply="ok"):
        self.engine = SimpleNamespace(max_context=max_context)
        self.mode, self.texts, self.messages, self.speculative = "chat", None, [], speculative
        self.sampling, self.sent, self.reply = None, [], reply
        self._tok = ByteTokenizer()

    def encode(self, text):
        return self._tok.encode(text)

    def send(self, text, on_text=None, should_stop=None):
        self.sent.append((text, self.sampling.max_new_tokens))
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": self.reply}]
        on_text(0, self.reply)
        return {"finish": "length", "tokens_per_s": 3.0, **({"acceptance": 0.5} if self.speculative else {})}

    def quick(self, task, url=None):
        return f"answer\x07 to {task}"


def _feed(*items, prompts=None):
    """An input() stand-in: strings are typed lines, exception classes are raised; then end of input."""
    items = list(items)

    def read(prompt=""):
        if prompts is not None:
            prompts.append(prompt)
        if not items:
            raise EOFError
        x = items.pop(0)
        if isinstance(x, type):
            raise x
        return x

    return read


def _run(session, *lines, max_new=100, prompts=None):
    return cli_chat.run(lambda: session, SamplingConfig(max_new_tokens=max_new), _feed(*lines, prompts=prompts))


def _used(text):
    return len(ByteTokenizer().encode(chat.render([{"role": "user", "content": text}])))


def test_unknown_commands_get_the_list_and_are_not_sent(capsys):
    s = FakeSession()
    assert _run(s, "/summary of this", "/help", "//etc/hosts is a file", "/title", "/exit", "never read") == 0
    cap = capsys.readouterr()
    assert "unknown command /summary; " + cli_chat.HELP in cap.err
    assert cap.err.count(cli_chat.HELP) == 3  # the banner, the unknown command, /help
    assert [t for t, _ in s.sent] == ["/etc/hosts is a file"]  # // sends a line starting with /
    assert "[title] answer\x07 to title" in cap.out  # not a terminal: as generated


def test_a_reply_is_capped_to_the_room_left(capsys):
    s = FakeSession(max_context=40)
    _run(s, "hi", max_new=100)
    room = 40 - _used("hi") - 2
    assert s.sent == [("hi", room)]
    note = f"[reply capped at {room} new tokens: {_used('hi')} of --max-context 40 are in use]"
    assert note in capsys.readouterr().err
    spec = FakeSession(max_context=40, speculative=True)  # a verify step may commit two tokens
    _run(spec, "hi", max_new=100)
    assert spec.sent == [("hi", room // 2)] and f"capped at {room // 2} " in capsys.readouterr().err
    small = FakeSession(max_context=40)
    _run(small, "hi", max_new=5)  # room enough: no note
    assert small.sent == [("hi", 5)] and "capped" not in capsys.readouterr().err


def test_a_message_that_fills_the_context_is_refused_and_the_conversation_kept(capsys):
    s = FakeSession(max_context=_used("x" * 50) + 2)
    _run(s, "x" * 50, "ok")
    err = capsys.readouterr().err
    assert "error: this message would fill the context" in err and "/reset" in err
    assert [t for t, _ in s.sent] == ["ok"]  # the shorter one still fits


def test_ctrl_c_at_the_prompt_asks_before_leaving(capsys):
    prompts = []
    s = FakeSession()
    assert _run(s, KeyboardInterrupt, "n", "hi", KeyboardInterrupt, "", "again", KeyboardInterrupt, "y",
                "never read", prompts=prompts) == 0
    assert [t for t, _ in s.sent] == ["hi", "again"]
    assert sum(p.strip().endswith(cli_chat.LEAVE_PROMPT.strip()) for p in prompts) == 3
    assert cli_chat.LEAVE_PROMPT == "leave? [y/N] "
    s2 = FakeSession()
    assert _run(s2, KeyboardInterrupt, KeyboardInterrupt, "never read") == 0  # Ctrl-C twice leaves
    assert s2.sent == []


def test_speculative_replies_report_the_acceptance_rate(capsys):
    _run(FakeSession(speculative=True), "hi")
    assert "[length, decode 3.0 tokens/s, MTP acceptance 0.50]" in capsys.readouterr().err
    assert cli_chat.speed({"tokens_per_s": -4e4}) == "no decode steps"  # --max-new-tokens 0
    assert cli_chat.speed({"tokens_per_s": 0.0, "acceptance": 0.0}, True) == "no decode steps, MTP acceptance 0.00"


def test_control_characters_are_escaped_on_a_terminal(monkeypatch):
    text = "a\tb\nc\x1b[2J\x07\r\x00\x7f\x9b é ✓"
    assert cli_chat.escape_controls(text) == "a\tb\nc\\x1b[2J\\x07\\x0d\\x00\\x7f\\x9b é ✓"

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, plain = Tty(), io.StringIO()
    cli_chat.stream_writer(tty)(0, text)
    cli_chat.stream_writer(plain)(0, text)
    assert tty.getvalue() == cli_chat.escape_controls(text) and plain.getvalue() == text
    monkeypatch.setattr(sys, "stdout", Tty())
    _run(FakeSession(reply="\x1b]0;pwned\x07done"), "hi", "/query")
    out = sys.stdout.getvalue()
    assert "\\x1b]0;pwned\\x07done" in out and "[query] answer\\x07 to query" in out and "\x1b" not in out


def test_chat_command_speculative_with_a_small_context(capsys, monkeypatch):
    """The real command once (tiny checkpoint, MTP speculative): an unknown command, then a reply capped
    to the context, the acceptance rate, and the session's tokens still what the decode state holds."""
    sessions = []

    class Keep(cli_chat.ReplSession):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            sessions.append(self)

    monkeypatch.setattr(cli_chat, "ReplSession", Keep)
    monkeypatch.setattr(builtins, "input", _feed("/nope", "hi", "/exit"))
    rc = infer.main(["chat", "--checkpoint", fixture_dir("tiny-a-bf16"), "--speculative", "--max-context", "64",
                     "--max-new-tokens", "100"])
    err = capsys.readouterr().err
    assert rc == 0, err
    room = (64 - _used("hi") - 2) // 2
    assert "unknown command /nope" in err and f"[reply capped at {room} new tokens" in err
    assert "MTP acceptance" in err and "Traceback" not in err
    s = sessions[-1]
    assert len(s.messages) == 2 and int(s.engine.pos[0]) == len(s.tokens)
    assert np.all(np.asarray(s.tokens[:_used("hi")]) == ByteTokenizer().encode(chat.render(s.messages[:1])))


@pytest.fixture(autouse=True)
def _no_real_sigint_handler_left():
    import signal
    before = signal.getsignal(signal.SIGINT)
    yield
    assert signal.getsignal(signal.SIGINT) == before
