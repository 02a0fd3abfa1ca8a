"""Clear errors instead of tracebacks (hardening issue, item 16): every expected failure of infer.py and of
train.py's data reading is one line on stderr naming the file, key or value, exit code 2. All cases run
in-process and fail before any model is compiled (most before one is loaded)."""
import errno
import json
import os
import shutil
import struct
import sys

import numpy as np
import pytest

import train
from conftest import fixture_dir
from v4jax import data as D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import infer  # noqa: E402

TINY = fixture_dir("tiny-a-bf16")


def _checkpoint(tmp, header=None, index=None, config_dir=False, tokenizer=None) -> str:
    """A copy of the tiny checkpoint in `tmp`/ckpt with one file replaced (config_dir: config.json a directory)."""
    d = tmp / "ckpt"
    d.mkdir()
    if config_dir:
        (d / "config.json").mkdir()
    else:
        shutil.copy(os.path.join(TINY, "config.json"), d)
    if header is None:
        os.symlink(os.path.join(TINY, "model.safetensors"), d / "model.safetensors")
    else:
        raw = json.dumps(header).encode()
        (d / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
    if index is not None:
        (d / "model.safetensors.index.json").write_text(index)
    if tokenizer is not None:
        (d / "tokenizer.json").write_text(tokenizer)
    return str(d)


def _tokens(tmp, array=None, raw=None) -> str:
    path = tmp / "tokens.npy"
    if raw is not None:
        path.write_bytes(raw)
    else:
        np.save(path, np.array([[5, 6, 7]]) if array is None else array)
    return str(path)


def _file(tmp, name, text) -> str:
    (tmp / name).write_text(text)
    return str(tmp / name)


def _score(ckpt, tokens, out, *extra):
    return ["score", "--checkpoint", ckpt, "--tokens", tokens, "--out", str(out), *extra]


MESSAGES = '[{"role": "user", "content": "hi"}]'

# case -> (tmp_path -> (argv, text the error line must contain))
CASES = {
    "safetensors header is a list": lambda t: (
        _score(_checkpoint(t, header=[1, 2]), _tokens(t), t / "o.npz"), "ckpt/model.safetensors"),
    "safetensors entry without data_offsets": lambda t: (
        _score(_checkpoint(t, header={"w": {"dtype": "F32", "shape": [1]}}), _tokens(t), t / "o.npz"),
        "'data_offsets'"),
    "index without weight_map": lambda t: (
        _score(_checkpoint(t, index='{"metadata": {}}'), _tokens(t), t / "o.npz"),
        "model.safetensors.index.json: needs a 'weight_map'"),
    "index not JSON": lambda t: (
        _score(_checkpoint(t, index="{"), _tokens(t), t / "o.npz"), "model.safetensors.index.json"),
    "tokenizer.json bad": lambda t: (
        ["generate", "--checkpoint", _checkpoint(t, tokenizer="{oops"), "--prompt", "hi"], "ckpt/tokenizer.json"),
    "tokenizer.json missing": lambda t: (
        ["chat", "--checkpoint", TINY, "--tokenizer", str(t / "nope.json")], "nope.json: no such file"),
    "config.json a directory": lambda t: (
        _score(_checkpoint(t, config_dir=True), _tokens(t), t / "o.npz"), "ckpt/config.json: is a directory"),
    "config.json a list": lambda t: (
        ["kv-report", "--config", _file(t, "config.json", "[1]"), "--context", "8"], "config.json"),
    "messages: object without messages": lambda t: (
        ["render", "--messages", _file(t, "m.json", '{"role": "user"}')], "m.json: an object needs a 'messages'"),
    "messages: a string": lambda t: (
        ["render", "--messages", _file(t, "m.json", '"hi"')], "m.json: messages must be a list"),
    "messages: list of numbers": lambda t: (
        ["render", "--messages", _file(t, "m.json", "[1, 2]")], "m.json: message 0 must be an object"),
    "messages: content a number": lambda t: (
        ["render", "--messages", _file(t, "m.json", '[{"role": "user", "content": 5}]')], "'content'"),
    "messages: unknown role": lambda t: (
        ["render", "--messages", _file(t, "m.json", '[{"role": "bot", "content": "x"}]')], "unknown role 'bot'"),
    "messages: not JSON": lambda t: (
        ["render", "--messages", _file(t, "m.json", "[{")], "m.json: not valid JSON"),
    "messages: missing file": lambda t: (
        ["render", "--messages", str(t / "nope.json")], "nope.json: no such file"),
    "tools: not a list": lambda t: (
        ["render", "--messages", _file(t, "m.json", MESSAGES), "--tools", _file(t, "tools.json", '{"a": 1}')],
        "tools must be a list"),
    "encoding_dsv4.py SyntaxError": lambda t: (
        ["render", "--messages", _file(t, "m.json", MESSAGES),
         "--prompt-texts", _file(t, "encoding_dsv4.py", "bos_token = (\n")], "encoding_dsv4.py: not valid Python"),
    "encoding_dsv4.py SyntaxError (generate)": lambda t: (
        ["generate", "--checkpoint", TINY, "--prompt", "hi",
         "--prompt-texts", _file(t, "encoding_dsv4.py", "def (:\n")], "encoding_dsv4.py: not valid Python"),
    "tokens: a text file": lambda t: (
        _score(TINY, _tokens(t, raw=b"1 2 3\n"), t / "o.npz"), "tokens.npy: not a .npy file"),
    "tokens: an .npz": lambda t: (
        _score(TINY, _file(t, "t.npz", "PK\x03\x04junk"), t / "o.npz"), "t.npz: an .npz archive"),
    "tokens: floats": lambda t: (
        _score(TINY, _tokens(t, np.zeros((1, 3), np.float32)), t / "o.npz"), "2-D integer array"),
    "tokens: shape [1, 0]": lambda t: (
        _score(TINY, _tokens(t, np.zeros((1, 0), np.int64)), t / "o.npz"), "shape [1, 0] holds no tokens"),
    "tokens: missing": lambda t: (
        _score(TINY, str(t / "nope.npy"), t / "o.npz"), "nope.npy: no such file"),
    "prefill beyond the tokens": lambda t: (
        _score(TINY, _tokens(t), t / "o.npz", "--prefill", "4"), "--prefill must be within 1..3"),
    "out: a directory": lambda t: (
        _score(TINY, _tokens(t), t), "is a directory"),
    "out: below a file": lambda t: (
        _score(TINY, _tokens(t), os.path.join(_file(t, "f", "x"), "o.npz")), "is a file, not a directory"),
    "checkpoint: missing": lambda t: (
        _score(str(t / "nope"), _tokens(t), t / "o.npz"), "nope: no such directory"),
    "temperature nan": lambda t: (
        ["generate", "--checkpoint", TINY, "--prompt", "hi", "--temperature", "nan"], "--temperature"),
    "temperature inf (chat)": lambda t: (
        ["chat", "--checkpoint", TINY, "--temperature", "inf"], "got inf"),
    "top-p 0": lambda t: (
        ["generate", "--checkpoint", TINY, "--prompt", "hi", "--top-p", "0"], "--top-p must be in (0, 1]"),
    "speculative with temperature": lambda t: (
        ["generate", "--checkpoint", TINY, "--prompt", "hi", "--speculative", "--temperature", "0.7"],
        "--temperature 0"),
    "max-context 0": lambda t: (
        ["chat", "--checkpoint", TINY, "--max-context", "0"], "--max-context must be >= 1, got 0"),
    "compile --batch 0": lambda t: (
        ["compile", "--config", "tiny", "--topology", "v5p:2x2x1", "--max-context", "8", "--batch", "0"],
        "--batch must be >= 1"),
}


def _one_error_line(capsys, rc, after_progress=False) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    if after_progress:  # the "loaded ..." / "scored ..." lines of a run that got as far as writing
        lines = [x for x in lines if not x.startswith(("loaded ", "scored "))]
    assert rc == 2, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_infer_error_is_one_line_naming_it(case, tmp_path, capsys):
    argv, needle = CASES[case](tmp_path)
    line = _one_error_line(capsys, infer.main(argv))
    assert needle in line, line
    assert not (tmp_path / "o.npz").exists() and not list(tmp_path.glob("*.tmp"))


def test_out_in_a_read_only_directory(tmp_path, capsys, monkeypatch):
    """Refused before loading (root may write anywhere, so the test makes the directory unwritable)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m: False if os.fspath(p) == str(ro) else real(p, m))
    line = _one_error_line(capsys, infer.main(_score(TINY, _tokens(tmp_path), ro / "o.npz")))
    assert f"directory {ro} is not writable" in line
    ro.chmod(0o755)


def test_out_on_a_full_disk_leaves_the_old_file(tmp_path, capsys, monkeypatch):
    """The write itself fails (ENOSPC): one line, the file already at --out intact, no temporary left."""
    from types import SimpleNamespace

    from v4jax import scoring

    out = tmp_path / "o.npz"
    out.write_bytes(b"old")
    monkeypatch.setattr(infer, "load_model", lambda *a, **k: SimpleNamespace(cfg=SimpleNamespace(vocab_size=16)))
    monkeypatch.setattr(scoring, "score", lambda model, tokens, prefill=None: {"logits": np.zeros((1, 3, 16))})

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", full)
    line = _one_error_line(capsys, infer.main(_score(TINY, _tokens(tmp_path), out)), after_progress=True)
    assert f"--out {out}: not written (No space left on device)" in line
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["o.npz", "tokens.npy"]


def test_max_new_tokens_0_reports_no_negative_rate(capsys, monkeypatch):
    """generate --max-new-tokens 0: the summary says there were no decode steps (it printed -40000 tokens/s)."""
    from types import SimpleNamespace

    from v4jax import data, serving

    engine = SimpleNamespace(cfg=SimpleNamespace(bos_token_id=0))
    monkeypatch.setattr(infer, "_session_parts", lambda args: (engine, data.ByteTokenizer(), None, None))
    monkeypatch.setattr(serving, "generate", lambda *a, **k: {
        "outputs": [serving.Generation([])], "prefill_s": 0.1, "tokens_per_s": -1 / 1e-5})
    assert infer.main(["generate", "--checkpoint", TINY, "--prompt", "hi", "--mode", "raw",
                       "--max-new-tokens", "0"]) == 0
    err = capsys.readouterr().err
    assert "0 new (length)" in err and "no decode steps" in err and "-" not in err.split("prefill")[1]


# ---- train.py --data: read by v4jax.data, reported by train.py (ValueError -> exit 2) --------------------
@pytest.mark.parametrize("name,content,needle", [
    ("garbage.parquet", b"not a parquet file", "garbage.parquet: not a readable Parquet file"),
    ("nope.jsonl", None, "nope.jsonl: no such document source"),
    ("docs.csv", b"a,b\n", "docs.csv: unknown document format"),
])
def test_train_data_errors(tmp_path, capsys, name, content, needle):
    """Found while the trainer is built (list_chunks), before the model is."""
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    rc = train.main(["--data", str(path), "--steps", "1", "--out", str(tmp_path / "run")])
    assert needle in _one_error_line(capsys, rc)


def test_data_files_that_are_not_utf8_or_damaged(tmp_path):
    """Read lazily (inside the first batch, after the model is built): v4jax.data's DataError names the
    file and line, which train.py prints as one line."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(D.DataError, match=r"bad\.jsonl:2: not UTF-8 \(byte 0xe9 at column 14\)"):
        list(D.iter_documents(bad))
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    good = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["a" * 1000]}), good)
    raw = bytearray(good.read_bytes())
    raw[8:600] = bytes(592)  # the row group's pages destroyed, footer intact
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(bytes(raw))
    with pytest.raises(D.DataError, match="broken.parquet"):
        list(D.iter_documents(broken))
    assert issubclass(D.DataError, ValueError)  # what train.py turns into exit 2
    with pytest.raises(D.DataError, match="none: no such document source"):
        D.list_chunks(tmp_path / "none")
