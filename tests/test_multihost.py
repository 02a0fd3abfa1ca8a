"""Multi-host training with two CPU processes on localhost: `train.py --distributed` in each, one mesh
over both processes' devices (cross-process collectives through JAX's CPU backend, gloo), gives the
losses of a single-process run of the same global batch."""
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np

from conftest import FIXTURES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(FIXTURES, "train-tiny.json")
STEPS, HOST_BATCH, SEQ = 3, 4, 64
SETTINGS = {"warmup": 1, "data_max_bytes": 20_000, "sample_tokens": 0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _train_cmd(out, batch: int) -> list[str]:
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", CONFIG, "--steps", str(STEPS),
           "--batch", str(batch), "--seq-len", str(SEQ), "--out", str(out), "--set", "log_every=1"]
    return cmd + [a for k, v in SETTINGS.items() for a in ("--set", f"{k}={v}")]


def _start(cmd, log):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    # one CPU device per process; XLA's backend optimisation off halves the compile time (all three runs)
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS="--xla_backend_optimization_level=0")
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT, env=env)


def _printed_losses(log) -> list[str]:
    return re.findall(r"^step\s+\d+\s+loss\s+(\S+)", open(log).read(), re.M)


def test_two_processes_train_like_one(tmp_path):
    """Processes 0 and 1 each read 4 rows of every global batch of 8; the mesh fsdp=2 spans them (batch
    and parameters split between the processes). The reference: one process, one device, batch 8."""
    port = _free_port()
    dist = ["--mesh", "fsdp=2", "--distributed", "--coordinator", f"localhost:{port}", "--num-processes", "2"]
    logs = [tmp_path / f"process{i}.log" for i in range(2)] + [tmp_path / "single.log"]
    procs = [_start(_train_cmd(tmp_path / "run", HOST_BATCH) + dist + ["--process-id", str(i)], logs[i])
             for i in range(2)]
    procs.append(_start(_train_cmd(tmp_path / "one", 2 * HOST_BATCH), logs[2]))
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    tails = "\n".join(f"--- {log.name}:\n" + open(log).read()[-3000:] for log in logs)
    assert codes == [0, 0, 0], tails
    printed = [_printed_losses(log) for log in logs[:2]]
    assert len(printed[0]) == STEPS and printed[0] == printed[1], printed  # both processes log the same losses
    ref = [json.loads(ln)["loss"] for ln in open(tmp_path / "one" / "metrics.jsonl")]
    recs = [json.loads(ln) for ln in open(tmp_path / "run" / "metrics.jsonl")]
    assert sorted({r["step"] for r in recs}) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in recs], [ref[r["step"] - 1] for r in recs], rtol=1e-5)
    assert os.path.isdir(tmp_path / "run" / str(STEPS))  # the checkpoint written by both processes
