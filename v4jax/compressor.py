"""KV compressor (spec §5): gated pooling of `ratio` tokens into one entry, chunk by chunk.

One code path serves training, prefill, chunked prefill and one-token decode: a chunk of T tokens
at positions start..start+T-1 continues the compressor's tail state, emits every block the chunk
completes into the entry buffer, and leaves the unfinished block in the tail state.

Shape walk-through for one sequence (the functions here see no batch dim; callers vmap them):
  a_tk, z_tk   [T, k*c]  projections (z with the position bias ape[t mod m] added), k = 2 if overlap
  tail_a/z     [k*m, k*c] rows 0..m-1 = previous complete block (overlap only), rows m..2m-1 = current
  buf          [nb*m, k*c] current-block rows followed by the chunk, nb = ceil((m+T)/m) blocks
  slots        [nb, k*m, c] overlap: previous block's first halves ++ own block's second halves
  entries      [nb, c]     per-channel softmax over the slots, summed; block j is entry start//m + j,
                           complete iff (j+1)*m <= start%m + T (incomplete ones are never written)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from . import kvstore, quant
from .config import ModelConfig
from .layers import Linear, RMSNorm, apply_rope, param, rope_cos_sin

NEG = -1e30  # "minus infinity" for gate logits that stays finite (no NaN in masked softmax or grads)


class Compressor(nnx.Module):
    """Overlapping (ratio 4, 8 slots per entry) or plain (any other ratio) gated KV compressor."""

    def __init__(self, cfg: ModelConfig, ratio: int, width: int, rotate: bool, rngs):
        self.ratio, self.width, self.rotate = ratio, width, rotate
        self.overlap = ratio == 4
        self.rd = cfg.qk_rope_head_dim
        self.nope = width - cfg.qk_rope_head_dim
        k = 2 if self.overlap else 1
        axes = ("comp_out", "embed")
        self.wkv = Linear(cfg, cfg.dim, k * width, axes, rngs)
        self.wgate = Linear(cfg, cfg.dim, k * width, axes, rngs)
        self.ape = param(None, (ratio, k * width), ("ratio", "comp_out"), "vector", init="zeros")
        self.norm = RMSNorm(width, cfg.rms_norm_eps, cfg.param_dtype)

    def tail_shape(self) -> tuple[int, int]:
        k = 2 if self.overlap else 1
        return (k * self.ratio, k * self.width)

    def project(self, x_btd: jax.Array, pos_bt: jax.Array):
        """fp32 projections a, z (+ape by position in block) for a chunk: [B, T, k*c] each."""
        xf = x_btd.astype(jnp.float32)
        a = self.wkv(xf)
        z = self.wgate(xf) + self.ape[...][pos_bt % self.ratio]
        return a, z

    def pool(self, a_tk, z_tk, tail_a, tail_z, start, pos_t, seg_t, n_valid):
        """One sequence: -> entries [nb, c] (raw, fp32), entry positions/segments [nb], n_complete, tails.

        Only the first `n_valid` chunk tokens are real (the rest is batch padding): blocks they do not
        complete are neither emitted nor moved into the previous-block tail; padding rows left in the
        current-block tail are overwritten by the next chunk before that block can complete."""
        m, c, T = self.ratio, self.width, a_tk.shape[0]
        nb = (m + T + m - 1) // m
        cur = slice(m, 2 * m) if self.overlap else slice(0, m)
        r0 = start % m

        def buffer(rows, chunk, fill):  # [nb*m, ...]: current-block rows, then the chunk at offset r0
            buf = jnp.full((nb * m,) + chunk.shape[1:], fill, chunk.dtype)
            if rows is not None:
                buf = buf.at[:m].set(rows)
            return jax.lax.dynamic_update_slice_in_dim(buf, chunk, r0, axis=0)

        blk_a = buffer(tail_a[cur], a_tk, 0.0).reshape(nb, m, -1)
        blk_z = buffer(tail_z[cur], z_tk, NEG).reshape(nb, m, -1)
        last = jnp.arange(nb) * m + m - 1  # each block's last token (always real for complete blocks)
        ent_pos = buffer(None, pos_t, 0)[last] - (m - 1)  # the block's first position, per document
        ent_seg = buffer(None, seg_t, 0)[last]
        n_complete = (r0 + n_valid) // m
        if self.overlap:
            prev_a = jnp.concatenate([tail_a[None, :m], blk_a[:-1]], axis=0)
            prev_z = jnp.concatenate([tail_z[None, :m], blk_z[:-1]], axis=0)
            # a block never pools the previous block of another document (packed training)
            same_doc = jnp.concatenate([jnp.ones((1,), bool), ent_seg[1:] == ent_seg[:-1]])
            prev_z = jnp.where(same_doc[:, None, None], prev_z, NEG)
            slots_a = jnp.concatenate([prev_a[..., :c], blk_a[..., c:]], axis=1)  # [nb, 2m, c]
            slots_z = jnp.concatenate([prev_z[..., :c], blk_z[..., c:]], axis=1)
        else:
            slots_a, slots_z = blk_a, blk_z
        entries = jnp.sum(jax.nn.softmax(slots_z, axis=1) * slots_a, axis=1)  # [nb, c]
        new_cur_a, new_cur_z = blk_a[n_complete], blk_z[n_complete]
        if self.overlap:
            has_prev = n_complete > 0
            prev_idx = jnp.maximum(n_complete - 1, 0)
            new_a = jnp.concatenate([jnp.where(has_prev, blk_a[prev_idx], tail_a[:m]), new_cur_a], axis=0)
            new_z = jnp.concatenate([jnp.where(has_prev, blk_z[prev_idx], tail_z[:m]), new_cur_z], axis=0)
        else:
            new_a, new_z = new_cur_a, new_cur_z
        return entries, ent_pos, ent_seg, n_complete, new_a, new_z

    def finish(self, entries_nc, pos_n, inv_freq, qat_sim: bool, dtype):
        """Norm, RoPE at the block's first position, then Hadamard+FP4 (indexer) or FP8 (main) sims."""
        e = self.norm(entries_nc.astype(dtype))
        cos, sin = rope_cos_sin(pos_n, inv_freq)
        e = apply_rope(e, cos, sin)
        if self.rotate:
            e = quant.hadamard(e)
            if qat_sim:
                e = quant.fp4_sim(e, 32)
        elif qat_sim:
            e = jnp.concatenate([quant.fp8_sim(e[..., : self.nope], 64), e[..., self.nope:]], axis=-1)
        return e

    def __call__(self, x_btd, pos_bt, seg_bt, start_b, state: dict, inv_freq, qat_sim: bool, valid_b=None):
        """Consumes a chunk -> (updated state {tail_a, tail_z, kv}, entry segments [B, N]).

        Entry segments are those of the entries written by this chunk (0 for older entries: the
        stateful decode path has a single document, segment 0). `valid_b` [B]: real tokens per row
        (default all T). The entry buffer is a plain array or a quantised store (`kvstore`)."""
        a, z = self.project(x_btd, pos_bt)
        b, t = x_btd.shape[:2]
        if valid_b is None:
            valid_b = jnp.full((b,), t, jnp.int32)
        dtype = kvstore.compute_dtype(state["kv"], x_btd.dtype)

        def one(a_tk, z_tk, tail_a, tail_z, kv_nc, start, pos_t, seg_t, n_valid):
            entries, ent_pos, ent_seg, n_complete, new_a, new_z = self.pool(a_tk, z_tk, tail_a, tail_z, start,
                                                                            pos_t, seg_t, n_valid)
            e = self.finish(entries, ent_pos, inv_freq, qat_sim, dtype)
            n_buf = kvstore.length(kv_nc)
            j = jnp.arange(e.shape[0])
            idx = jnp.where(j < n_complete, start // self.ratio + j, n_buf)  # out of range -> dropped
            kv_nc = kvstore.scatter(kv_nc, idx, e)
            seg_n = jnp.zeros((n_buf,), jnp.int32).at[idx].set(ent_seg, mode="drop")
            return new_a, new_z, kv_nc, seg_n

        tail_a, tail_z, kv, seg = jax.vmap(one)(a, z, state["tail_a"], state["tail_z"], state["kv"], start_b,
                                                pos_bt, seg_bt, valid_b)
        return {"tail_a": tail_a, "tail_z": tail_z, "kv": kv}, seg

    def empty_state(self, batch: int, n_entries: int, dtype, layout: str | None = None) -> dict:
        """Tails in fp32 (unfinished block(s)); the entry buffer in `layout` (None = plain `dtype`)."""
        rows, cols = self.tail_shape()
        kind = "index" if self.rotate else "main"
        return {"tail_a": jnp.zeros((batch, rows, cols), jnp.float32),
                "tail_z": jnp.full((batch, rows, cols), NEG, jnp.float32),
                "kv": kvstore.empty((batch, n_entries, self.width), dtype, layout, kind, self.rd)}
