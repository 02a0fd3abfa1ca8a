"""`infer.py --help` and every subcommand's --help: each option has a description, and each option with a
default states it (hardening issue, item 18)."""
import argparse
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import infer  # noqa: E402

COMMANDS = ("score", "generate", "chat", "kv-report", "compile", "render", "eval", "serve")


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        infer.main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _options(text: str) -> dict[str, str]:
    """{option line's first flag: its description} from the "options:" section of an argparse help text."""
    section = text.split("\noptions:\n", 1)[1]
    out, flag = {}, None
    for line in section.splitlines():
        m = re.match(r"^  (-\S.*?)(?:  +(\S.*))?$", line)  # "  -x, --xx XX   description"
        if m:
            flag = re.split(r"[ ,]", m.group(1))[0]
            out[flag] = m.group(2) or ""
        elif flag and re.match(r"^ {6,}\S", line):  # the description, or its continuation, on its own line
            out[flag] = (out[flag] + " " + line.strip()).strip()
    return out


def test_top_level_help_lists_every_command(capsys):
    text = _help(capsys)
    for cmd in COMMANDS:
        assert re.search(rf"^    {re.escape(cmd)}\s*\n?\s+\S", text, flags=re.MULTILINE), cmd


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_option_has_a_description_and_its_default(cmd, capsys):
    text = _help(capsys, cmd)
    options = _options(text)
    parser = infer._parser()
    sub = parser._subparsers._group_actions[0].choices[cmd]
    flags = [a.option_strings[0] for a in sub._actions if a.option_strings]
    assert sorted(options) == sorted(flags)
    for action in sub._actions:
        if not action.option_strings:
            continue
        desc = options[action.option_strings[0]]
        assert len(desc) > 8, (cmd, action.option_strings, desc)
        d = action.default
        if not action.required and d is not None and d is not False and d not in ([], argparse.SUPPRESS):
            assert "default" in desc, (cmd, action.option_strings, desc)
