"""v4jax inference command line.

  python infer.py score --checkpoint DIR --tokens TOKENS.npy --out OUT.npz [--prefill N]
                        [--dtype float32|bfloat16] [--qat-sim] [--mesh data=2,tensor=2]

`score` writes `logits` [B, S, V] float32 for every position (one full forward, or with --prefill N
a prefill of N tokens followed by one-token decode steps) and, when the model has an MTP block,
`mtp_logits` [B, S-1, V]: position t is the MTP block on the final streams at t with token t+1.
The output file is written atomically: on any error nothing is left behind.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infer.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score", help="logits for every position of given token sequences")
    s.add_argument("--checkpoint", required=True,
                   help="hub-format directory (config.json + *.safetensors) or a train.py --out directory")
    s.add_argument("--tokens", required=True, help=".npy integer array [B, S]")
    s.add_argument("--out", required=True, help="output .npz")
    s.add_argument("--prefill", type=int, default=None, help="prefill N tokens, then decode one at a time")
    s.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    s.add_argument("--qat-sim", action="store_true", help="official FP8 KV / FP4 indexer simulations")
    s.add_argument("--mesh", default=None, help="e.g. data=2,expert=2,tensor=2 (default: one device)")
    return p


def cmd_score(args) -> int:
    import numpy as np

    from v4jax import scoring
    from v4jax.sharding import make_mesh

    if not os.path.exists(args.tokens):
        raise SystemExit(f"error: no tokens file {args.tokens}")
    tokens = np.load(args.tokens)
    mesh = make_mesh(args.mesh) if args.mesh else None
    t0 = time.time()
    model = load_model(args.checkpoint, mesh, dtype=args.dtype, param_dtype=args.dtype, qat_sim=args.qat_sim)
    tokens = scoring.check_tokens(tokens, model.cfg.vocab_size)
    print(f"loaded {args.checkpoint} in {time.time() - t0:.1f}s; scoring {tokens.shape[0]}x{tokens.shape[1]} tokens",
          file=sys.stderr)
    t0 = time.time()
    out = scoring.score(model, tokens, prefill=args.prefill)
    print(f"scored in {time.time() - t0:.1f}s", file=sys.stderr)
    _save_npz_atomic(args.out, out)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in out.items()))
    return 0


def load_model(path: str, mesh=None, **runtime):
    """A hub-format directory (*.safetensors) or a v4jax training run directory (orbax checkpoints)."""
    from v4jax import checkpoint
    from v4jax.trainer import load_trained

    if not os.path.isdir(path):
        raise checkpoint.CheckpointError(f"no checkpoint directory {path}")
    if any(f.endswith(".safetensors") for f in os.listdir(path)):
        return checkpoint.load_hub(path, mesh=mesh, **runtime)
    return load_trained(path, **runtime)


def _save_npz_atomic(path: str, arrays: dict) -> None:
    import numpy as np

    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from v4jax.checkpoint import CheckpointError
    from v4jax.config import ConfigError

    try:
        return {"score": cmd_score}[args.cmd](args)
    except (CheckpointError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
