"""v4jax training, first version: trains a config (default `configs/tiny.json`) from scratch on an
embedded default corpus — the Python standard library's own source files on this machine — with a
byte-level tokenizer, AdamW, next-token + MTP losses, and one jitted pure step function.

  python train.py [--config configs/tiny.json] [--steps 120] [--batch 8] [--seq-len 128] [--lr 3e-3]

Shows step, loss, learning rate, tokens/s and ETA; writes one JSON object per step to
OUT/metrics.jsonl and ends with a short greedy sample. (Muon, sharding, balancing, checkpoints and
resume are the training issue's work; this script is where they land.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from v4jax import model as M
from v4jax.config import ModelConfig

BYTE_OFFSET = 2  # ids 0/1 are BOS/EOS; byte b is id b + 2


def stdlib_corpus(max_bytes: int = 4_000_000) -> np.ndarray:
    """Bytes of the standard library's .py files found at run time (deterministic order)."""
    root = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "site-packages", "idlelib"))
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                with open(os.path.join(dirpath, fn), "rb") as f:
                    data = f.read()
                chunks.append(np.frombuffer(data, np.uint8))
                total += len(data)
                if total >= max_bytes:
                    return np.concatenate(chunks)
    if not chunks:
        raise SystemExit(f"no Python sources under {root} to train on")
    return np.concatenate(chunks)


def batches(data: np.ndarray, batch: int, seq: int, seed: int):
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(data) - seq - 2, batch)
        yield np.stack([data[s:s + seq + 2] for s in starts]).astype(np.int32) + BYTE_OFFSET


def loss_fn(model: M.Transformer, ids, mtp_weight: float):
    """Cross-entropy of token t+1 at t, plus the MTP block's loss on token t+2."""
    x, y, y2 = ids[:, :-2], ids[:, 1:-1], ids[:, 2:]
    out = model(x)
    ce = optax.softmax_cross_entropy_with_integer_labels(out["logits"], y).mean()
    loss = ce
    if model.cfg.n_mtp:
        mtp_logits, _ = model.mtp_logits(out["streams"], y)
        loss = loss + mtp_weight * optax.softmax_cross_entropy_with_integer_labels(mtp_logits, y2).mean()
    return loss, ce


def make_step(graphdef, tx, mtp_weight):
    def step(params, rest, opt_state, ids):
        def f(p):
            return loss_fn(nnx.merge(graphdef, p, rest), ids, mtp_weight)

        (loss, ce), grads = jax.value_and_grad(f, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, "ce": ce,
                                                                  "grad_norm": optax.global_norm(grads)}

    return jax.jit(step, donate_argnums=(0, 2))


def sample(model: M.Transformer, prompt: bytes, n: int) -> str:
    ids = list(np.frombuffer(prompt, np.uint8).astype(np.int32) + BYTE_OFFSET)
    fwd = M.forward_fn(nnx.graphdef(model))
    params = nnx.state(model)
    for _ in range(n):
        x = jnp.asarray([ids[-256:]], jnp.int32)
        logits = fwd(params, x, jnp.zeros((1,), jnp.int32), None)["logits"]
        ids.append(int(jnp.argmax(logits[0, -1])))
    out = bytes(max(0, min(255, i - BYTE_OFFSET)) for i in ids)
    return out.decode("utf-8", errors="replace")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.json"))
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/default")
    args = ap.parse_args(argv)

    cfg = ModelConfig.from_hub(args.config)
    if cfg.vocab_size < 256 + BYTE_OFFSET:
        raise SystemExit(f"error: the byte tokenizer needs vocab_size >= {256 + BYTE_OFFSET}, config has {cfg.vocab_size}")
    data = stdlib_corpus()
    print(f"corpus: {len(data) / 1e6:.1f} MB of standard-library source; config {args.config}", flush=True)
    model = M.build(cfg, seed=args.seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 10), args.steps, args.lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=0.1))
    opt_state = tx.init(params)
    step_fn = make_step(graphdef, tx, mtp_weight=0.3)
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "metrics.jsonl"), "w")
    it = batches(data, args.batch, args.seq_len, args.seed)
    t_start, tokens = time.time(), args.batch * args.seq_len
    for step in range(1, args.steps + 1):
        t0 = time.time()
        params, opt_state, m = step_fn(params, rest, opt_state, jnp.asarray(next(it)))
        loss = float(m["loss"])
        dt = time.time() - t0
        rec = {"step": step, "loss": loss, "ce": float(m["ce"]), "lr": float(sched(step - 1)),
               "grad_norm": float(m["grad_norm"]), "tokens_per_sec": tokens / dt}
        log.write(json.dumps(rec) + "\n")
        if step == 1 or step % 10 == 0 or step == args.steps:
            eta = (time.time() - t_start) / step * (args.steps - step)
            print(f"step {step:5d}  loss {loss:.4f}  lr {rec['lr']:.2e}  {rec['tokens_per_sec']:8.0f} tok/s  "
                  f"ETA {eta:5.0f}s", flush=True)
        if not np.isfinite(loss):
            raise SystemExit(f"error: non-finite loss at step {step}")
    log.close()
    model = nnx.merge(graphdef, params, rest)
    print("sample:", repr(sample(model, b"def ", 48)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
