"""Scoring: logits for every position of given token sequences, from one full forward or from a
prefill followed by one-token decode steps, plus the MTP block's logits.

This is the interface every parity check builds on (`infer.py score`). The decode path uses the
same chunk function as training with an explicit, donated decode state.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .model import Transformer, forward_fn, mtp_fn


def check_tokens(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be a 2-D integer array [batch, seq], got shape {list(tokens.shape)}")
    if tokens.dtype.kind not in "iu":
        raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = int(tokens.max()) if tokens.max() >= vocab_size else int(tokens.min())
        raise ValueError(f"token id {bad} is out of range: the model's vocab_size is {vocab_size}")
    return tokens.astype(np.int32)


@functools.lru_cache(maxsize=8)
def _chunk_step(graphdef):
    """jit((params, ids chunk, start, state) -> (logits, new state)) with the state donated."""
    def run(params, ids, start, state):
        out = nnx.merge(graphdef, params)(ids, start, state)
        return out["logits"], out["state"]

    return jax.jit(run, donate_argnums=(3,))


def score(model: Transformer, tokens, prefill: int | None = None, with_mtp: bool = True) -> dict:
    """-> {"logits": [B, S, V] float32, "mtp_logits": [B, S-1, V] (if the model has MTP)}."""
    cfg = model.cfg
    ids = jnp.asarray(check_tokens(tokens, cfg.vocab_size))
    b, s = ids.shape
    if s > cfg.max_position_embeddings:
        raise ValueError(f"sequence of {s} tokens is longer than max_position_embeddings={cfg.max_position_embeddings}")
    graphdef, params = nnx.split(model)
    want_mtp = with_mtp and cfg.n_mtp and s > 1
    full = None  # the full forward is needed for its logits, or for the streams the MTP block reads
    if prefill is None or want_mtp:
        full = forward_fn(graphdef)(params, ids, jnp.zeros((b,), jnp.int32), None)
    out = {}
    if prefill is None:
        out["logits"] = np.asarray(full["logits"], np.float32)
    else:
        if not 0 < prefill <= s:
            raise ValueError(f"--prefill must be within 1..{s}, got {prefill}")
        out["logits"] = prefill_decode_logits(model, ids, prefill)
    if want_mtp:
        mtp_logits, _, _ = mtp_fn(graphdef)(params, full["streams"][:, :-1], ids[:, 1:], None, None)
        out["mtp_logits"] = np.asarray(mtp_logits, np.float32)
    return out


def prefill_decode_logits(model: Transformer, ids, prefill: int) -> np.ndarray:
    """Logits of positions 0..N-1 from one prefill, then of N..S-1 from one-token decode steps, all
    through the decode engine (teacher-forced: step t feeds token t)."""
    from .engine import Engine
    from .sampling import SamplingConfig

    ids = np.asarray(ids)
    b, s = ids.shape
    eng = Engine(model, max_context=s, batch=b, min_bucket=s, prefill_chunk=prefill)
    chunks = [eng.prefill(ids[:, :prefill], all_logits=True)]
    greedy, key = SamplingConfig(), jax.random.key(0)
    for p in range(prefill, s):
        _, logits = eng.decode(ids[:, p], greedy, key)
        chunks.append(np.asarray(logits, np.float32)[:, None])
    return np.concatenate(chunks, axis=1)
