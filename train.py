"""v4jax training: DeepSeek-V4 pre-training with Muon, aux-loss-free balancing, MTP, exact resume.

  python train.py                      # tiny config on the standard library's sources, a few minutes
  python train.py --config MODEL.json [--run RUN.toml] [--set key=value ...]
                  [--steps N] [--batch B] [--seq-len S] [--out DIR] [--save-every N]
                  [--mesh data=A,fsdp=B,expert=C,tensor=D] [--data PATH] [--tokenizer tokenizer.json]

Ahead-of-time compilation for a TPU slice, on any machine with libtpu installed (no TPU needed):
  python train.py --compile-only --topology v5p:2x2x1 [--mesh fsdp=2,expert=2] [the usual flags]
builds this run's train step on the described slice with abstract parameters (nothing allocated),
compiles it with the TPU compiler and prints one JSON object: chips, mesh, per-device argument /
output / temporary bytes against the chip's HBM, fits, compile seconds, compiled vs analytic FLOPs.
Without --mesh every device goes on the fsdp axis.

Running again with the same --out resumes from its latest checkpoint. Every setting of
`v4jax.trainer.RunConfig` can come from the TOML file or --set; flags win over both.
Multi-host (TPU pods, several GPU hosts, or several CPU processes): run the same command on every host
with --distributed; --batch is the per-host batch. jax.distributed.initialize() detects TPU / SLURM /
Open MPI / Kubernetes clusters; elsewhere give --coordinator HOST:PORT --num-processes N --process-id I
(or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, which these flags default to).
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Every run setting (python train.py --settings lists them with their types, "
                                        "defaults and meaning) can come from --run or --set; flags win over both. "
                                        "Example run file: configs/example-run.toml.")
    ap.add_argument("--config", help="hub-schema model config.json (default: configs/tiny.json)")
    ap.add_argument("--run", help="run settings file (TOML), e.g. configs/example-run.toml (default: none)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="one run setting (repeatable; see --settings; default: none)")
    ap.add_argument("--settings", action="store_true", help="list every run setting (type, default, meaning) and exit")
    ap.add_argument("--steps", type=int, help="optimiser steps (default: the run setting, 120)")
    ap.add_argument("--batch", type=int, help="sequences per step per host (default: 8)")
    ap.add_argument("--seq-len", type=int, dest="seq_len", help="tokens per sequence (default: 128)")
    ap.add_argument("--out", help="run directory; an existing one is resumed (default: runs/default)")
    ap.add_argument("--save-every", type=int, dest="save_every", help="checkpoint every N steps (default: 50)")
    ap.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=2,expert=2 (default: every device on data)")
    ap.add_argument("--data", help="text files, a directory, .jsonl or .parquet (default: the Python standard "
                                   "library's own sources)")
    ap.add_argument("--tokenizer", help="tokenizer.json (default: the byte tokenizer)")
    ap.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first (default: off)")
    ap.add_argument("--compile-only", action="store_true", dest="compile_only",
                    help="compile the train step for --topology and print its memory plan (JSON); no training (default: off)")
    ap.add_argument("--topology", help="TPU slice for --compile-only, e.g. v5p:2x2x1, v6e:2x4 (needs libtpu; default: none)")
    env = lambda k, typ=str: typ(os.environ[k]) if os.environ.get(k) else None  # noqa: E731
    ap.add_argument("--coordinator", default=env("JAX_COORDINATOR_ADDRESS"),
                    help="HOST:PORT of process 0 (default: $JAX_COORDINATOR_ADDRESS)")
    ap.add_argument("--num-processes", type=int, dest="num_processes", default=env("JAX_NUM_PROCESSES", int),
                    help="processes in the job (default: $JAX_NUM_PROCESSES)")
    ap.add_argument("--process-id", type=int, dest="process_id", default=env("JAX_PROCESS_ID", int),
                    help="this process's index (default: $JAX_PROCESS_ID)")
    args = ap.parse_args(argv)
    if args.settings:
        from v4jax.runspec import settings_help
        from v4jax.trainer import RunConfig
        print("run settings (--run FILE.toml or --set KEY=VALUE):\n" + settings_help(RunConfig))
        return 0
    if args.compile_only:
        return compile_only(args)
    import jax

    from v4jax import compile_cache
    compile_cache.enable()  # on by default: $V4JAX_COMPILE_CACHE (a directory, or "off")
    if args.distributed:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from v4jax.checkpoint import CheckpointError
    from v4jax.config import ConfigError
    from v4jax.trainer import RunConfig, Trainer, sample_text
    try:
        rc = RunConfig.load(args.run, args.set, config=args.config, steps=args.steps, batch=args.batch,
                            seq_len=args.seq_len, out=args.out, save_every=args.save_every, mesh=args.mesh,
                            data=args.data, tokenizer=args.tokenizer)
        trainer = Trainer(rc)
        print(f"model {rc.config}; data {rc.data or 'Python standard library sources'}; "
              f"{rc.steps} steps of {rc.batch}{'x' + str(rc.grad_accum) if rc.grad_accum > 1 else ''}"
              f"x{rc.seq_stages or rc.seq_len} tokens; out {rc.out}", flush=True)
        trainer.run(log=lambda s: print(s, flush=True), bar=sys.stdout.isatty())
    except (ConfigError, CheckpointError, ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rc.sample_tokens and jax.process_count() > 1:  # the parameters may span the processes' devices
        if jax.process_index() == 0:
            print("sample: skipped in a multi-process run (load the checkpoint with infer.py)")
    elif rc.sample_tokens:
        print("sample:", repr(sample_text(trainer.model(), trainer.tokenizer, "def ", rc.sample_tokens)))
    return 0


def compile_only(args) -> int:
    """--compile-only: the run's train step compiled for a TPU slice -> one JSON object on stdout."""
    import json
    if not args.topology:
        print("error: --compile-only needs --topology (e.g. v5p:2x2x1)", file=sys.stderr)
        return 2
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the topology API beside the CPU backend, no TPU runtime
    from v4jax import aot
    from v4jax.checkpoint import CheckpointError
    from v4jax.config import ConfigError
    from v4jax.trainer import RunConfig, Trainer
    try:
        devices = aot.tpu_devices(args.topology)
        rc = RunConfig.load(args.run, args.set, config=args.config, steps=args.steps, batch=args.batch,
                            seq_len=args.seq_len, mesh=args.mesh, tokenizer=args.tokenizer)
        rc.mesh = ",".join(f"{k}={v}" for k, v in aot.mesh_for(rc.mesh, devices).shape.items())
        rep = Trainer(rc, devices=devices, abstract=True).compile_plan()
    except (aot.AOTError, ConfigError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"topology": args.topology, "config": rc.config, **aot.public(rep)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
