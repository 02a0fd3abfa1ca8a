"""The run directory's rules (v4jax.rundir) and the loop's guards, without compiling a train step: one
writer per --out, torn metrics lines, the LR-schedule record, the rollback budget, the ETA, settings."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import FIXTURES
from v4jax import rundir
from v4jax.checkpoint import CheckpointError
from v4jax.config import ConfigError
from v4jax.trainer import ROLLBACK_LIMIT, RollbackBudget, RunConfig, Trainer

CONFIG = os.path.join(FIXTURES, "train-tiny.json")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------- the lock
def test_one_writer_per_directory_and_a_crash_releases_the_lock(tmp_path):
    with rundir.RunLock(str(tmp_path)):
        with pytest.raises(CheckpointError, match=rf"in use by another training run \(pid {os.getpid()} on "):
            rundir.RunLock(str(tmp_path)).acquire()
    rundir.RunLock(str(tmp_path)).acquire().release()  # released on exit
    code = f"from v4jax import rundir; rundir.RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); " \
           "import time; time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(CheckpointError, match=rf"pid {proc.pid} on "):
        rundir.RunLock(str(tmp_path)).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rundir.RunLock(str(tmp_path)).acquire().release()  # the kernel dropped the dead process's lock


# ---------------------------------------------------------------------------- metrics.jsonl
def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    good = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in good) + '{"step": 4, "lo')
    notes = []
    assert rundir.read_metrics(path, notes.append) == good
    assert len(notes) == 1 and "torn last line" in notes[0] and path in notes[0]
    rundir.truncate_metrics(path, 2, notes.append)
    assert [json.loads(ln) for ln in open(path)] == good[:2]
    with open(path, "a") as f:  # damage before the last line is not a torn write: an error naming the line
        f.write("garbage\n" + json.dumps({"step": 3}) + "\n")
    with pytest.raises(CheckpointError, match=r"metrics.jsonl: line 3 is not a metrics record"):
        rundir.read_metrics(path)


def test_files_are_written_with_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        rundir.write_atomic(str(tmp_path / "config.json"), "{}")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "config.json").st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path) == ["config.json"]  # no temporary left behind


# ---------------------------------------------------------------------------- resume choices
def test_resume_step_choice_and_incomplete_saves(tmp_path):
    assert rundir.pick_step([5, 10, 15], -1, "d") == (15, [])
    assert rundir.pick_step([5, 10, 15], 5, "d") == (5, [10, 15])
    assert rundir.pick_step([], -1, "d") == (None, [])
    with pytest.raises(CheckpointError, match=r"no checkpoint at step 7 \(checkpoints: \[5, 10, 15\]\)"):
        rundir.pick_step([5, 10, 15], 7, "d")
    for name in ("5", "10", "15.orbax-checkpoint-tmp-1733", "20", "10.superseded", "metrics.jsonl"):
        (tmp_path / name).mkdir()
    assert rundir.incomplete_steps(str(tmp_path), [5, 10]) == ["15.orbax-checkpoint-tmp-1733", "20"]
    msg = rundir.damaged_message("d", 15, OSError("bad\n" + "tensorstore dump\n" * 60), 10)
    assert "\n" not in msg and msg.startswith("checkpoint d/15 is damaged (bad); the newest older checkpoint is "
                                              "step 10: resume from it with --set resume_step=10")


def test_a_changed_lr_schedule_is_refused_extended_or_adopted():
    saved = {"steps": 120, "lr": 3e-4, "warmup": 12, "end_lr_frac": 0.1}
    rc = lambda **kw: RunConfig(**{**saved, **kw})  # noqa: E731
    assert rundir.schedule_steps(saved, rc(), "ckpt") == 120
    assert rundir.schedule_steps(None, rc(steps=200), "ckpt") == 200  # a run saved before the record
    with pytest.raises(CheckpointError, match=r"another learning-rate schedule \(steps 120 -> 200\).*"
                                              r"schedule_change=extend"):
        rundir.schedule_steps(saved, rc(steps=200), "ckpt")
    with pytest.raises(CheckpointError, match=r"\(lr 0.0003 -> 0.001\)"):
        rundir.schedule_steps(saved, rc(lr=1e-3, schedule_change="extend"), "ckpt")  # extend: only more steps
    notes = []
    assert rundir.schedule_steps(saved, rc(steps=200, schedule_change="extend"), "ckpt", notes.append) == 120
    assert rundir.schedule_steps(saved, rc(steps=200, schedule_change="adopt"), "ckpt", notes.append) == 200
    assert "final value (3e-05) after step 120" in notes[0] and "schedule_change=adopt" in notes[1]
    extended = {**saved, "steps": 200, "schedule_total_steps": 120}  # saved by an extended run: it stays so
    assert rundir.schedule_steps(extended, rc(steps=200), "ckpt") == 120
    assert rundir.schedule_steps(extended, rc(steps=300, schedule_change="extend"), "ckpt", notes.append) == 120


# ---------------------------------------------------------------------------- settings
def test_warmup_adapts_to_short_runs_and_keep_zero_is_refused():
    assert [RunConfig(steps=n).warmup for n in (1, 4, 20, 120, 10_000)] == [0, 1, 5, 12, 12]
    assert RunConfig(steps=100, warmup=30).warmup == 30
    with pytest.raises(ConfigError, match=r"'warmup': 12 warm-up steps leave no decay in a run of 4 steps"):
        RunConfig(steps=4, warmup=12)
    with pytest.raises(ConfigError, match=r"'keep': must be an integer >= 1, got 0"):
        RunConfig.load(None, ["keep=0"])
    with pytest.raises(ConfigError, match=r"'schedule_change': unknown 'maybe'"):
        RunConfig.load(None, ["schedule_change=maybe"])


def test_settings_list_and_the_example_run_file(capsys):
    import train

    assert train.main(["--settings"]) == 0
    text = capsys.readouterr().out
    for name in ("steps = 120  (an integer >= 1)", "resume_step = -1", "schedule_change = 'refuse'",
                 "warmup = None  (an integer >= 0 or null)\n      None: min(12, steps // 4)"):
        assert name in text, name
    rc = RunConfig.load(os.path.join(ROOT, "configs", "example-run.toml"), [])
    assert (rc.steps, rc.seq_len, rc.phases) == (200, 256, "dense:40,indexer_warmup:60,sparse")


def test_help_describes_every_option(capsys):
    import train

    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    opts = [ln for ln in text.splitlines() if ln.startswith("  --")]
    assert len(opts) >= 15
    for ln in opts:
        name = ln.split()[0]
        body = text.split(ln, 1)[1].split("\n  --", 1)[0]
        assert "default" in (ln + body) or name == "--settings", name


# ---------------------------------------------------------------------------- the loop, with a fake step
def _fake_trainer(tmp_path, losses, **kw):
    """A Trainer whose train step is replaced by one that returns the given losses in turn."""
    rc = RunConfig(config=CONFIG, batch=2, seq_len=64, out=str(tmp_path / "run"), data_max_bytes=100_000,
                   save_every=0, sample_tokens=0, **kw)
    tr = Trainer(rc)
    it = iter(losses)

    def step(ts, batch, ar):
        loss = next(it)
        return ts, {"loss": loss, "ce": loss, "mtp": 0.0, "balance": 0.0, "indexer_kl": 0.0, "grad_norm": 1.0}

    tr.step_fn = lambda phase: step
    return tr


def test_a_run_that_keeps_diverging_stops(tmp_path):
    """One clean step after each rollback (lr = NaN-like: the step after a restore is fine, the next is
    not) no longer loops forever: more than ROLLBACK_LIMIT rollbacks in the window end the run."""
    tr = _fake_trainer(tmp_path, [5.0, float("nan")] * 100, steps=50, warmup=2)
    with pytest.raises(FloatingPointError, match=rf"keeps diverging: {ROLLBACK_LIMIT + 1} rollbacks within the "
                                                 r"last 100 steps \(now loss nan at step 2\)"):
        tr.run(log=lambda s: None)
    events = [json.loads(ln) for ln in open(tmp_path / "run" / "metrics.jsonl") if "event" in ln]
    assert len(events) == ROLLBACK_LIMIT and all(e["rolled_back_to"] == 0 for e in events)
    b = RollbackBudget(limit=3, window=10)  # sparse rollbacks never exhaust it
    for t in range(100):
        b.tick()
        if t % 5 == 0:
            b.spend(t, 9.0, tr.rc)


def test_a_new_phase_moves_the_loss_without_a_rollback(tmp_path):
    """The dense -> sparse switch of the recipe raises the loss on purpose (seen in the retrieval recipe:
    0.23 -> 0.6 at the first sparse step, rolled back twice): the detector starts afresh at a phase or
    sequence-length stage boundary. The same losses inside one phase are a spike."""
    losses = [1.0] * 5 + [3.0] * 5
    for phases, spikes in (("dense:5,sparse", 0), ("", 1)):
        tr = _fake_trainer(tmp_path / (phases or "one"), losses + [3.0] * 60, steps=10, warmup=1, phases=phases)
        tr.run(log=lambda s: None)
        events = [json.loads(ln) for ln in open(os.path.join(tr.rc.out, "metrics.jsonl")) if '"event"' in ln]
        assert len([e for e in events if e["event"] == "loss_spike"]) >= spikes and (spikes or not events), events


def test_eta_waits_for_timed_steps_and_the_lock_is_taken(tmp_path):
    tr = _fake_trainer(tmp_path, [5.0] * 5, steps=5, warmup=1, log_every=1, spike_detect=False)
    with rundir.RunLock(tr.rc.out):
        with pytest.raises(CheckpointError, match="in use by another training run"):
            tr.run(log=lambda s: None)
    assert not os.path.exists(os.path.join(tr.rc.out, "config.json"))  # refused before writing anything
    lines = []
    tr.run(log=lines.append)
    etas = [ln.split("ETA")[1].strip() for ln in lines if ln.startswith("step")]
    assert etas[:2] == ["-", "-"] and all(e.endswith("s") and float(e[:-1]) >= 0 for e in etas[2:]), etas
    assert len(etas) == 5 and np.isfinite(json.loads(open(os.path.join(tr.rc.out, "metrics.jsonl")).readline())["loss"])
    assert [s for t, s, _ in _tb_events(tr.rc.out) if t == "train/loss"] == [1, 2, 3, 4, 5]
    time.sleep(0)  # the lock was released: another run may take the directory
    rundir.RunLock(tr.rc.out).acquire().release()


def _tb_events(out):
    """(tag, step, value-or-kind) of every summary in the TensorBoard event files of `out`."""
    import struct

    from tensorboardX.proto import event_pb2

    got = []
    for name in sorted(os.listdir(out)):
        if not name.startswith("events.out.tfevents"):
            continue
        data = open(os.path.join(out, name), "rb").read()
        i = 0
        while i < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                got.append((v.tag, ev.step, v.simple_value if v.WhichOneof("value") == "simple_value"
                            else v.WhichOneof("value")))
    return got


def test_metrics_go_to_tensorboard_too(tmp_path):
    out = str(tmp_path)
    with rundir_log(out, 0) as log:
        log.write(json.dumps({"step": 1, "loss": 5.5, "lr": 1e-3, "tokens_per_sec": 100.0, "ce": 5.0,
                              "max_load_ratio": [1.5, 2.0]}) + "\n")
        log.write(json.dumps({"step": 2, "event": "loss_spike", "loss": "nan", "rolled_back_to": 0}) + "\n")
        log.expert_load(2, np.full((3, 8), 1 / 8))
    ev = _tb_events(out)
    assert ("train/loss", 1, 5.5) in ev and ("perf/tokens_per_sec", 1, 100.0) in ev and ("train/ce", 1, 5.0) in ev
    kinds = {(t, s): v for t, s, v in ev}
    assert kinds[("balance/max_load_ratio_per_layer", 1)] == "histo"
    assert kinds[("balance/expert_load", 2)] == "image" and ("events/text_summary", 2) in kinds
    assert [json.loads(ln)["step"] for ln in open(os.path.join(out, "metrics.jsonl"))] == [1, 2]
    with pytest.raises(ConfigError, match="'wandb_project' .* needs the wandb package"):
        try:
            import wandb  # noqa: F401
            pytest.skip("wandb is installed here")
        except ImportError:
            rundir_log(out, 0, wandb_project="x")


def rundir_log(out, start, **kw):
    from v4jax.runlog import RunLog
    return RunLog(out, start, **kw)


def test_plot_draws_the_run(tmp_path):
    from v4jax import plot

    recs = [{"step": s, "loss": 6 - s / 10, "ce": 5 - s / 10, "mtp": 1.0, "lr": 1e-3 * s, "max_load_ratio": [1 + s / 20, 2.0]}
            for s in range(1, 21)] + [{"step": 9, "event": "loss_spike", "loss": 9.0, "rolled_back_to": 8}]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))
    s = plot.series(recs)
    assert s["max_load_ratio"].shape == (2, 20) and list(s["spikes"]) == [9]
    png = plot.plot(str(tmp_path))
    from PIL import Image
    img = Image.open(png)
    assert img.size == (900, 900) and len(np.unique(np.asarray(img.convert("L")))) > 10  # drawn, not blank
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        plot.plot(str(tmp_path / "nothing"))


def test_the_compilation_cache_serves_the_second_start(tmp_path):
    """train.py turns the persistent cache on: the first start fills it, the second (another --out)
    finds every program there and adds nothing."""
    cache = tmp_path / "cache"
    env = {**os.environ, "V4JAX_COMPILE_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", CONFIG, "--steps", "1", "--batch", "2",
           "--seq-len", "64", "--set", "sample_tokens=0", "--set", "data_max_bytes=20000", "--set", "tensorboard=false"]
    entries = []
    for i, e in enumerate((env, env)):
        r = subprocess.run(cmd + ["--out", str(tmp_path / f"run{i}")], env=e, capture_output=True, text=True,
                           cwd=ROOT, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        entries.append(sorted(os.listdir(cache)))
    assert len(entries[0]) >= 1 and entries[1] == entries[0]
    recs = [json.loads(open(tmp_path / f"run{i}" / "metrics.jsonl").readline()) for i in range(2)]
    assert recs[0]["loss"] == recs[1]["loss"]  # a cached program computes the same


def test_the_compilation_cache_location(monkeypatch, tmp_path):
    from v4jax import compile_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_dir() == str(tmp_path / "v4jax" / "jax-compile")
    for off in ("off", "0", "OFF"):
        monkeypatch.setenv("V4JAX_COMPILE_CACHE", off)
        assert compile_cache.enable() is None


def test_profile_steps_write_a_trace(tmp_path):
    tr = _fake_trainer(tmp_path, [5.0] * 4, steps=4, warmup=1, spike_detect=False, profile_steps="2:3")
    notes = []
    tr.run(log=notes.append)
    runs = os.listdir(tmp_path / "run" / "profile" / "plugins" / "profile")
    files = os.listdir(tmp_path / "run" / "profile" / "plugins" / "profile" / runs[0])
    assert len(runs) == 1 and any(f.endswith(".xplane.pb") for f in files) and "perfetto_trace.json.gz" in files
    assert any("profile of steps 2:3 written to" in n for n in notes)
    for bad in ("3:2", "0:1", "a:b"):
        with pytest.raises(ConfigError, match="'profile_steps': expected A:B"):
            RunConfig(profile_steps=bad)
