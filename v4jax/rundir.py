"""A training run's directory (`--out`): who may write it, the files beside the checkpoints, and which
checkpoint a run resumes from. Every rule that keeps a run from being lost or damaged lives here:

* one writer at a time: `RunLock` takes an exclusive `flock` on `DIR/.v4jax.lock` (released by the
  kernel when the process ends, crash included); a second run names the first one's pid and host;
* `metrics.jsonl` is read line by line: a torn last line (a run killed mid-write) is dropped with a
  warning, a damaged line elsewhere is an error naming the file and the line;
* nothing is written before the run is known to be resumable (the trainer checks the checkpoint first);
* a damaged checkpoint is named in one line, with the newest older step it could resume from
  (`--set resume_step=N`); steps after the one resumed from are moved aside (`N.superseded`), never
  deleted; directories of interrupted saves are named, not silently skipped;
* the learning-rate schedule is part of the checkpoint: resuming with other `steps` / `lr` / `warmup` /
  `end_lr_frac` is refused unless `schedule_change` says what to do (`extend`, `adopt`).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from .checkpoint import CheckpointError

LOCK_NAME = ".v4jax.lock"
SCHEDULE_KEYS = ("steps", "lr", "warmup", "end_lr_frac")


def one_line(e: BaseException, limit: int = 240) -> str:
    """The first line of an exception's message, cut to `limit` characters (no TensorStore dumps)."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------- the lock
class RunLock:
    """An exclusive lock on a run directory for the lifetime of one training process."""

    def __init__(self, out: str):
        self.path = os.path.join(out, LOCK_NAME)
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CheckpointError(f"{os.path.dirname(self.path)} is in use by another training run ({holder}): "
                                  "wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# ---------------------------------------------------------------------------- metrics.jsonl
def read_metrics(path: str, warn=print) -> list[dict]:
    """The records of a metrics file. A last line that does not parse (cut short by a kill) is dropped
    with a warning; a bad line before the last one means the file was damaged: CheckpointError."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    recs = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            if all(not x.strip() for x in lines[i + 1:]):
                warn(f"warning: {path}: dropped a torn last line ({len(raw)} bytes; the run was stopped mid-write)")
                break
            raise CheckpointError(f"{path}: line {i + 1} is not a metrics record ({one_line(e)})") from None
        recs.append(rec)
    return recs


def truncate_metrics(path: str, step: int, warn=print) -> None:
    """Keep the records up to `step` (a killed run may have logged steps its checkpoint does not
    hold); written to a temporary file and renamed over the old one."""
    if not os.path.exists(path):
        return
    keep = [r for r in read_metrics(path, warn) if r.get("step", 0) <= step]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))


def write_atomic(path: str, text: str) -> None:
    """`text` to `path` through a temporary file beside it (a reader sees the old or the new file)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:  # plain open: the file gets the user's umask
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- checkpoints
def incomplete_steps(out: str, committed) -> list[str]:
    """Directories in `out` that look like a step's but are not a committed checkpoint (a save that was
    interrupted, or a step whose commit marker is missing)."""
    if not os.path.isdir(out):
        return []
    done = {str(s) for s in committed}
    return sorted(n for n in os.listdir(out) if (n.isdigit() and n not in done) or ".orbax-checkpoint-tmp" in n)


def pick_step(steps: list[int], resume_step: int, out: str) -> tuple[int | None, list[int]]:
    """-> (the step to resume from, the later steps to move aside). resume_step -1: the latest."""
    if not steps:
        if resume_step >= 0:
            raise CheckpointError(f"{out}: resume_step={resume_step}, but there is no checkpoint to resume from")
        return None, []
    if resume_step < 0:
        return max(steps), []
    if resume_step not in steps:
        raise CheckpointError(f"{out}: no checkpoint at step {resume_step} (checkpoints: {sorted(steps)})")
    return resume_step, sorted(s for s in steps if s > resume_step)


def damaged_message(out: str, step: int, err: BaseException, older: int | None) -> str:
    text = f"checkpoint {out}/{step} is damaged ({one_line(err)})"
    if older is None:
        return text + "; there is no older checkpoint: start a new --out"
    return (text + f"; the newest older checkpoint is step {older}: resume from it with --set resume_step={older} "
            f"(the later steps are then moved aside to {out}/<step>.superseded, nothing is deleted)")


def move_aside(out: str, steps: list[int], log=print) -> None:
    for s in steps:
        dst = os.path.join(out, f"{s}.superseded")
        n = 1
        while os.path.exists(dst):
            n += 1
            dst = os.path.join(out, f"{s}.superseded.{n}")
        os.rename(os.path.join(out, str(s)), dst)
        log(f"moved {out}/{s} aside to {dst} (resuming from an earlier step)")


# ---------------------------------------------------------------------------- the LR schedule
def schedule_steps(saved_run: dict | None, rc, where: str, log=print) -> int:
    """The `total_steps` of the LR schedule a resumed run continues with.

    The schedule of a checkpoint is its run's (steps, lr, warmup, end_lr_frac). Resuming with the same
    values, or from a run saved before the schedule was recorded, changes nothing. Otherwise
    `rc.schedule_change` decides: "refuse" (default) stops with a message naming the change; "extend"
    (only `steps` grown) keeps the saved schedule, whose learning rate stays at its final value after
    the saved last step; "adopt" takes the new values as given, announced in the log."""
    if not saved_run or not all(k in saved_run for k in SCHEDULE_KEYS):
        return rc.steps
    saved_total = saved_run.get("schedule_total_steps", saved_run["steps"])  # an extended run's decay end
    diff = [k for k in SCHEDULE_KEYS if saved_run[k] != getattr(rc, k)]
    if not diff:
        return saved_total
    change = ", ".join(f"{k} {saved_run[k]} -> {getattr(rc, k)}" for k in diff)
    if rc.schedule_change == "adopt":
        log(f"note: {where}: the learning-rate schedule changes on resume ({change}); schedule_change=adopt")
        return rc.steps
    if rc.schedule_change == "extend" and diff == ["steps"] and rc.steps > saved_run["steps"]:
        log(f"note: {where}: steps {saved_run['steps']} -> {rc.steps} with schedule_change=extend: the learning "
            f"rate stays at its final value ({rc.end_lr_frac * rc.lr:.3g}) after step {saved_total}")
        return saved_total
    hint = ("--set schedule_change=extend (keep the decay, then hold its final rate) or " if diff == ["steps"] else "")
    raise CheckpointError(f"{where} was trained with another learning-rate schedule ({change}): resuming would "
                          f"change the rate from the next step on. Pass {hint}--set schedule_change=adopt "
                          "(take the new schedule as given), or keep the run's settings")
