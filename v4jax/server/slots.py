"""Decode slots: the engine's preallocated state, one row per request, driven by one mixed step.

A *mixed step* feeds every slot its own number of new tokens in one call of fixed length T:

  ids    [B, T]  int32   row b: its next valid[b] tokens (a prompt chunk, or the one token it sampled last)
  start  [B]     int32   tokens already in row b's state (its position)
  valid  [B]     int32   0 (idle slot: its state is left alone), 1 (decoding) or up to T (prefilling)
  ->     next    [B]     the token sampled after each row's last valid token, with each row's own
                         temperature / top-k / top-p and its own key fold_in(key(seed_b), count_b)

T is 1 when every busy slot decodes, otherwise a power of two from 16 up to the prefill chunk
(Engine.chunk_len), and the position bucket is Engine.bucket: a bounded set of compiled shapes,
all compiled by `warm()` before the first request (`compiled_shapes()` counts them).

Rows move between the device state and host copies with fixed-shape jitted functions (a row is
read whole and cut on the host; a row is padded on the host and written whole), so neither a cache
hit nor a new request compiles anything.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..engine import Engine, _model, _row_view, _under_mesh, small_part, with_small
from ..sampling import sample


def _mixed_step(graphdef, ptree, bucket: int):
    """(params, ids [B,T], start [B], valid [B], state, pend_h, seeds [B], counts [B], temperature [B],
    top_k [B], top_p [B], vocab_limit) -> (next [B], pend_h, state)."""
    def run(params, ids, start, valid, state, pend_h, seeds, counts, temperature, top_k, top_p, vocab_limit):
        model = _model(graphdef, ptree, params)
        last = jnp.maximum(valid - 1, 0)
        out = model(ids, start, {"layers": state["layers"], "mtp": None}, valid_b=valid, logits_at=last,
                    context_limit=bucket)
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counts)
        nxt = sample(out["logits"][:, 0], keys, temperature, top_k, top_p, vocab_limit)
        h_last = jnp.take_along_axis(out["streams"], last[:, None, None, None], axis=1)[:, 0]
        pend = jnp.where((valid > 0)[:, None, None], h_last, pend_h)
        return nxt, pend, {"layers": out["state"]["layers"], "mtp": state["mtp"]}

    return run


def _row_prefill(graphdef, ptree, bucket: int):
    """(params, ids [1,T], b, start [1], valid [1], state, pend_h, seed, count, temperature, top_k, top_p,
    vocab_limit) -> (next, pend_h, state): a prompt chunk of slot b alone (its row is read out of the
    batched state, run at batch 1 and written back in place), so a prefill costs T tokens, not B x T."""
    def run(params, ids, b, start, valid, state, pend_h, seed, count, temperature, top_k, top_p, vocab_limit):
        model = _model(graphdef, ptree, params)
        take = lambda x: jax.lax.dynamic_index_in_dim(x, b, 0, keepdims=True)  # noqa: E731
        put = lambda x, r: jax.lax.dynamic_update_index_in_dim(x, r[0].astype(x.dtype), b, 0)  # noqa: E731
        last = jnp.maximum(valid - 1, 0)
        out = model(ids, start, {"layers": jax.tree.map(take, state["layers"]), "mtp": None}, valid_b=valid,
                    logits_at=last, context_limit=bucket)
        key = jax.random.fold_in(jax.random.key(seed), count)
        nxt = sample(out["logits"][:, 0], key, temperature, top_k, top_p, vocab_limit)
        h_last = jnp.take_along_axis(out["streams"], last[:, None, None, None], axis=1)[:, 0]
        layers = jax.tree.map(put, state["layers"], out["state"]["layers"])
        return nxt[0], put(pend_h, h_last), {"layers": layers, "mtp": state["mtp"]}

    return run


@jax.jit
def _read_row(state, pend_h, b):
    return jax.tree.map(lambda x: x[b], state), pend_h[b]


def _write_row(state, pend_h, row, row_pend, b):
    put = lambda x, r: jax.lax.dynamic_update_index_in_dim(x, r.astype(x.dtype), b, 0)  # noqa: E731
    return jax.tree.map(put, state, row), put(pend_h, row_pend)


def _clear_rows(state, pend_h, empty_small, mask_b, ratios):
    pick = lambda e, x: jnp.where(mask_b.reshape((-1,) + (1,) * (x.ndim - 1)), e, x)  # noqa: E731
    small = jax.tree.map(pick, empty_small, small_part(state, ratios))
    return with_small(state, small, ratios), jnp.where(mask_b[:, None, None], 0, pend_h).astype(pend_h.dtype)


class Slots:
    """`batch` decode slots over one Engine (no MTP state: the server decodes plainly). Position
    buckets start at `min_bucket` (4096: the window and a few compressed blocks cost little to read in
    full, and every bucket is compiled at start-up: 1 + log2(max_context / 4096) of them)."""

    def __init__(self, model, max_context: int, batch: int, kv_layout: str | None = None, chunk: int = 256,
                 min_bucket: int = 4096):
        self.engine = Engine(model, max_context, batch=batch, kv_layout=kv_layout, prefill_chunk=chunk,
                             min_bucket=min(min_bucket, max_context))
        e = self.engine
        self.batch, self.chunk, self.max_context = batch, min(chunk, max_context), max_context
        self.cfg = e.cfg
        self._empty = e._placed(lambda: small_part(e.model.init_state(batch, 1, kv_layout), e.ratios))
        # row writes keep the state's shardings, so the next step sees the inputs it was compiled for
        sh = (jax.tree.map(lambda x: x.sharding, e.state), e.pend_h.sharding)
        self._write = jax.jit(_write_row, donate_argnums=(0, 1), out_shardings=sh)
        self._clear = jax.jit(_clear_rows, static_argnums=(4,), donate_argnums=(0, 1), out_shardings=sh)
        self._out_sh = (None, sh[1], sh[0])
        self._jitted: dict[tuple, object] = {}  # (kind, bucket) -> (jitted step, its caller)
        row_leaves = jax.tree.leaves(jax.eval_shape(_read_row, e.state, e.pend_h, 0)[0])
        self.row_full_bytes = sum(x.size * x.dtype.itemsize for x in row_leaves)

    @property
    def pos(self) -> np.ndarray:
        return self.engine.pos

    # ---------------------------------------------------------------- the step
    def step_len(self, most_new: int) -> int:
        return 1 if most_new <= 1 else self.engine.chunk_len(most_new, self.chunk)

    def step(self, feeds: dict, knobs: dict, vocab_limit: int = 0) -> np.ndarray:
        """feeds {slot: token list (1 to chunk tokens)}; knobs {slot: (seed, count, temperature, top_k,
        top_p)} for every fed slot -> next tokens [B] (meaningful for fed slots only)."""
        e, B = self.engine, self.batch
        most = max(len(t) for t in feeds.values())
        T = self.step_len(most)
        ids = np.zeros((B, T), np.int32)
        valid = np.zeros(B, np.int32)
        seeds, counts = np.zeros(B, np.uint32), np.zeros(B, np.int32)
        temp, top_k, top_p = np.zeros(B, np.float32), np.zeros(B, np.int32), np.ones(B, np.float32)
        for b, toks in feeds.items():
            ids[b, :len(toks)] = toks
            valid[b] = len(toks)
            seeds[b], counts[b], temp[b], top_k[b], top_p[b] = knobs[b]
        e._check_room(valid)
        fn = self._fn(e.bucket(int((e.pos + valid).max())))
        nxt, e.pend_h, e.state = fn(e.param_leaves, ids, e.pos.astype(np.int32), valid, e.state, e.pend_h, seeds,
                                    counts, temp, top_k, top_p, np.int32(vocab_limit))
        e.pos += valid
        return np.asarray(nxt)

    def _fn(self, bucket: int, kind: str = "mixed"):
        """The mixed step (or the one-row prefill) at `bucket`, its outputs placed like its inputs (so the
        next call hits its cache)."""
        if (kind, bucket) not in self._jitted:
            e = self.engine
            make, donate = (_mixed_step, (4, 5)) if kind == "mixed" else (_row_prefill, (5, 6))
            fn = jax.jit(make(e.graphdef, e._ptree, bucket), donate_argnums=donate, out_shardings=self._out_sh)
            self._jitted[kind, bucket] = (fn, _under_mesh(fn, e.mesh) if e.mesh is not None else fn)
        return self._jitted[kind, bucket][1]

    def prefill_row(self, b: int, tokens, knobs: tuple, vocab_limit: int = 0) -> int:
        """Feed slot b alone 1 to `chunk` prompt tokens -> the token sampled after the last one."""
        e = self.engine
        n = len(tokens)
        T = e.chunk_len(n, self.chunk)
        ids = np.zeros((1, T), np.int32)
        ids[0, :n] = tokens
        if e.pos[b] + n > self.max_context:
            raise ValueError(f"slot {b}: {int(e.pos[b])} + {n} tokens exceed the context of {self.max_context}")
        seed, count, temp, top_k, top_p = knobs
        fn = self._fn(e.bucket(int(e.pos[b]) + n), "row")
        nxt, e.pend_h, e.state = fn(e.param_leaves, ids, np.int32(b), e.pos[b:b + 1].astype(np.int32),
                                    np.array([n], np.int32), e.state, e.pend_h, np.uint32(seed), np.int32(count),
                                    np.float32(temp), np.int32(top_k), np.float32(top_p), np.int32(vocab_limit))
        e.pos[b] += n
        return int(nxt)

    def compiled_shapes(self) -> int:
        """Compiled variants of the mixed step (every bucket, every step length)."""
        return sum(jitted._cache_size() for jitted, _ in self._jitted.values())

    def lengths(self) -> list[int]:
        """Every step length T: 1 (the mixed decode step), and the one-row prefill's chunk lengths."""
        out, t = [1, 16], 16
        while t < self.chunk:
            out.append(t)
            t *= 2
        return sorted(set(out + [self.chunk]))

    def buckets(self) -> list[int]:
        e = self.engine
        out, b = [], e.bucket(1)
        while True:
            out.append(b)
            if b >= self.max_context:
                return out
            b = e.bucket(b + 1)

    def warm(self, progress=None) -> int:
        """Compile every (bucket, step length) and the row moves on idle slots (nothing changes)."""
        e = self.engine
        n = 0
        z = np.zeros(self.batch, np.int32)
        one = lambda x: np.asarray(x).reshape(1)  # noqa: E731
        for bucket in self.buckets():
            fn = self._fn(bucket)
            _, e.pend_h, e.state = fn(e.param_leaves, np.zeros((self.batch, 1), np.int32), z, z, e.state, e.pend_h,
                                      z.astype(np.uint32), z, z.astype(np.float32), z, np.ones(self.batch, np.float32),
                                      np.int32(0))
            row = self._fn(bucket, "row")
            for T in self.lengths()[1:]:  # valid 0: the state is left as it is
                _, e.pend_h, e.state = row(e.param_leaves, np.zeros((1, T), np.int32), np.int32(0), one(np.int32(0)),
                                           one(np.int32(0)), e.state, e.pend_h, np.uint32(0), np.int32(0),
                                           np.float32(0), np.int32(0), np.float32(1), np.int32(0))
            n += len(self.lengths())
            if progress:
                progress(n)
        self.clear(np.zeros(self.batch, bool))
        b = int(np.argmin(self.pos))
        if self.pos[b] == 0:
            self.write(b, self.read(b))
        return n

    # ---------------------------------------------------------------- rows
    def clear(self, mask_b) -> None:
        """Empty the rows where mask_b is True (windows, tails, streams; position 0)."""
        e = self.engine
        mask = np.asarray(mask_b, bool)
        e.state, e.pend_h = self._clear(e.state, e.pend_h, self._empty, mask, e.ratios)
        e.pos[mask] = 0

    def read(self, b: int) -> dict:
        """Row b as host arrays, entry buffers cut to what its context filled (Engine.export_row's layout)."""
        e = self.engine
        p = int(e.pos[b])
        state, pend = _read_row(e.state, e.pend_h, np.int32(b))
        state = jax.device_get(state)
        row = _row_view(jax.tree.map(lambda x: x[None], state), e.ratios, p,
                        lambda x, n: np.array(x[0] if n is None else x[0, :n]))
        return {"state": row, "pos": p, "pend_h": np.asarray(pend)}

    def write(self, b: int, row: dict) -> None:
        """Row b := `row` (from `read`), padded on the host to the full buffers."""
        e = self.engine
        p, leaves = e._check_row(row)
        full = jax.eval_shape(_read_row, e.state, e.pend_h, 0)[0]
        flat, tdef = jax.tree.flatten(full)
        padded = []
        for f, r in zip(flat, leaves):
            r = np.asarray(r)
            if r.shape != f.shape:
                z = np.zeros(f.shape, f.dtype)
                z[: r.shape[0]] = r
                r = z
            padded.append(r)
        e.state, e.pend_h = self._write(e.state, e.pend_h, tdef.unflatten(padded),
                                       np.asarray(row["pend_h"]), np.int32(b))
        e.pos[b] = p
