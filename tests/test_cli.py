"""`infer.py score`: the command-line interface every parity check builds on."""
import os
import subprocess
import sys

import numpy as np

from conftest import fixture_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_score_prefill_decode_and_mtp(tmp_path, expected):
    e = expected["tiny-a-fp8"]
    np.save(tmp_path / "tokens.npy", e["tokens"][:, :100])
    out = tmp_path / "out.npz"
    r = _run("score", "--checkpoint", fixture_dir("tiny-a-fp8"), "--tokens", str(tmp_path / "tokens.npy"),
             "--out", str(out), "--prefill", "90")
    assert r.returncode == 0, r.stderr
    got = np.load(out)
    assert got["logits"].shape == (2, 100, 1024) and got["logits"].dtype == np.float32
    assert np.abs(got["logits"] - e["logits_full"][:, :100]).max() <= 1e-4  # causal: a prefix scores alike
    assert got["mtp_logits"].shape == (2, 99, 1024)
    assert np.abs(got["mtp_logits"][0] - e["logits_mtp_row0"][:99]).max() <= 1e-4


def test_score_rejects_bad_tokens_and_writes_nothing(tmp_path):
    np.save(tmp_path / "tokens.npy", np.array([[5, 2000, 7]]))
    out = tmp_path / "out.npz"
    r = _run("score", "--checkpoint", fixture_dir("tiny-a-bf16"), "--tokens", str(tmp_path / "tokens.npy"),
             "--out", str(out))
    assert r.returncode == 2
    assert "token id 2000 is out of range" in r.stderr
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_kv_report_render_and_argument_errors(tmp_path):
    import json

    r = _run("kv-report", "--config", "deepseek-v4-flash", "--context", "1048576", "--kv-dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["bytes_per_token"] == 6880 and rep["total_bytes"] > rep["fixed_bytes"] > 0
    assert set(rep["by_layer_type"]) == {"swa", "csa", "hca", "mtp"}
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    (tmp_path / "m.json").write_text(json.dumps(msgs))
    r = _run("render", "--messages", str(tmp_path / "m.json"), "--mode", "think-high")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜><think>"
    r = _run("render", "--messages", str(tmp_path / "m.json"), "--mode", "think-hard")
    assert r.returncode == 2 and "think-hard" in r.stderr
    r = _run("generate", "--checkpoint", fixture_dir("tiny-a-bf16"), "--prompt", "Hi", "--mode", "fast")
    assert r.returncode == 2 and "unknown mode 'fast'" in r.stderr
