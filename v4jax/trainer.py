"""The training loop behind `train.py`: run configuration, sharded state, checkpoints with exact
resume, the loss-spike detector with rollback and anticipatory routing, progress and metrics.

Run-configuration schedules: recipe phases (`phases`), sequence-length stages (`seq_stages`), gradient
accumulation (`grad_accum`) and quantisation-aware training (`qat`); see RunConfig.

Checkpoints (orbax CheckpointManager, asynchronous, keep-N, atomic) hold the whole train state
(parameters, optimiser state, balancing biases, router ring, step) plus a JSON record with the
model config, the data-iterator state and the spike-detector state, so a run killed at any moment
resumes from its last checkpoint and logs the same losses as an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import time
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from . import data as data_lib
from .data import StagedBatches
from . import model as M
from . import optim
from . import rundir
from .runspec import QAT_OPTIONS, parse_phases, parse_qat, parse_seq_stages  # noqa: F401
from .flops import peak_flops
from .runlog import Progress, RunLog, Trace, parse_profile_steps
from .spikes import MAX_ROLLBACKS, ROLLBACK_LIMIT, ROLLBACK_WINDOW, RollbackBudget, SpikeDetector  # noqa: F401
from . import training as T
from .checkpoint import CheckpointError
from .config import ModelConfig
from .validate import RUN_KEYS, ConfigError, check, near_miss, parse_text
from .sharding import batch_sharding, make_mesh, state_shardings
from .stack import restack_pure

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class RunConfig:
    config: str = os.path.join(_ROOT, "configs", "tiny.json")  # hub-schema model config.json
    steps: int = 120  # optimiser steps in all (the LR schedule decays over them)
    batch: int = 8  # sequences per step per host
    seq_len: int = 128  # tokens per sequence (a multiple of every compression ratio)
    lr: float = 3e-3  # peak learning rate (Muon and AdamW)
    warmup: int | None = None  # None: min(12, steps // 4) (a short run still warms up and decays)
    end_lr_frac: float = 0.1  # final learning rate of the cosine decay, as a fraction of lr
    weight_decay: float = 0.1  # decoupled weight decay (Muon and AdamW)
    clip_norm: float = 1.0  # global gradient-norm clip (<= 0: none)
    seed: int = 0  # parameter initialisation and data order
    out: str = "runs/default"  # run directory: checkpoints, metrics.jsonl, config.json
    save_every: int = 50  # checkpoint every N steps (0: only the last)
    keep: int = 3  # checkpoints kept (>= 1: the latest is never deleted)
    resume_step: int = -1  # -1: resume from the latest checkpoint; N: from step N (later steps moved aside)
    # resuming with another LR schedule (steps, lr, warmup, end_lr_frac): "refuse"; "extend" (more steps:
    # the saved decay, then its final rate); "adopt" (the new schedule as given, announced)
    schedule_change: str = "refuse"
    mesh: str | None = None  # "data=A,fsdp=B,expert=C,tensor=D" (None: all devices on data)
    data: str | None = None  # None: the Python standard library's own sources
    data_max_bytes: int = 4_000_000  # bytes of the default corpus to read
    tokenizer: str | None = None  # None: byte tokenizer
    log_every: int = 10  # a progress line every N steps
    bias_gamma: float = 1e-3  # aux-loss-free balancing: bias step per update
    balance_alpha: float = 1e-4  # weight of the sequence-wise balance loss
    mtp_weight: float = 0.3  # MTP loss weight during the warm-up
    mtp_weight_late: float = 0.1  # MTP loss weight after the warm-up
    spike_detect: bool = True  # roll back to a snapshot on a loss spike
    spike_window: int = 20  # steps in the recent-loss mean
    # a loss above factor x the recent mean is a spike (so is a non-finite one); 2.0 lets a hard stretch
    # of data pass (the default corpus has one near step 90 at 1.8x the mean) and catches divergence
    spike_factor: float = 2.0
    snapshot_every: int = 10  # in-memory rollback point, taken when the recent losses look healthy
    ar_delta: int = 2  # anticipatory routing lag (0 = off)
    ar_steps: int = 20  # steps of anticipatory routing after a spike
    inject_spike_at: int = -1  # testing: perturb the parameters after this step's update
    # sparse-attention recipe: "dense:N1,indexer_warmup:N2,sparse" = dense CSA until step N1, indexer-only
    # KL warm-up until N2, then top-k with the KL on the selected entries. "" = sparse, no indexer loss.
    phases: str = ""
    indexer_kl_weight: float = 1.0  # weight of the indexer KL loss (recipe phases)
    sample_tokens: int = 48  # greedy sample printed at the end (0: none)
    tensorboard: bool = True  # TensorBoard event files in `out` (besides metrics.jsonl)
    # "A:B": a jax.profiler trace of steps A..B into out/profile (TensorBoard's profile plugin, Perfetto)
    profile_steps: str = ""
    wandb_project: str | None = None  # also log to Weights & Biases (needs the wandb package)
    # sequence-length stages: "4096:N1,16384:N2,65536" = seq_len 4096 until step N1, 16384 until N2, then
    # 65536 (counts in optimiser steps, like `phases`); "" = `seq_len` throughout, which is ignored
    # otherwise. `batch` (sequences) stays fixed, so the tokens per step grow with the sequence length.
    seq_stages: str = ""
    # micro-batches per optimiser step: a step takes batch x grad_accum rows per host (one metrics line,
    # one LR step, one balancing-bias move); the activations are those of `batch` rows.
    grad_accum: int = 1
    # quantisation-aware training, any of "fp8_linear,fp4_experts,fp4_indexer" ("" = off): FP8 Linear
    # layers (1x128 activations, 128x128 weights); MXFP4 routed-expert weights; the official FP8-KV /
    # FP4-indexer-q/k simulation (ModelConfig.qat_sim). Straight-through gradients; may be switched on
    # when resuming (a late-stage QAT run).
    qat: str = ""
    # kernels and MoE dispatch (ModelConfig run-time keys; not part of the checkpoint)
    attention_kernel: str = "jnp"  # CSA sparse branch: jnp | pallas_tpu | pallas_gpu
    moe_impl: str = "auto"  # auto | dense | gather | grouped | ep
    moe_kernel: str = "jnp"  # grouped expert matmuls: jnp | ragged_dot | megablox
    moe_capacity_factor: float = 0.0  # "ep" slots per (device, expert) in units of the fair share; 0 = exact
    scan_layers: bool = True  # layers of one kind under one lax.scan (False: unrolled; resume with the same)
    remat: str = "none"  # "layer": recompute each layer in the backward (activation memory of one layer)
    dtype: str = "float32"  # compute dtype (bfloat16 on accelerators); parameters stay in param_dtype
    param_dtype: str = "float32"

    def __post_init__(self):
        self.validate()
        if self.warmup is None:
            self.warmup = min(12, self.steps // 4)
        parse_profile_steps(self.profile_steps)
        if self.warmup >= self.steps:
            raise ConfigError(f"run setting 'warmup': {self.warmup} warm-up steps leave no decay in a run of "
                              f"{self.steps} steps (warmup must be < steps)")

    def validate(self, where: str = "run setting") -> None:
        """Every setting's type and range (validate.RUN_KEYS), before anything is built or compiled."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, check(f.name, getattr(self, f.name), RUN_KEYS[f.name], where))

    @classmethod
    def load(cls, toml_path: str | None, overrides: list[str], **flags) -> "RunConfig":
        values = _read_toml(toml_path) if toml_path else {}
        for item in overrides:
            k, sep, v = item.partition("=")
            if not sep or k not in RUN_KEYS:
                hint = near_miss(k, RUN_KEYS) if sep else None
                raise ConfigError(f"--set {item}: expected key=value with key one of {sorted(RUN_KEYS)}"
                                  + (f" (did you mean '{hint}'?)" if hint else ""))
            values[k] = parse_text(k, v, RUN_KEYS[k])
        values.update({k: v for k, v in flags.items() if v is not None})
        return cls(**values)


def _read_toml(path: str) -> dict:
    """A run TOML's settings, each checked against its type (TOML values are typed: no coercion)."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:  # missing, a directory, unreadable
        raise ConfigError(f"{path}: cannot read the run file ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    for k, v in raw.items():
        if k not in RUN_KEYS:
            hint = near_miss(k, RUN_KEYS)
            raise ConfigError(f"{path}: unknown run setting '{k}'" + (f" (did you mean '{hint}'?)" if hint else ""))
        check(k, v, RUN_KEYS[k], f"{path}: run setting")
    return raw


# ---------------------------------------------------------------------------- the trainer
class Trainer:
    """The training run of a RunConfig. `devices` (default jax.devices()) are the mesh's devices;
    `abstract=True` builds everything but the data and the arrays: the train state is
    ShapeDtypeStructs with their shardings (nothing allocated), for `compile_plan` on the
    abstract devices of a TPU slice (`aot.tpu_devices`)."""

    def __init__(self, rc: RunConfig, devices=None, abstract: bool = False):
        self.rc = rc
        self.cfg = ModelConfig.from_hub(rc.config, **parse_qat(rc.qat), attention_kernel=rc.attention_kernel,
                                        moe_impl=rc.moe_impl, moe_kernel=rc.moe_kernel, scan_layers=rc.scan_layers,
                                        remat=rc.remat, dtype=rc.dtype, param_dtype=rc.param_dtype,
                                        moe_capacity_factor=rc.moe_capacity_factor)
        self.mesh = make_mesh(rc.mesh, devices) if rc.mesh else make_mesh({"data": 1}, devices)
        self.tokenizer = data_lib.load_tokenizer(rc.tokenizer)
        if self.tokenizer.vocab_size > self.cfg.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} tokens, the model's vocab_size is "
                             f"{self.cfg.vocab_size}")
        align = math.lcm(*[r for r in self.cfg.compress_ratios if r] or [1])
        if rc.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {rc.grad_accum}")
        self.stages = parse_seq_stages(rc.seq_stages, rc.steps) if str(rc.seq_stages) else [(rc.seq_len, rc.steps)]
        for seq_len, _ in self.stages:
            if seq_len % align:
                raise ValueError(f"seq_len {seq_len} must be a multiple of {align} (every compression ratio)")
        if not abstract:
            sources = rc.data or data_lib.default_corpus_files(rc.data_max_bytes)
            self.data = StagedBatches(sources, self.tokenizer, rc.batch * rc.grad_accum,
                                      [s for s, _ in self.stages], rc.seed, jax.process_index(),
                                      jax.process_count(), align=align)
        # gradient accumulation runs inside the step (a scan over micro-batches), so the optimiser is the
        # plain one (OptimConfig.grad_accum = 1, no MultiSteps): one update per step
        self.ocfg = ocfg = optim.OptimConfig(peak_lr=rc.lr, warmup_steps=rc.warmup, total_steps=rc.steps,
                                 end_lr_frac=rc.end_lr_frac, weight_decay=rc.weight_decay,
                                 adam_weight_decay=rc.weight_decay, clip_norm=rc.clip_norm)
        self.schedule = optim.lr_schedule(ocfg)
        self.lcfg = T.LossConfig(mtp_weight=rc.mtp_weight, mtp_weight_late=rc.mtp_weight_late,
                                 mtp_late_step=rc.warmup, balance_alpha=rc.balance_alpha,
                                 bias_gamma=rc.bias_gamma, ar_delta=rc.ar_delta, eos_id=self.tokenizer.eos_id)
        model = M.abstract(self.cfg) if abstract else M.build(self.cfg, seed=rc.seed)
        self.graphdef, params, _ = nnx.split(model, nnx.Param, ...)
        self._skeleton = nnx.split(M.abstract(self.cfg), nnx.Param, ...)[1]  # roles, for a schedule change
        self.tx = optim.make_optimizer(params, ocfg)
        if abstract:
            self.ts = self._place_abstract(jax.eval_shape(lambda: T.init_train_state(M.build(self.cfg), self.tx,
                                                                                     self.lcfg)))
        else:
            self.ts = self._place(T.init_train_state(model, self.tx, self.lcfg))
        self.sharding = jax.tree.map(lambda x: x.sharding, self.ts)
        self.phases = parse_phases(rc.phases, rc.steps)
        self._step_fns = {}
        self.detector = SpikeDetector(rc.spike_window, rc.spike_factor)
        self._peak = peak_flops(self.mesh.devices.flat[0].device_kind)
        self._flops_cache = {}
        if not abstract:
            self.manager = ocp.CheckpointManager(
                os.path.abspath(rc.out),
                options=ocp.CheckpointManagerOptions(max_to_keep=rc.keep, enable_async_checkpointing=True))

    def _place(self, ts: dict) -> dict:
        """Parameters and biases by the rules table; the optimiser state's moments like their parameters
        (`_opt_shardings`), its counters and the router ring replicated."""
        sh = {"params": state_shardings(ts["params"], self.mesh), "rest": state_shardings(ts["rest"], self.mesh)}
        ts = dict(ts, params=jax.device_put(ts["params"], sh["params"]), rest=jax.device_put(ts["rest"], sh["rest"]))
        repl = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        ts["opt"] = jax.jit(self.tx.init, out_shardings=self._opt_shardings(ts["params"]))(ts["params"])
        ts["step"] = jax.device_put(ts["step"], repl)
        ts["router_ring"] = jax.device_put(ts["router_ring"], repl)
        return ts

    def _opt_shardings(self, params):
        """Shardings of the optimiser state: every params-shaped moment (Muon momentum, Adam mu / nu)
        sharded like its parameter, everything else (counters) replicated. (XLA, left to itself,
        replicates the outputs of `tx.init`: zeros tied to nothing.)"""
        repl = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        keystr = jax.tree_util.keystr
        by_path = {keystr(p): (leaf.shape, sh) for (p, leaf), sh in zip(
            jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(state_shardings(params, self.mesh)))}

        def one(path, leaf):  # a moment's path ends with its parameter's path (".trace['stack'][0]...")
            for k in range(len(path)):
                shape, sh = by_path.get(keystr(path[k:]), (None, None))
                if shape == leaf.shape:
                    return sh
            return repl

        return jax.tree_util.tree_map_with_path(one, jax.eval_shape(self.tx.init, params))

    def _place_abstract(self, ts: dict) -> dict:
        """`_place` for ShapeDtypeStructs (the same shardings, nothing allocated)."""
        sds = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)  # noqa: E731
        repl = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        params = jax.tree.map(sds, ts["params"], state_shardings(ts["params"], self.mesh))
        rest = jax.tree.map(sds, ts["rest"], state_shardings(ts["rest"], self.mesh))
        return {"params": params, "rest": rest, "opt": jax.tree.map(sds, ts["opt"], self._opt_shardings(params)),
                "step": sds(ts["step"], repl), "router_ring": jax.tree.map(lambda x: sds(x, repl), ts["router_ring"])}

    def compile_plan(self, phase: str | None = None, seq_len: int | None = None) -> dict:
        """Compile the train step of `phase` (default: the first) at `seq_len` (default: the last stage's)
        on this trainer's (abstract) mesh -> `aot.compile_report` plus the run's shape."""
        from . import aot
        from .flops import step_flops
        phase = self.phases[0][0] if phase is None else phase
        seq_len = self.stages[-1][0] if seq_len is None else seq_len
        rows = self.rc.batch * self.rc.grad_accum * jax.process_count()
        batch = {k: jax.ShapeDtypeStruct((rows, seq_len), jnp.int32, sharding=batch_sharding(self.mesh, (rows, seq_len)))
                 for k in ("tokens", "segment_ids", "positions")}
        ar = jax.ShapeDtypeStruct((), jnp.bool_)
        with jax.set_mesh(self.mesh):
            t0 = time.time()
            lowered = self.step_fn(phase).lower(self.ts, batch, ar)
            lower_s = time.time() - t0
        devices = list(self.mesh.devices.flat)
        rep = aot.compile_report(lowered, devices, step_flops(self.cfg, seq_len, rows)["total"])
        rep.update(lower_s=round(lower_s, 1), mesh=dict(self.mesh.shape), phase=phase or "sparse",
                   seq_len=seq_len, batch_rows=rows, params=M.count_params(self.cfg)["total"])
        return rep

    # ------------------------------------------------------------------ checkpoints
    def _meta(self) -> dict:
        return {"model_config": self.cfg.to_hub(), "data": self.data.get_state(),
                "detector": self.detector.state(),
                "run": {**dataclasses.asdict(self.rc), "schedule_total_steps": self.ocfg.total_steps}}

    def save(self, step: int):
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(self.ts),
                                                        meta=ocp.args.JsonSave(self._meta())))

    def restore_latest(self, log=print) -> int:
        """Resume from the latest checkpoint (or `resume_step`) -> its step (0: a new run). Refuses, in
        one line and before any file is written, a damaged checkpoint (naming the newest older one),
        another model config, an older layout or a changed LR schedule (`rundir.schedule_steps`)."""
        out, steps = self.rc.out, list(self.manager.all_steps())
        for name in rundir.incomplete_steps(out, steps):
            log(f"note: {out}/{name} is not a complete checkpoint (an interrupted save): ignored")
        step, later = rundir.pick_step(steps, self.rc.resume_step, out)
        if step is None:
            return 0
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - any orbax/IO failure means a damaged checkpoint
            raise CheckpointError(rundir.damaged_message(out, step, e, self._older_readable(step))) from None
        _check_same_model(meta["model_config"], self.cfg.to_hub(), f"{out}/{step}")
        if _unstacked_layout(self.manager, step):
            raise CheckpointError(f"checkpoint {out}/{step} was written before v4jax's scanned layer stack "
                                  "(per-layer parameter trees): it cannot be resumed by this version. Its weights "
                                  "still load for inference (infer.py --checkpoint); to train on, start a new --out")
        total = rundir.schedule_steps(meta.get("run"), self.rc, f"checkpoint {out}/{step}", log)
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.ts, self.sharding)
        try:
            self.ts = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target)))["state"]
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(rundir.damaged_message(out, step, e, self._older_readable(step))
                                  .replace("is damaged", "is damaged or does not fit")) from None
        if total != self.ocfg.total_steps:
            self._set_schedule(total)
        if later:  # resuming from an earlier step: the later ones are moved aside (kept), by one process
            if jax.process_index() == 0:
                rundir.move_aside(out, later, log)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils
                multihost_utils.sync_global_devices("v4jax: later checkpoints moved aside")
            self.manager.reload()
        self.data.set_state(meta["data"])
        self.detector = SpikeDetector(self.rc.spike_window, self.rc.spike_factor, **meta["detector"])
        return step

    def _older_readable(self, step: int) -> int | None:
        """The newest checkpoint before `step` whose record reads (offered when `step` is damaged)."""
        for s in sorted((s for s in self.manager.all_steps() if s < step), reverse=True):
            try:
                self.manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
                return s
            except Exception:  # noqa: BLE001
                continue
        return None

    def _set_schedule(self, total_steps: int):
        """Rebuild the optimiser on a schedule of `total_steps` (same state structure, new step functions)."""
        self.ocfg = dataclasses.replace(self.ocfg, total_steps=total_steps)
        self.schedule = optim.lr_schedule(self.ocfg)
        self.tx = optim.make_optimizer(self._skeleton, self.ocfg)
        self._step_fns = {}

    # ------------------------------------------------------------------ the loop
    def _batch(self, seq_len: int) -> dict:
        host = self.data.take(seq_len)
        rows = self.rc.batch * self.rc.grad_accum * jax.process_count()
        return {k: jax.make_array_from_process_local_data(batch_sharding(self.mesh, (rows,) + v.shape[1:]), v)
                for k, v in host.items()}

    def _snapshot(self, step):
        return step, jax.tree.map(jnp.copy, self.ts)  # model state only: the data stream never rewinds

    def run(self, log=print, bar: bool = False) -> dict:
        """Train to `rc.steps` (resuming from the run directory) -> the last step's metrics record.
        `log` takes the progress and event lines; `bar`: a tqdm bar instead of progress lines."""
        rc = self.rc
        os.makedirs(rc.out, exist_ok=True)
        writer = jax.process_index() == 0  # one process writes the shared files (orbax coordinates checkpoints)
        lock = rundir.RunLock(rc.out).acquire() if writer else None
        try:
            start = self.restore_latest(log)  # everything that can refuse the run, before a file is written
            self._write_model_config()
            if writer:
                rundir.truncate_metrics(os.path.join(rc.out, "metrics.jsonl"), start, log)
            if start:
                log(f"resumed from {rc.out} at step {start}")
            with RunLog(rc.out, start, writer, rc.tensorboard, rc.wandb_project, dataclasses.asdict(rc)) as mlog:
                progress = Progress(rc.steps, start, rc.log_every, log, bar and writer)
                try:
                    last = self._loop(start, mlog, progress)
                finally:
                    progress.close()
            self.manager.wait_until_finished()
        finally:
            if lock:
                lock.release()
        return last

    def _loop(self, start: int, mlog, progress) -> dict:
        rc = self.rc
        snaps, self._retries = [self._snapshot(start)], 0  # rollback points (the last two), rollbacks in a row
        budget = RollbackBudget()
        trace = Trace(rc.profile_steps, os.path.join(rc.out, "profile"), progress.note)
        last, step = {}, start
        regime = (self.phase_at(start), self.seq_len_at(start))
        while step < rc.steps:
            trace.before(step + 1)
            ar = self.detector.ar_left > 0
            phase, seq_len = self.phase_at(step), self.seq_len_at(step)
            if (phase, seq_len) != regime:  # the loss level moves on purpose: no spike against the old one
                regime = (phase, seq_len)
                self.detector.rebase()
            t0 = time.time()
            batch = self._batch(seq_len)
            with jax.set_mesh(self.mesh):  # lets the MoE pick the expert-parallel dispatch (moe.ep_layout)
                self.ts, met = self.step_fn(phase)(self.ts, batch, jnp.asarray(ar))
            loss = float(met["loss"])
            dt = time.time() - t0
            budget.tick()
            if rc.spike_detect and self.detector.is_spike(loss):
                budget.spend(step + 1, loss, rc)
                back = self._on_spike(snaps, step, loss, mlog, progress.note)
                if back is not None:
                    step = back
                    continue
            self.detector.observe(loss)
            self._retries = 0
            step += 1
            last = self._log_step(step, met, dt, ar, phase, seq_len, mlog, progress)
            trace.after(step)
            if rc.save_every and step % rc.save_every == 0 or step == rc.steps:
                self.save(step)
            if step == rc.inject_spike_at and not self.detector.events:
                self._inject_spike()  # testing hook, once: damages the state the snapshot below takes
            if step % rc.snapshot_every == 0 and not ar:
                snaps = (snaps + [self._snapshot(step)])[-2:]
        trace.stop()
        return last

    def _log_step(self, step, met, dt, ar, phase, seq_len, mlog, progress) -> dict:
        """One step's record -> metrics.jsonl and the dashboards (every step), the progress line or bar."""
        rc = self.rc
        rows = rc.batch * rc.grad_accum * jax.process_count()
        rec = dict(_record(step, met, float(self.schedule(step - 1)), rows * seq_len / dt, ar), phase=phase,
                   seq_len=seq_len)
        if self._peak:  # model FLOP utilisation on a chip of known peak (the first step includes compile)
            rec["mfu"] = self._flops(seq_len, rows) / dt / (self._peak * self.mesh.devices.size)
        mlog.write(json.dumps(rec) + "\n")  # one whole line per write, flushed
        mlog.flush()
        if "expert_load" in met and (step % rc.log_every == 0 or step == rc.steps):
            mlog.expert_load(step, np.asarray(met["expert_load"]))
        progress.update(step, rec, ar)
        return rec

    def _flops(self, seq_len: int, rows: int) -> float:
        from .flops import step_flops
        key = (seq_len, rows)
        if key not in self._flops_cache:
            self._flops_cache[key] = step_flops(self.cfg, seq_len, rows)["total"]
        return self._flops_cache[key]

    def phase_at(self, step: int) -> str:
        return next(name for name, until in self.phases if step < until)

    def seq_len_at(self, step: int) -> int:
        return next(seq_len for seq_len, until in self.stages if step < until)

    def step_fn(self, phase: str):
        """The jitted step of a recipe phase (compiled on first use of each batch shape, kept by jit)."""
        if phase not in self._step_fns:
            kw = {"dense": dict(csa_mode="dense"), "indexer_warmup": dict(csa_mode="dense", indexer_loss=True),
                  "sparse": dict(indexer_loss=bool(self.rc.phases)), "": {}}[phase]
            graphdef = nnx.graphdef(M.abstract(dataclasses.replace(self.cfg, **kw)))
            lcfg = dataclasses.replace(self.lcfg, indexer_kl_weight=self.rc.indexer_kl_weight,
                                       lm_loss=phase != "indexer_warmup")
            mask = T.indexer_only_mask(self.ts["params"]) if phase == "indexer_warmup" else None
            self._step_fns[phase] = T.make_train_step(graphdef, self.tx, lcfg, self.sharding, None, mask,
                                                      grad_accum=self.rc.grad_accum)
        return self._step_fns[phase]

    def _on_spike(self, snaps, step, loss, mlog, log):
        """Roll back -> the step to continue from; or None: the loss is accepted (logged) after
        `MAX_ROLLBACKS` rollbacks in a row. A rollback point whose very next step spikes again is itself
        damaged (the update just before the snapshot went wrong): it is dropped for the older one."""
        if self._retries >= MAX_ROLLBACKS:
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step + 1} after {MAX_ROLLBACKS} rollbacks in a row: "
                                         f"stopping (checkpoints in {self.rc.out} are untouched)")
            self._retries = 0
            event = {"step": step + 1, "event": "loss_spike_accepted", "loss": loss if math.isfinite(loss) else str(loss)}
            mlog.write(json.dumps(event) + "\n")
            log(f"loss spike at step {step + 1} (loss {loss:.4f}) again after {MAX_ROLLBACKS} rollbacks: accepted")
            return None
        if self._retries and len(snaps) > 1:
            snaps.pop()
        self._retries += 1
        return self._rollback(snaps[-1], step, loss, mlog, log)

    def _rollback(self, snap, step, loss, mlog, log) -> int:
        self.detector.events += 1
        self.detector.ar_left = self.rc.ar_steps if self.rc.ar_delta > 0 else 0
        back, ts = snap
        # the model state goes back; the data stream does not: the batches that led to the spike are
        # skipped (replaying them from the same state reproduces the same spike, deterministically)
        self.ts = jax.tree.map(jnp.copy, ts)
        event = {"step": step + 1, "event": "loss_spike", "loss": loss if math.isfinite(loss) else str(loss),
                 "rolled_back_to": back, "anticipatory_routing_steps": self.detector.ar_left}
        mlog.write(json.dumps(event) + "\n")
        log(f"loss spike at step {step + 1} (loss {loss:.4f}): rolled back to step {back}, "
            f"anticipatory routing for {self.detector.ar_left} steps")
        return back

    def _inject_spike(self):
        key = jax.random.key(1234)
        leaves, tdef = jax.tree.flatten(self.ts["params"])
        noisy = [x + 0.5 * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
                 if x.ndim >= 2 else x for i, x in enumerate(leaves)]
        self.ts = dict(self.ts, params=jax.tree.unflatten(tdef, noisy))

    def _write_model_config(self):
        if jax.process_index() == 0:
            rundir.write_atomic(os.path.join(self.rc.out, "config.json"), json.dumps(self.cfg.to_hub(), indent=2))

    def model(self) -> M.Transformer:
        return nnx.merge(self.graphdef, self.ts["params"], self.ts["rest"])


def _record(step, met, lr, tps, ar) -> dict:
    rec = {"step": step, "loss": float(met["loss"]), "ce": float(met["ce"]), "mtp": float(met["mtp"]),
           "balance": float(met["balance"]), "indexer_kl": float(met["indexer_kl"]), "lr": lr, "grad_norm": float(met["grad_norm"]),
           "tokens_per_sec": tps, "anticipatory_routing": bool(ar)}
    if "max_load_ratio" in met:
        rec["max_load_ratio"] = [round(float(x), 4) for x in np.asarray(met["max_load_ratio"])]
    return rec


def _check_same_model(saved: dict, current: dict, where: str):
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if diff:
        k = diff[0]
        raise CheckpointError(f"checkpoint {where} was written for another model config: '{k}' is "
                              f"{saved.get(k)!r} there, {current.get(k)!r} now")


def _unwrap_values(tree):
    """Orbax stores each nnx Variable as {"value": array}; -> the plain nested dict of arrays."""
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return tree["value"]
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _unwrap_values(v) for k, v in tree.items()}
    return tree


def _unstacked_layout(manager, step: int) -> bool:
    """True when a checkpoint's parameters are per-layer trees ("layers"), the layout before `stack`."""
    try:
        meta = manager.item_metadata(step)
        tree = meta["state"] if "state" in meta else meta
        tree = getattr(tree, "tree", tree)
        return "layers" in tree["params"]
    except Exception:  # noqa: BLE001 - no readable metadata: let the restore report it
        return False


def load_trained(out_dir: str, step: int | None = None, **runtime) -> M.Transformer:
    """The model saved by a training run in `out_dir` (latest step by default), for inference."""
    path = os.path.join(out_dir, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{out_dir}: not a v4jax training directory (no config.json)")
    cfg = ModelConfig.from_hub(path, **runtime)
    mgr = ocp.CheckpointManager(os.path.abspath(out_dir))
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"{out_dir}: no training checkpoint")
    try:
        raw = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{out_dir}/{step}: cannot read the training checkpoint ({e})") from None
    skeleton = M.abstract(cfg)
    graphdef, params, rest = nnx.split(skeleton, nnx.Param, ...)
    try:  # a run saved before the scanned layer stack holds per-layer trees: stacked here
        nnx.replace_by_pure_dict(params, restack_pure(_unwrap_values(raw["params"]), skeleton.plan))
        nnx.replace_by_pure_dict(rest, restack_pure(_unwrap_values(raw["rest"]), skeleton.plan))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{out_dir}/{step}: does not match its config.json ({e})") from None
    cast = lambda v: jnp.asarray(v, cfg.param_dtype) if jnp.issubdtype(jnp.asarray(v).dtype, jnp.floating) else jnp.asarray(v)
    return nnx.merge(graphdef, jax.tree.map(cast, params), jax.tree.map(jnp.asarray, rest))


def sample_text(model: M.Transformer, tokenizer, prompt: str, n: int) -> str:
    """Greedy continuation of `prompt` through the decode engine (ids beyond the tokenizer never sampled)."""
    from .engine import Engine
    from .sampling import SamplingConfig
    from .serving import generate

    ids = [tokenizer.bos_id] + list(tokenizer.encode(prompt))
    ctx = len(ids) + n + 2
    eng = Engine(model, max_context=ctx, min_bucket=ctx, prefill_chunk=len(ids))
    out = generate(eng, [ids], SamplingConfig(max_new_tokens=n), tokenizer)["outputs"][0]
    return prompt + out.text
