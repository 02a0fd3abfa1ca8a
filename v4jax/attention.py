"""Hybrid attention (spec §4-§7): sliding window + CSA (top-k of 4x-compressed entries) or HCA
(all 128x-compressed entries), one softmax with a learned sink, sparse by construction.

The same chunk function runs training (empty state, whole sequence), prefill, chunked prefill and
decode (T = 1). Queries are processed in blocks of Q (`ModelConfig.attn_block`) by `lax.map`, so the
largest buffers are Q x (S + W) for the window (sub-blocks of S = WINDOW_SUB queries), Q x k gathered
entries for CSA and Q x N (entries) for HCA and the indexer scores: linear in the sequence length;
nothing is S x S or S x S/m. Blocks are rematerialised in the backward; a whole sequence from position
0 runs its blocks in CAUSAL_GROUPS groups, each scoring only the entries its queries can see.

Shape walk-through for one sequence and one query block (b = block index, j0 = b*Q):
  q_qhc      [Q, H, c]      queries of positions start+j0 .. start+j0+Q-1
  win_kc     [Q+W, c]       E[j0 : j0+Q+W], E = (state window, W rows) ++ (chunk kv, T rows);
                            row i of E is position start-W+i; query jj sees rows jj+1 .. jj+W;
                            sub-block i of S queries scores only slab rows iS .. iS+S+W-1 [Q/S, S+W, c]
  comp_nc    [N, c]         compressed entries (state buffer after this chunk's writes)
  CSA: score_qn [Q, N] -> top-k idx_qk [Q, k] -> gathered [Q, k, c] (a gather, never a mask)
  HCA: all N entries, masked by n < floor((p+1)/m)
  logits     [Q, H, S+W+k|N] -> softmax with exp(sink_h) in the denominator -> o_qhc [Q, H, c]

`ModelConfig.attention_kernel` ("jnp" | "pallas_tpu" | "pallas_gpu") picks who computes the CSA sparse
branch (window + gathered top-k, one softmax with the sink): this jnp code or a Pallas kernel
(`v4jax.kernels.sparse_gather_attention`). SWA, HCA and dense-phase CSA always use the jnp code.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from . import kvstore, quant
from .compressor import Compressor
from .config import ModelConfig
from .kernels import sink_softmax, sparse_gather_attention
from .layers import HIGHEST, Linear, RMSNorm, apply_rope, param, rms_norm, rope_cos_sin, rope_inv_freq
from .sharding import spec_for

# query-block groups of a whole-sequence forward (training, scoring): group g of G scores only the
# compressed entries visible to its last query, cutting the causal over-count from 2x to (G+1)/G
CAUSAL_GROUPS = 8
# queries per window sub-block: the 128-token window band of a Q-query block is scored in slabs of
# WINDOW_SUB + W keys, (16 + 128) / 128 = 1.125x the useful work (one slab of Q + W would be 2x)
WINDOW_SUB = 16


class Indexer(nnx.Module):
    """Lightning indexer: scores compressed entries for each query, picks the top-k (CSA only)."""

    def __init__(self, cfg: ModelConfig, rngs):
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.wq_b = Linear(cfg, cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, ("idx_heads_dim", "q_lora"), rngs)
        self.weights_proj = Linear(cfg, cfg.dim, cfg.index_n_heads, ("idx_heads", "embed"), rngs)
        self.compressor = Compressor(cfg, 4, cfg.index_head_dim, rotate=True, rngs=rngs)

    def queries(self, x_btd, cq_btr, cos, sin, qat_sim: bool):
        """-> q [B, T, HI, dI] (roped, Hadamard-rotated, FP4-simulated if qat) and weights [B, T, HI]."""
        b, t, _ = x_btd.shape
        q = self.wq_b(cq_btr).reshape(b, t, self.n_heads, self.head_dim)
        q = apply_rope(q, cos[:, :, None], sin[:, :, None])
        q = quant.hadamard(q)
        if qat_sim:
            q = quant.fp4_sim(q, 32)
        w = self.weights_proj(x_btd).astype(jnp.float32) * (self.head_dim ** -0.5 * self.n_heads ** -0.5)
        return q, w


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rngs):
        h, c, g = cfg.num_attention_heads, cfg.head_dim, cfg.o_groups
        self.cfg = cfg
        self.ratio = cfg.layer_ratio(layer)
        self.n_heads, self.head_dim, self.rd, self.groups = h, c, cfg.qk_rope_head_dim, g
        self.window = cfg.sliding_window
        self.wq_a = Linear(cfg, cfg.dim, cfg.q_lora_rank, ("q_lora", "embed"), rngs)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, cfg.param_dtype)
        self.wq_b = Linear(cfg, cfg.q_lora_rank, h * c, ("heads_dim", "q_lora"), rngs)
        self.wkv = Linear(cfg, cfg.dim, c, ("kv", "embed"), rngs)
        self.kv_norm = RMSNorm(c, cfg.rms_norm_eps, cfg.param_dtype)
        self.wo_a = Linear(cfg, h * c // g, g * cfg.o_lora_rank, ("o_lora", "o_in"), rngs)
        self.wo_b = Linear(cfg, g * cfg.o_lora_rank, cfg.dim, ("embed", "o_lora"), rngs)
        self.attn_sink = param(None, (h,), ("heads",), "vector", init="zeros")
        if self.ratio:
            self.compressor = Compressor(cfg, self.ratio, c, rotate=False, rngs=rngs)
        if self.ratio == 4:
            self.indexer = Indexer(cfg, rngs)

    # ---------------------------------------------------------------- state
    def entries_for(self, context: int) -> int:
        return max(1, context // self.ratio) if self.ratio else 0

    def empty_state(self, batch: int, context: int, dtype, layout: str | None = None) -> dict:
        """Decode state able to hold `context` tokens: window, and compressor tails + entry buffers.

        `layout` (kvstore): None = plain arrays in `dtype`, "bfloat16", or the "fp8" serving layout."""
        st = {"win": kvstore.empty((batch, self.window, self.head_dim), dtype, layout, "main", self.rd)}
        n = self.entries_for(context)
        if self.ratio:
            st["comp"] = self.compressor.empty_state(batch, n, dtype, layout)
        if self.ratio == 4:
            st["index"] = self.indexer.compressor.empty_state(batch, n, dtype, layout)
        return st

    # ---------------------------------------------------------------- forward
    def __call__(self, x_btd: jax.Array, start_b: jax.Array, state: dict | None, pos_bt=None, seg_bt=None,
                 valid_b=None, context_limit: int | None = None):
        """x [B, T, d] at positions start_b[b] + t -> (out [B, T, d], new state, {topk, indexer_kl}).

        Packed training passes per-token `pos_bt` (restarting per document) and `seg_bt` (document
        ids): nothing attends across documents. Documents must start at multiples of every
        compression ratio (the data packer aligns them) so compressed blocks never straddle two.
        Decoding a batch of unequal chunks passes `valid_b` [B]: row b's first valid_b[b] tokens are
        real and only they enter the state (outputs at padding positions are meaningless).
        `context_limit` (static): every position of this call is below it, so attention reads only
        the first context_limit // ratio entries of the (larger, preallocated) buffers."""
        cfg = self.cfg
        b, t, _ = x_btd.shape
        dtype = x_btd.dtype
        fresh = state is None  # a whole sequence from position 0: attention may split it by causality
        if state is None:
            state = self.empty_state(b, t, dtype)
        if pos_bt is None:
            pos_bt = start_b[:, None] + jnp.arange(t)[None, :]
        if seg_bt is None:
            seg_bt = jnp.zeros((b, t), jnp.int32)
        inv_freq = rope_inv_freq(cfg, compressed_layer=self.ratio > 0)
        cos, sin = rope_cos_sin(pos_bt, inv_freq)  # [B, T, rd/2]

        cq = self.q_norm(self.wq_a(x_btd))  # [B, T, q_lora]
        q = self.wq_b(cq).reshape(b, t, self.n_heads, self.head_dim)
        q = rms_norm(q, None, cfg.rms_norm_eps)  # per-head, unweighted
        q = apply_rope(q, cos[:, :, None], sin[:, :, None])
        kv = apply_rope(self.kv_norm(self.wkv(x_btd)), cos, sin)  # [B, T, c]
        if cfg.qat_sim:
            nope = self.head_dim - self.rd
            kv = jnp.concatenate([quant.fp8_sim(kv[..., :nope], 64), kv[..., nope:]], axis=-1)

        win = kvstore.decode(state["win"], dtype)  # [B, W, c]
        new_state = {"win": kvstore.shift_in(state["win"], kv, valid_b)}
        comp = index = None
        if self.ratio:
            new_state["comp"], ent_seg = self.compressor(x_btd, pos_bt, seg_bt, start_b, state["comp"], inv_freq,
                                                         cfg.qat_sim, valid_b)
            n = self._rows(new_state["comp"]["kv"], context_limit)
            rows = _first_rows(new_state["comp"]["kv"], n)
            # CSA's sparse branch decodes only the k rows it gathers from a quantised store (decode at
            # 1M context would otherwise dequantise all N/4 entries of every CSA layer at every step)
            lazy = (self.ratio == 4 and kvstore.is_quantised(rows) and cfg.csa_mode != "dense"
                    and cfg.attention_kernel == "jnp")
            comp = (rows if lazy else kvstore.decode(rows, dtype), ent_seg[:, :n])
        if self.ratio == 4:
            # with the indexer loss on (training recipe), the indexer learns from detached inputs only
            xi, cqi = (jax.lax.stop_gradient(x_btd), jax.lax.stop_gradient(cq)) if cfg.indexer_loss else (x_btd, cq)
            new_state["index"], _ = self.indexer.compressor(xi, pos_bt, seg_bt, start_b, state["index"], inv_freq,
                                                            cfg.qat_sim, valid_b)
            qi, wi = self.indexer.queries(xi, cqi, cos, sin, cfg.qat_sim)
            index = (qi, wi, kvstore.decode(_first_rows(new_state["index"]["kv"], n), qi.dtype))

        o, topk, kl = self.core(q, kv, win, comp, index, start_b, seg_bt, fresh)
        o = apply_rope(o, cos[:, :, None], sin[:, :, None], inverse=True)
        return self.project_out(o), new_state, {"topk": topk, "indexer_kl": jnp.mean(kl)}

    def _rows(self, store, context_limit):
        n = kvstore.length(store)
        return n if context_limit is None else min(n, max(1, context_limit // self.ratio))

    def project_out(self, o_bthc: jax.Array) -> jax.Array:
        """Grouped low-rank output: group g of heads -> wo_a[g] (o_lora) -> concat -> wo_b."""
        b, t = o_bthc.shape[:2]
        g = self.groups
        o = o_bthc.reshape(b, t, g, -1)
        wo_a = self.wo_a.read(o.dtype, after=o).reshape(g, -1, o.shape[-1])
        z = jnp.einsum("btgi,gri->btgr", o, wo_a, precision=HIGHEST)
        return self.wo_b(z.reshape(b, t, -1))

    def core(self, q, kv, win, comp, index, start_b, seg_bt, fresh=False):
        """Batched sparse attention; vmaps `attend_sequence` over the batch (`fresh`: every row starts
        at position 0 with no earlier state, so query blocks can be grouped by the entries they see)."""
        nblk = -(-q.shape[1] // min(self.cfg.attn_block, q.shape[1]))
        fn = functools.partial(attend_sequence, window=self.window, ratio=self.ratio,
                               groups=CAUSAL_GROUPS if fresh and self.ratio and nblk >= CAUSAL_GROUPS else 1,
                               block=min(self.cfg.attn_block, q.shape[1]), topk=self.cfg.index_topk,
                               scale=self.head_dim ** -0.5, csa_dense=self.cfg.csa_mode == "dense",
                               indexer_loss=self.cfg.indexer_loss, kernel=self.cfg.attention_kernel)
        def batched(sink, q, kv, w, s, seg, c=None, cseg=None, qi=None, wi=None, ki=None):
            def one(q, kv, w, s, seg, c=None, cseg=None, qi=None, wi=None, ki=None):
                return fn(q, kv, w, None if c is None else (c, cseg), None if qi is None else (qi, wi, ki), s, seg,
                          sink)
            return jax.vmap(one)(q, kv, w, s, seg, *[a for a in (c, cseg, qi, wi, ki) if a is not None])

        args = [self.attn_sink[...], q, kv, win, start_b, seg_bt] + list(comp or ()) + list(index or ())
        if self.cfg.attention_kernel != "jnp" and self.ratio == 4 and not jax.sharding.get_abstract_mesh().empty:
            return _per_shard(batched, args, heads_sharded=not self.cfg.indexer_loss)
        return batched(*args)


def _per_shard(fn, args, heads_sharded: bool):
    """fn(sink [H], q [B,T,H,c], rest batch-first...) under `jax.shard_map` on the context mesh: a Pallas
    kernel cannot be partitioned by XLA, so each device runs it on its own rows (the batch axes of the
    rules table) and, when `heads_sharded`, its own query heads (the "heads" rule; K = V and the indexer
    are per row, every head's). With the indexer loss the heads stay whole: its KL target sums them."""
    mesh = jax.sharding.get_abstract_mesh()
    heads = "heads" if heads_sharded else None
    b = args[1].shape[0]
    batch = spec_for(("batch",), (b,), mesh)[0]
    head = spec_for((heads,), (args[1].shape[2],), mesh)[0] if heads else None
    specs = [P(head), P(batch, None, head, None)] + [P(batch) for _ in args[2:]]
    out_specs = (P(batch, None, head, None), P(batch), P(batch))
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(specs), out_specs=out_specs, check_vma=False)(*args)


def _first_rows(store, n: int):
    """Static slice of the first n entry rows (a read: XLA fuses it into the consumers)."""
    return jax.tree.map(lambda x: x[:, :n], store)


def attend_sequence(q_thc, kv_tc, win_wc, comp, index, start, seg_t, sink_h, *, window, ratio, block, topk,
                    scale, csa_dense=False, indexer_loss=False, kernel="jnp", groups=1):
    """One sequence, all query blocks -> (o [T, H, c], top-k ids [T, k] or None, mean indexer KL).

    comp = (entries [N, c], entry segments [N]); seg_t [T] document ids (window rows from the state
    count as segment 0, like every token of a single-document decode). `kernel`: who computes the
    CSA sparse branch ("jnp" = the code below; else a `sparse_gather_attention` impl).
    `groups` > 1 (only for a sequence from position 0, start = 0): the query blocks are split into
    that many consecutive groups and group g scores only the entries its last query can see, i.e. the
    first N*(g+1)/groups; without it every block scores all N entries and masks the non-causal half
    (2x the causal work of HCA and of the CSA indexer; with 8 groups 1.125x)."""
    t, h, c = q_thc.shape
    nblk = -(-t // block)
    tp = nblk * block
    pad = tp - t
    q_pad = jnp.pad(q_thc, ((0, pad), (0, 0), (0, 0)))
    qseg = jnp.pad(seg_t, (0, pad), constant_values=-1)
    ext = jnp.concatenate([win_wc, kv_tc, jnp.zeros((pad, c), kv_tc.dtype)], axis=0)  # [W + Tp, c]
    kseg = jnp.concatenate([jnp.zeros((window,), seg_t.dtype), seg_t, jnp.full((pad,), -2, seg_t.dtype)])
    comp_nc, cseg = comp if comp is not None else (None, None)  # entries: rows [N, c] or a quantised store
    n_ent = None if comp_nc is None else kvstore.length(comp_nc)
    if index is not None:
        qi, wi, ki = index
        qi = jnp.pad(qi, ((0, pad), (0, 0), (0, 0)))
        wi = jnp.pad(wi, ((0, pad), (0, 0)))

    def one_block(bi, comp_nc, cseg, ki):
        j0 = bi * block
        q = jax.lax.dynamic_slice_in_dim(q_pad, j0, block)  # [Q, H, c]
        keys = jax.lax.dynamic_slice_in_dim(ext, j0, block + window)  # [Q+W, c]
        qs = jax.lax.dynamic_slice_in_dim(qseg, j0, block)[:, None]  # [Q, 1]
        ks = jax.lax.dynamic_slice_in_dim(kseg, j0, block + window)[None, :]
        win_lg, win_keys = _window_band(q, keys, ks[0], qs[:, 0], j0 - window + start, window, scale)
        logits = [win_lg]
        vals = idx = score = None
        if ratio:
            pos = start + j0 + jnp.arange(block)  # [Q]
            ok = (jnp.arange(kvstore.length(comp_nc))[None, :] < ((pos + 1) // ratio)[:, None]) & (cseg[None, :] == qs)
            iblk = None if index is None else tuple(jax.lax.dynamic_slice_in_dim(a, j0, block) for a in (qi, wi))
            if iblk is not None and not csa_dense and kernel != "jnp":
                jj, r = jnp.arange(block)[:, None], jnp.arange(block + window)[None, :]
                win_ok = (r >= jj + 1) & (r <= jj + window) & (j0 + r >= window - start) & (ks == qs)
                return _csa_kernel_block(q, keys, win_ok, comp_nc, ok, iblk, ki, sink_h, topk, scale, kernel,
                                         indexer_loss)
            lg, vals, idx, score = _compressed_branch(q, comp_nc, ok, iblk, ki if index is not None else None,
                                                      topk, scale, csa_dense)
            logits.append(lg)
        o, p = _sink_softmax_mix(logits, win_keys, vals, sink_h)
        kl = _indexer_kl(p[..., win_lg.shape[-1]:], score) if indexer_loss and score is not None else jnp.zeros((2,))
        return o, idx, kl

    outs = []
    for b0, b1 in _block_groups(nblk, groups):
        n = None if comp_nc is None else min(n_ent, max(1, b1 * block // ratio) if groups > 1 else 1 << 62)
        one = functools.partial(one_block, comp_nc=None if comp_nc is None else jax.tree.map(lambda a: a[:n], comp_nc),
                                cseg=None if cseg is None else cseg[:n], ki=None if index is None else ki[:n])
        # rematerialised: the backward recomputes a block's logits and probabilities instead of keeping
        # them for every block (that would be T x (Q + W + k or N) per head: an S x S/m buffer for HCA)
        o, idx, kl = jax.lax.map(jax.checkpoint(one), jnp.arange(b0, b1))
        if idx is not None and idx.shape[-1] < min(topk, n_ent):  # an early group: fewer entries
            idx = jnp.pad(idx, ((0, 0), (0, 0), (0, min(topk, n_ent) - idx.shape[-1])), constant_values=-1)
        outs.append((o, idx, kl))
    o, idx, kl = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *outs)
    o = o.reshape(tp, h, c)[:t]
    if idx is not None:
        idx = idx.reshape(tp, -1)[:t]
    kl = jnp.sum(kl, axis=0)
    return o, idx, kl[0] / jnp.maximum(kl[1], 1.0)


def _block_groups(nblk: int, groups: int):
    """[(first block, end block)] of `groups` consecutive, near-equal groups."""
    ends = [nblk * (g + 1) // groups for g in range(groups)]
    return [(b0, b1) for b0, b1 in zip([0] + ends[:-1], ends) if b1 > b0]


def _window_band(q_qhc, keys_rc, kseg_r, qseg_q, pos0, window: int, scale):
    """Window logits of a query block, in sub-blocks of S = WINDOW_SUB queries: sub-block i scores only
    its own S + W slab rows [iS, iS + S + W) of the block's key slab (rows = W state/earlier rows, then
    the block's own), so the band costs (S + W) / W of the useful work instead of (Q + W) / W.

    q [Q, H, c], keys [Q+W, c], kseg [Q+W], qseg [Q]; pos0 = position of slab row 0 (rows below 0 are
    empty state) -> (logits [Q, H, S+W] (-inf where not visible), slab keys [Q/S, S+W, c]).
    Query j sees slab rows j+1 .. j+W of the same document."""
    nq, h, c = q_qhc.shape
    sb = WINDOW_SUB if nq % WINDOW_SUB == 0 else nq
    ns, nk = nq // sb, sb + window
    rows = jnp.arange(ns)[:, None] * sb + jnp.arange(nk)[None, :]  # [Q/S, S+W] slab rows
    keys = keys_rc[rows]  # [Q/S, S+W, c] (static slices)
    jj = jnp.arange(sb)[:, None]
    rr = jnp.arange(nk)[None, :]
    ok = (rr >= jj + 1) & (rr <= jj + window)  # [S, S+W], same for every sub-block
    ok = ok[None] & (pos0 + rows >= 0)[:, None, :] & (kseg_r[rows][:, None, :] == qseg_q.reshape(ns, sb)[:, :, None])
    lg = jnp.einsum("sqhc,skc->sqhk", q_qhc.reshape(ns, sb, h, c), keys, precision=HIGHEST).astype(jnp.float32)
    lg = jnp.where(ok[:, :, None, :], lg * scale, -jnp.inf)
    return lg.reshape(nq, h, nk), keys


def _compressed_branch(q, comp_nc, ok_qn, iblk, ki, topk, scale, csa_dense):
    """-> (logits [Q, H, K], values, top-k ids [Q, k] or None, indexer scores over the same K or None).

    HCA (no indexer): every causal entry. CSA: the indexer's top-k entries, gathered; or, in the dense
    phase of the training recipe, every causal entry (the indexer is still scored, for its KL loss)."""
    if iblk is None or csa_dense:
        lg = jnp.where(ok_qn[:, None, :], _qk(q, comp_nc, scale), -jnp.inf)
        if iblk is None:
            return lg, comp_nc, None, None
        s = index_scores(*iblk, ki, ok_qn)
        _, idx = jax.lax.top_k(s, min(topk, s.shape[-1]))
        return lg, comp_nc, idx, s
    idx, val = _csa_topk(iblk, ki, ok_qn, topk)
    vals = _gather_rows(comp_nc, jnp.maximum(idx, 0), q.dtype)  # [Q, k, c]: a gather, never a mask
    lg = jnp.einsum("qhc,qkc->qhk", q, vals, precision=HIGHEST) * scale
    return jnp.where((idx >= 0)[:, None, :], lg, -jnp.inf), vals, idx, val


def _gather_rows(store, idx, dtype):
    """Entry rows store[idx] in `dtype`; a quantised store is gathered first, then only those rows decoded."""
    if kvstore.is_quantised(store):
        return kvstore.decode(jax.tree.map(lambda a: a[idx], store), dtype)
    return store[idx]


def _csa_topk(iblk, ki, ok_qn, topk):
    """Indexer top-k -> (ids [Q, k] with -1 = none, their scores [Q, k])."""
    s = index_scores(*iblk, ki, ok_qn)
    val, idx = jax.lax.top_k(s, min(topk, s.shape[-1]))
    return jnp.where(val > -jnp.inf, idx, -1), val


def _csa_kernel_block(q, keys, win_ok, comp_nc, ok_qn, iblk, ki, sink_h, topk, scale, impl, indexer_loss):
    """CSA sparse query block through `sparse_gather_attention` -> (o [Q, H, c], ids [Q, k], KL sums).

    With the indexer loss, the KL target p = exp(logit - lse) over the selected entries is recomputed
    here from the kernel's lse (it carries no gradient, see `_indexer_kl`)."""
    idx, score = _csa_topk(iblk, ki, ok_qn, topk)
    o, lse_qh = sparse_gather_attention(q, keys, win_ok, comp_nc, idx, sink_h, scale=scale, impl=impl)
    if not indexer_loss:
        return o, idx, jnp.zeros((2,))
    vals = comp_nc[jnp.maximum(idx, 0)]  # [Q, k, c]
    lg = jnp.einsum("qhc,qkc->qhk", q, vals, precision=HIGHEST).astype(jnp.float32) * scale
    p = jnp.where((idx >= 0)[:, None, :], jnp.exp(lg - jax.lax.stop_gradient(lse_qh)[..., None]), 0.0)
    return o, idx, _indexer_kl(p, score)


def _indexer_kl(p_qhk, s_qk):
    """[sum over queries of KL(attention || indexer), number of queries] over the same candidates.

    Target: the main attention's probabilities on the compressed candidates, summed over heads and
    L1-normalised (no gradient); prediction: softmax of the index scores (spec §12.2, V3.2 recipe)."""
    target = jax.lax.stop_gradient(jnp.sum(p_qhk.astype(jnp.float32), axis=1))  # [Q, K]
    z = jnp.sum(target, axis=-1, keepdims=True)
    valid = (z[:, 0] > 0) & jnp.any(jnp.isfinite(s_qk), axis=-1)
    target = target / jnp.maximum(z, 1e-30)
    logq = jax.nn.log_softmax(jnp.where(jnp.isfinite(s_qk), s_qk, -1e30), axis=-1)
    kl = jnp.sum(jnp.where(target > 0, target * (jnp.log(jnp.maximum(target, 1e-30)) - logq), 0.0), axis=-1)
    return jnp.stack([jnp.sum(jnp.where(valid, kl, 0.0)), jnp.sum(valid.astype(jnp.float32))])


def _qk(q_qhc, k_kc, scale):
    return jnp.einsum("qhc,kc->qhk", q_qhc, k_kc, precision=HIGHEST).astype(jnp.float32) * scale


def _sink_softmax_mix(logits, win_keys, comp_vals, sink_h):
    """One softmax over [window | compressed] logits with exp(sink) in the denominator; K = V."""
    p, _ = sink_softmax(jnp.concatenate([l.astype(jnp.float32) for l in logits], axis=-1), sink_h)  # [Q, H, K]
    p = p.astype(win_keys.dtype)
    ns, nw, c = win_keys.shape  # window slab keys per query sub-block (`_window_band`)
    q, h = p.shape[:2]
    o = jnp.einsum("sqhk,skc->sqhc", p[..., :nw].reshape(ns, q // ns, h, nw), win_keys,
                   precision=HIGHEST).reshape(q, h, c)
    if comp_vals is not None:
        eq = "qhk,qkc->qhc" if comp_vals.ndim == 3 else "qhk,kc->qhc"
        o = o + jnp.einsum(eq, p[..., nw:], comp_vals, precision=HIGHEST)
    return o, p


INDEX_SLAB = 1 << 25  # most elements of one [keys, Q, H] slab of indexer products (128 MiB in fp32)


def index_scores(q_qhd, w_qh, k_nd, ok_qn):
    """Lightning-indexer scores sum_h w[q,h] relu(q[q,h].k[n]) [Q, N]; -inf where not causal/same document.

    The keys are the dot's left operand (n first), so XLA streams the long key buffer as stored
    instead of transposing it at every decode step. The products [N, Q, H] exist one key block at a
    time (`_key_block`): a 128-query prefill block at 1M context (N = 262,144, H = 64) would otherwise
    hold 8.6 GB of them; decode (Q = 1) and training lengths fit in one block."""
    n, (nq, h) = k_nd.shape[0], w_qh.shape
    blk = _key_block(n, nq * h)
    if blk == n:
        s_nq = _weighted_relu_scores(k_nd, q_qhd, w_qh)
    else:  # blocks of keys in turn: [N/blk, blk, d] -> [N/blk, blk, Q]
        s_nq = jax.lax.map(lambda k_bd: _weighted_relu_scores(k_bd, q_qhd, w_qh),
                           k_nd.reshape(n // blk, blk, -1)).reshape(n, nq)
    return jnp.where(ok_qn, s_nq.T, -jnp.inf)


def _weighted_relu_scores(k_nd, q_qhd, w_qh):
    """[N, d] keys, [Q, H, d] queries, [Q, H] weights -> sum_h w relu(q.k) [N, Q] fp32."""
    s = jnp.einsum("nd,qhd->nqh", k_nd, q_qhd, precision=HIGHEST).astype(jnp.float32)
    return jnp.einsum("nqh,qh->nq", jax.nn.relu(s), w_qh, precision=HIGHEST)


def _key_block(n: int, qh: int) -> int:
    """Keys per indexer block: all n when n x qh <= INDEX_SLAB, else the largest power of two dividing
    n with block x qh <= INDEX_SLAB (all n when that is under 128 keys)."""
    if n * qh <= INDEX_SLAB:
        return n
    blk = 1 << max(0, (INDEX_SLAB // qh).bit_length() - 1)
    while n % blk:
        blk //= 2
    return blk if blk >= 128 else n
