"""Where a training run's metrics go: `metrics.jsonl` (one JSON object per line, the machine-readable
record every tool here reads), TensorBoard event files in the run directory (tensorboardX), and,
when asked for (`wandb_project`), Weights & Biases.

`RunLog.write(line)` takes the JSON lines the trainer writes (step records and events) and forwards
each to the dashboards: a step record's numbers become scalars (`train/loss`, `train/lr`,
`perf/tokens_per_sec`, `perf/mfu` on a chip of known peak, ...), its per-layer `max_load_ratio` a
histogram; an event (`loss_spike`, `loss_spike_accepted`, ...) becomes text under `events`.
`RunLog.expert_load(step, load_le)` draws the per-layer expert load [L, E] as an image (rows =
routed layers, columns = experts, brightness = share of the layer's assignments) and a histogram.
A resumed run purges the dashboards' records from its resume step on (`purge_step`), as the trainer
truncates `metrics.jsonl`, so a killed run's replayed steps are not shown twice.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .validate import ConfigError

SCALARS = {"loss": "train/loss", "ce": "train/ce", "mtp": "train/mtp", "balance": "train/balance",
           "indexer_kl": "train/indexer_kl", "lr": "train/lr", "grad_norm": "train/grad_norm",
           "tokens_per_sec": "perf/tokens_per_sec", "mfu": "perf/mfu", "seq_len": "train/seq_len"}


def _wandb(project: str, out: str, config: dict):
    try:
        import wandb
    except ImportError:
        raise ConfigError(f"run setting 'wandb_project' ({project!r}) needs the wandb package: pip install wandb")
    return wandb.init(project=project, dir=out, config=config)


class RunLog:
    """metrics.jsonl + TensorBoard (+ W&B) for one process; `enabled=False` (not process 0) writes nothing."""

    def __init__(self, out: str, start: int, enabled: bool = True, tensorboard: bool = True,
                 wandb_project: str | None = None, config: dict | None = None):
        self.enabled = enabled
        self.file = open(os.path.join(out, "metrics.jsonl") if enabled else os.devnull, "a")
        self.tb = self.wb = None
        try:
            if enabled and wandb_project:  # first: a missing package leaves nothing open
                self.wb = _wandb(wandb_project, out, config or {})
            if enabled and tensorboard:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(logdir=out, purge_step=start + 1 if start else None, flush_secs=30)
        except BaseException:
            self.file.close()
            raise

    def write(self, line: str) -> None:
        self.file.write(line)  # a whole line per call
        if self.tb is None and self.wb is None:
            return
        rec = json.loads(line)
        step = int(rec.get("step", 0))
        if "event" in rec:
            if self.tb is not None:
                self.tb.add_text("events", json.dumps(rec), step)
            if self.wb is not None:
                self.wb.log({f"events/{rec['event']}": 1}, step=step)
            return
        scalars = {tag: float(rec[k]) for k, tag in SCALARS.items() if isinstance(rec.get(k), (int, float))}
        if self.tb is not None:
            for tag, v in scalars.items():
                self.tb.add_scalar(tag, v, step)
            if rec.get("max_load_ratio"):
                self.tb.add_histogram("balance/max_load_ratio_per_layer", np.asarray(rec["max_load_ratio"]), step)
            if rec.get("anticipatory_routing"):
                self.tb.add_scalar("train/anticipatory_routing", 1.0, step)
        if self.wb is not None:
            self.wb.log(scalars, step=step)

    def expert_load(self, step: int, load_le) -> None:
        """Per-layer expert load [L, E] (each row sums to 1) as an image and a histogram of load x E."""
        if self.tb is None:
            return
        load = np.asarray(load_le, np.float32)
        img = load / max(float(load.max()), 1e-9)
        self.tb.add_image("balance/expert_load", img[None], step, dataformats="CHW")
        self.tb.add_histogram("balance/expert_load_x_experts", load.reshape(-1) * load.shape[-1], step)

    def flush(self) -> None:
        """The metrics file now (a reader polling it sees every finished step); the dashboards flush
        on their own every 30 s and at close."""
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Progress:
    """Training progress: a tqdm bar (loss, tokens/s, ETA) when `bar` (stdout is a terminal), else a
    plain line at the first step, every `every` steps and at the last. The ETA is left out until two
    steps after the first (mostly compile time) have been timed."""

    def __init__(self, total: int, start: int, every: int, log=print, bar: bool = False):
        self.total, self.start, self.every, self.log = total, start, every, log
        self.t_first = None
        self.bar = None
        if bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def note(self, text: str) -> None:
        """An event line (spike, rollback), printed above the bar."""
        if self.bar is not None:
            self.bar.write(text)
        else:
            self.log(text)

    def eta(self, step: int) -> str:
        timed = step - self.start - 1
        if self.t_first is None or timed < 2:
            return "     -"
        import time
        return f"{(time.time() - self.t_first) / timed * (self.total - step):6.0f}s"

    def update(self, step: int, rec: dict, ar: bool) -> None:
        import time
        self.t_first = time.time() if self.t_first is None else self.t_first
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                                 tok_s=f"{rec['tokens_per_sec']:.0f}", refresh=True)
            return
        if step % self.every == 0 or step == self.start + 1 or step == self.total:
            self.log(f"step {step:6d}  loss {rec['loss']:7.4f}  lr {rec['lr']:.2e}  {rec['tokens_per_sec']:9.0f} tok/s  "
                     f"ETA {self.eta(step)}" + ("  [anticipatory routing]" if ar else ""))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
    """"A:B" -> (A, B), 1 <= A <= B (the steps a profiler trace covers); "" -> None."""
    if not spec:
        return None
    a, sep, b = spec.partition(":")
    try:
        lo, hi = int(a), int(b) if sep else int(a)
    except ValueError:
        lo = hi = 0
    if not 1 <= lo <= hi:
        raise ConfigError(f"run setting 'profile_steps': expected A:B with 1 <= A <= B (steps), got {spec!r}")
    return lo, hi


class Trace:
    """A jax.profiler trace of steps A..B of a run (`profile_steps`), written to `directory` as
    TensorBoard's profile plugin reads it (plugins/profile/<time>/*.xplane.pb) plus a Perfetto trace."""

    def __init__(self, spec: str, directory: str, note=print):
        self.span, self.dir, self.note, self.on = parse_profile_steps(spec), directory, note, False

    def before(self, step: int) -> None:
        if self.span and not self.on and self.span[0] <= step <= self.span[1]:
            import jax
            jax.profiler.start_trace(self.dir, create_perfetto_trace=True)
            self.on = True

    def after(self, step: int) -> None:
        if self.on and step >= self.span[1]:
            self.stop()
            self.note(f"profile of steps {self.span[0]}:{self.span[1]} written to {self.dir} "
                      f"(tensorboard --logdir {self.dir}, or its perfetto_trace.json.gz in ui.perfetto.dev)")
            self.span = None  # once

    def stop(self) -> None:
        if self.on:
            import jax
            jax.profiler.stop_trace()
            self.on = False
