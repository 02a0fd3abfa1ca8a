"""Log-probabilities of given tokens through the decode engine.

Every scored sequence runs through the engine's chunked prefill: row b's inputs `s[:-1]` are fed in
chunks of `engine.prefill_chunk` tokens onto the engine's decode state (the same compressed KV state
decoding uses, so a long document costs what its prefill costs, never a T x T buffer), and each chunk
returns, inside the jitted step, only what scoring needs:

  logp    [B, T]  log softmax(logits)[target] for target = s[1:] (full vocabulary, fp32)
  greedy  [B, T]  argmax(logits) == target
  picks   per CSA layer [B, k]: the indexer's top-k entry ids (-1 = none) of the query at one chosen
          position per row (the needle diagnosis), when asked for

so the host never sees a [T, V] logits array.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..engine import _model
from ..scoring import check_tokens


@functools.lru_cache(maxsize=64)
def _logprob_fn(graphdef, ptree, ratios, bucket: int, with_picks: bool):
    """(params, ids [B,T], targets [B,T], start [B], valid [B], state, pend_h, at [B]) ->
    (logp [B,T], greedy [B,T], picks: [B,k] per CSA layer at chunk position `at` (or []), pend_h, state)."""
    def run(params, ids, targets, start, valid, state, pend_h, at):
        model = _model(graphdef, ptree, params)
        out = model(ids, start, {"layers": state["layers"], "mtp": None}, valid_b=valid, context_limit=bucket)
        logits_btv = out["logits"].astype(jnp.float32)
        tgt_bt = jnp.take_along_axis(logits_btv, targets[..., None], axis=-1)[..., 0]
        logp_bt = tgt_bt - jax.nn.logsumexp(logits_btv, axis=-1)
        greedy_bt = jnp.argmax(logits_btv, axis=-1) == targets
        picks = []
        if with_picks:
            for r, aux in zip(ratios, out["aux"]):
                if r == 4 and aux.get("topk") is not None:
                    picks.append(jnp.take_along_axis(aux["topk"], at[:, None, None], axis=1)[:, 0])
        h = out["streams"]
        last = jnp.maximum(valid - 1, 0)
        h_last = jnp.take_along_axis(h, last[:, None, None, None], axis=1)[:, 0]
        pend = jnp.where((valid > 0)[:, None, None], h_last, pend_h)
        return logp_bt, greedy_bt, picks, pend, {"layers": out["state"]["layers"], "mtp": state["mtp"]}

    return jax.jit(run, donate_argnums=(5, 6))


def score_rows(engine, seqs: Sequence, pick_at=None, chunk: int | None = None, on_tokens=None) -> list[dict]:
    """Score up to `engine.batch` sequences from an empty state (the engine is reset first).

    seqs: token lists; row b predicts s[1:] from s[:-1] (len(s) - 1 <= engine.max_context).
    pick_at: per row an input index (or None) whose query's CSA top-k to return.
    on_tokens(n): called with the number of scored tokens after each chunk (progress).
    -> per row {"logp": [n-1] float64, "greedy": [n-1] bool, "picks": [k] per CSA layer (with pick_at)}."""
    if len(seqs) > engine.batch:
        raise ValueError(f"score_rows got {len(seqs)} sequences for an engine of batch {engine.batch}")
    chunk = chunk or engine.prefill_chunk
    seqs = [np.asarray(s, np.int64).reshape(-1) for s in seqs]
    for s in seqs:
        if s.size < 2:
            raise ValueError("a scored sequence needs at least 2 tokens (one input, one target)")
        check_tokens(s[None], engine.cfg.vocab_size)
    rows = seqs + [seqs[0][:2]] * (engine.batch - len(seqs))  # idle rows: 1 input token
    lens = np.array([s.size - 1 for s in rows])
    if lens.max() > engine.max_context:
        raise ValueError(f"a sequence of {int(lens.max()) + 1} tokens needs max_context >= {int(lens.max())}, "
                         f"the engine holds {engine.max_context}")
    want = pick_at is not None
    at_abs = np.array([(-1 if p is None else int(p)) for p in (list(pick_at) + [None] * engine.batch)[:engine.batch]]
                      if want else [-1] * engine.batch)
    engine.reset()
    logp = [np.zeros(n) for n in lens]
    greedy = [np.zeros(n, bool) for n in lens]
    picks = [None] * engine.batch
    done = 0
    while done < lens.max():
        n = min(chunk, int(lens.max()) - done)
        t = engine.chunk_len(n, chunk)
        ids = np.zeros((engine.batch, t), np.int32)
        tgt = np.zeros((engine.batch, t), np.int32)
        valid = np.clip(lens - done, 0, n)
        for b, s in enumerate(rows):
            ids[b, : valid[b]] = s[done: done + valid[b]]
            tgt[b, : valid[b]] = s[done + 1: done + 1 + valid[b]]
        here = (at_abs >= done) & (at_abs < done + valid)
        at = np.where(here, at_abs - done, 0)
        fn = engine.step_fn(_logprob_fn, engine.bucket(int((engine.pos + valid).max())), want and bool(here.any()))
        lp, gr, pk, engine.pend_h, engine.state = fn(
            engine.param_leaves, jnp.asarray(ids), jnp.asarray(tgt), jnp.asarray(engine.pos, jnp.int32),
            jnp.asarray(valid, jnp.int32), engine.state, engine.pend_h, jnp.asarray(at, jnp.int32))
        lp, gr = np.asarray(lp, np.float64), np.asarray(gr)
        pk = [np.asarray(p) for p in pk]
        for b in range(len(seqs)):
            v = int(valid[b])
            logp[b][done: done + v] = lp[b, :v]
            greedy[b][done: done + v] = gr[b, :v]
            if here[b] and pk:
                picks[b] = [p[b] for p in pk]
        engine.pos += valid
        done += n
        if on_tokens:
            on_tokens(int(valid[: len(seqs)].sum()))
    return [{"logp": logp[b], "greedy": greedy[b], **({"picks": picks[b]} if want else {})}
            for b in range(len(seqs))]


def windows(tokens, max_context: int) -> list[tuple[int, np.ndarray]]:
    """Split one long token sequence into scored windows: window w holds inputs [wL, (w+1)L) and
    predicts tokens wL+1 .. (w+1)L, each window from an empty state (L = max_context). Every token
    after the first is predicted exactly once -> [(offset wL, window tokens incl. its last target)]."""
    tokens = np.asarray(tokens, np.int64)
    return [(o, tokens[o: o + max_context + 1]) for o in range(0, max(tokens.size - 1, 0), max_context)]


def score_many(engine, seqs: Sequence, on_tokens=None, pick_at=None) -> list[dict]:
    """score_rows over any number of sequences, `engine.batch` at a time, longest first (rows of
    similar length share chunks) -> results in the order of `seqs`."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = [None] * len(seqs)
    for g in range(0, len(order), engine.batch):
        idx = order[g: g + engine.batch]
        res = score_rows(engine, [seqs[i] for i in idx], None if pick_at is None else [pick_at[i] for i in idx],
                         on_tokens=on_tokens)
        for i, r in zip(idx, res):
            out[i] = r
    return out
