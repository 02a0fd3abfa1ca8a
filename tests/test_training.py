"""train.py's machinery on a 2-layer config: loss falls, exact resume, spike rollback, sharded
steps equal single-device steps, balancing, checkpoint refusal, and inference from what it saved."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import FIXTURES
from v4jax import model as M
from v4jax import stack
from v4jax import training as T
from v4jax.checkpoint import CheckpointError
from v4jax.config import ModelConfig
from v4jax.trainer import MAX_ROLLBACKS, RunConfig, Trainer, load_trained

CONFIG = os.path.join(FIXTURES, "train-tiny.json")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(out, **kw):
    kw = {"batch": 4, **kw}
    rc = RunConfig(config=CONFIG, seq_len=64, warmup=2, lr=3e-3, out=str(out), log_every=1000,
                   data_max_bytes=400_000, **kw)
    tr = Trainer(rc)
    tr.run(log=lambda s: None)
    return tr


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("a")
    tr = _run(out, steps=30, save_every=5)
    return out, tr


def test_loss_falls(uninterrupted):
    rec = [r for r in _metrics(uninterrupted[0]) if "loss" in r and "event" not in r]
    assert [r["step"] for r in rec] == list(range(1, 31))
    assert rec[-1]["loss"] < rec[0]["loss"] - 1.0
    assert {"lr", "tokens_per_sec", "max_load_ratio", "ce", "mtp", "balance"} <= set(rec[0])


def test_sigkill_and_resume_gives_identical_losses(uninterrupted, tmp_path):
    out = tmp_path / "b"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", CONFIG, "--steps", "30", "--batch", "4",
           "--seq-len", "64", "--save-every", "5", "--out", str(out), "--set", "warmup=2", "--set", "lr=0.003",
           "--set", "log_every=1000", "--set", "data_max_bytes=400000", "--set", "sample_tokens=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(out / "metrics.jsonl") and len(_metrics(out)) >= 12:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(_metrics(out))
    assert 12 <= killed_at < 30, killed_at
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout
    a = [x["loss"] for x in _metrics(uninterrupted[0])]
    b = [x["loss"] for x in _metrics(out)]
    assert b == a  # bit-identical losses, and no orphaned records from after the last checkpoint


def test_spike_rolls_back_and_recovers(tmp_path):
    """The parameters are damaged right after step 8's update, so the snapshot of step 8 is damaged too:
    step 9 spikes, the rollback to 8 spikes again at once, so 8 is dropped for the snapshot of step 4;
    steps 5.. run again on fresh data with anticipatory routing for 3 steps, and the loss recovers."""
    out = tmp_path / "s"
    _run(out, steps=12, save_every=0, snapshot_every=4, inject_spike_at=8, ar_steps=3, spike_factor=1.3)
    recs = _metrics(out)
    events = [r for r in recs if r.get("event") == "loss_spike"]
    assert [(e["step"], e["rolled_back_to"]) for e in events] == [(9, 8), (9, 4)]
    steps = [r for r in recs if "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, 9)) + list(range(5, 13))
    ar = [r["step"] for r in steps if r["anticipatory_routing"]]
    assert ar == [5, 6, 7]
    assert steps[-1]["loss"] < events[0]["loss"] and np.isfinite(steps[-1]["loss"])


@pytest.mark.parametrize("mesh", ["data=8", "data=2,fsdp=2,expert=2", "expert=4,tensor=2"])
def test_sharded_steps_equal_single_device(mesh, tmp_path, single_device_losses):
    tr = _run(tmp_path / "m", steps=5, save_every=0, mesh=mesh, batch=8)
    got = [r["loss"] for r in _metrics(tmp_path / "m")]
    np.testing.assert_allclose(got, single_device_losses, rtol=1e-5)
    assert max(len(v[...].sharding.device_set) for _, v in nnx.to_flat_state(tr.ts["params"])) == 8


@pytest.fixture(scope="module")
def single_device_losses(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    _run(out, steps=5, save_every=0, batch=8)
    return [r["loss"] for r in _metrics(out)]


def test_bias_balancing_reduces_imbalance():
    cfg = ModelConfig.from_hub(CONFIG)
    model = M.build(cfg)
    slot = T.routed_layers(model)[0]  # the stacked gate of a one-row segment: weight [1, E, d]
    slot.weight[...] = slot.weight[...].at[0, 0].add(0.05)  # expert 0 is favoured by every token
    x = jax.random.normal(jax.random.key(0), (512, cfg.dim)) + 0.5

    def imbalance():
        _, idx, _ = stack.row_view(slot, 0)(x, jnp.zeros((512,), jnp.int32))
        c = jnp.bincount(idx.reshape(-1), length=cfg.n_routed_experts)
        return float(c.max() / c.mean()), c

    before, _ = imbalance()
    for _ in range(100):
        T.update_balance_biases(model, [imbalance()[1][None].astype(jnp.float32)] + [jnp.ones(8)] * 9, 0.01)
    after, _ = imbalance()
    assert before > 3.0 and after < 0.5 * before, (before, after)


def test_other_config_is_refused(uninterrupted, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(uninterrupted[0], out)
    raw = json.load(open(CONFIG))
    raw["swiglu_limit"] = 7.0
    json.dump(raw, open(tmp_path / "other.json", "w"))
    rc = RunConfig(config=str(tmp_path / "other.json"), batch=4, seq_len=64, out=str(out), steps=40,
                   data_max_bytes=400_000)
    before = {f: open(out / f, "rb").read() for f in ("config.json", "metrics.jsonl")}
    with pytest.raises(CheckpointError, match="'swiglu_limit' is 10.0 there, 7.0 now"):
        Trainer(rc).run(log=lambda s: None)
    assert {f: open(out / f, "rb").read() for f in before} == before  # a refused run changes no file


def test_a_changed_schedule_is_refused_then_extended_explicitly(uninterrupted, tmp_path):
    """More --steps on a finished run would bend the cosine decay mid-run (the rate jumps up at step 31):
    refused, files untouched; with schedule_change=extend the saved decay holds its final rate."""
    out = tmp_path / "e"
    shutil.copytree(uninterrupted[0], out)
    before = open(out / "metrics.jsonl", "rb").read()
    with pytest.raises(CheckpointError, match=r"another learning-rate schedule \(steps 30 -> 32\)"):
        _run(out, steps=32, save_every=5)
    assert open(out / "metrics.jsonl", "rb").read() == before
    _run(out, steps=32, save_every=5, schedule_change="extend")
    recs = [r for r in _metrics(out) if "event" not in r]
    assert [r["step"] for r in recs] == list(range(1, 33)) and recs[:30] == _metrics(uninterrupted[0])
    np.testing.assert_allclose([r["lr"] for r in recs[30:]], [3e-4, 3e-4], rtol=1e-6)


def test_damaged_checkpoint_is_refused_and_kept(uninterrupted, tmp_path):
    out = tmp_path / "d"
    shutil.copytree(uninterrupted[0], out)
    victims = [os.path.join(r, f) for r, _, fs in os.walk(out / "30") for f in fs if "meta" in r or f.endswith(".json")]
    for v in victims:
        open(v, "w").write("{ not json")
    before = sorted(os.listdir(out / "30"))
    rc = RunConfig(config=CONFIG, batch=4, seq_len=64, out=str(out), steps=40, data_max_bytes=400_000)
    with pytest.raises(CheckpointError, match="damaged") as err:
        Trainer(rc).run(log=lambda s: None)
    assert sorted(os.listdir(out / "30")) == before and os.path.isdir(out / "25")
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 600 and f"{out}/30 is damaged" in msg
    assert "the newest older checkpoint is step 25: resume from it with --set resume_step=25" in msg
    # taking the offer: step 30 is moved aside (kept), the run resumes from 25 and logs the same losses
    log = []
    rc = RunConfig(config=CONFIG, batch=4, seq_len=64, out=str(out), steps=30, warmup=2, lr=3e-3, save_every=5,
                   data_max_bytes=400_000, log_every=1000, resume_step=25)
    Trainer(rc).run(log=log.append)
    assert sorted(os.listdir(out / "30.superseded")) == before and f"resumed from {out} at step 25" in log
    assert [r["loss"] for r in _metrics(out)] == [r["loss"] for r in _metrics(uninterrupted[0])]


def test_inference_reads_the_training_checkpoint(uninterrupted):
    out, tr = uninterrupted
    m = load_trained(str(out))
    ids = jnp.asarray(np.arange(40, dtype=np.int32)[None] % 300)
    z = jnp.zeros((1,), jnp.int32)
    got = M.forward_fn(nnx.graphdef(m))(nnx.state(m), ids, z, None)["logits"]
    ref = M.forward_fn(nnx.graphdef(tr.model()))(nnx.state(tr.model()), ids, z, None)["logits"]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_sparse_attention_recipe_phases(tmp_path):
    out = tmp_path / "p"
    _run(out, steps=6, save_every=2, phases="dense:2,indexer_warmup:4,sparse", spike_detect=False)
    recs = _metrics(out)
    assert [r["phase"] for r in recs] == ["dense"] * 2 + ["indexer_warmup"] * 2 + ["sparse"] * 2
    assert all(r["indexer_kl"] == 0.0 for r in recs[:2])
    for r in recs[2:4]:  # warm-up: the loss is the indexer's KL alone
        assert r["indexer_kl"] > 0 and abs(r["loss"] - r["indexer_kl"]) < 1e-5
    assert all(r["indexer_kl"] > 0 and r["loss"] > r["ce"] for r in recs[4:])
    before, after = (nnx.to_flat_state(nnx.state(load_trained(str(out), step=s), nnx.Param)) for s in (2, 4))
    for (path, a), (_, b) in zip(before, after):  # only the indexers moved during the warm-up
        same = np.array_equal(np.asarray(a[...]), np.asarray(b[...]))
        assert same != ("indexer" in path), path


def test_generate_from_the_training_checkpoint(uninterrupted, capsys, tmp_path):
    """infer.py generate on what train.py saved: raw prompt, greedy, speculative (MTP) and plain agree;
    --profile writes a trace."""
    import infer

    out, _ = uninterrupted
    outs = []
    for extra in (["--profile", str(tmp_path / "prof")], ["--speculative"]):
        rc = infer.main(["generate", "--checkpoint", str(out), "--prompt", "def main(", "--mode", "raw",
                         "--max-new-tokens", "12", "--max-context", "256", *extra])
        cap = capsys.readouterr()
        assert rc == 0, cap.err
        outs.append(cap.out)
        assert "12 new (length)" in cap.err and "tokens/s" in cap.err
    assert outs[0] == outs[1] and len(outs[0]) > 1
    (run,) = os.listdir(tmp_path / "prof" / "plugins" / "profile")
    assert any(f.endswith(".xplane.pb") for f in os.listdir(tmp_path / "prof" / "plugins" / "profile" / run))
    assert "MTP acceptance" in cap.err
    rc = infer.main(["generate", "--checkpoint", str(out), "--prompt", "x" * 300, "--mode", "raw",
                     "--max-context", "256"])
    assert rc == 2 and "exceed the maximum context of 256" in capsys.readouterr().err


def test_repeated_spikes_fall_back_then_accept_or_stop():
    """Rollback policy alone: the newest point, then (it spiked again at once) the older one, then
    after MAX_ROLLBACKS in a row a finite spike is accepted and logged; a non-finite one stops the run."""
    fake = SimpleNamespace(_retries=0, rc=SimpleNamespace(out="runs/x"), _rollback=lambda snap, *a: snap[0])
    snaps, mlog = [(4, None), (8, None)], io.StringIO()
    backs = [Trainer._on_spike(fake, snaps, 8, 5.0, mlog, print) for _ in range(MAX_ROLLBACKS + 1)]
    assert backs == [8, 4, 4, None] and snaps == [(4, None)]
    assert '"event": "loss_spike_accepted"' in mlog.getvalue() and fake._retries == 0
    fake._retries = MAX_ROLLBACKS
    with pytest.raises(FloatingPointError, match="loss is nan at step 9 after 3 rollbacks"):
        Trainer._on_spike(fake, snaps, 8, float("nan"), mlog, print)
