"""CSA sparse attention: window keys + top-k gathered compressed entries, one softmax with a sink.

For one block of Q queries (H heads, head dim c, one shared K = V vector per candidate):
  q_qhc      [Q, H, c]   queries
  win_kc     [Kw, c]     window slab shared by the block (Kw = Q + W rows in `attend_sequence`)
  win_ok_qw  [Q, Kw]     which slab rows each query sees (causal, in the window, same document)
  entries_nc [N, c]      compressed entries
  idx_qk     [Q, k]      the indexer's top-k entry ids per query, -1 = none
  sink_h     [H]         learned sink logit (takes probability mass, has no value)
  logits = q_h . key * scale over (visible window rows) ++ (entries[idx >= 0]); ONE softmax with
  exp(sink_h) added to the denominator; o_qhc = sum p * key.  Also returned: lse_qh, the log of that
  denominator (so p = exp(logit - lse) can be recomputed, e.g. for the indexer's KL target).

`impl` (the `attention_kernel` config key):
  "jnp"         the reference: gathers [Q, k, c] and materialises [Q, H, Kw + k] logits.
  "pallas_tpu"  Mosaic kernel, grid (sequence, query) with every head of a query in one step (K = V is
                shared by the heads, so each gathered row is read once for all H). Each step copies its
                query's k top-k ids from HBM into an SMEM scratch row (k int32: SMEM never holds more);
                they drive one DMA per selected entry row from HBM into one of two VMEM buffers of
                `block_k` rows (double-buffered: the next chunk's rows are in flight while one is used).
                Window then entry chunks are folded in with an online softmax whose running max starts
                at the sink (always finite, no NaN for a query with no valid candidate).
  "pallas_gpu"  Triton-style kernel, same grid and online softmax; entry rows are gathered with a
                masked vector load (`plgpu.load(ref.at[rows], mask=...)`). Heads are padded to a power
                of two >= 16 and the chunked axes to powers of two >= 16 (Triton block shapes, tl.dot sizes).
Both kernels run in interpret mode automatically when jax.default_backend() == "cpu".

Gradients: `jax.custom_vjp`; the backward of the Pallas paths RECOMPUTES the jnp reference and takes
its vjp (no Pallas backward kernel yet), so gradients are exact but the backward pass has the
reference's memory footprint. Batching: a `custom_vmap` rule folds vmapped axes (batch, layers)
into the kernels' leading sequence axis instead of looping over pallas_calls.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

IMPLS = ("jnp", "pallas_tpu", "pallas_gpu")
HIGHEST = jax.lax.Precision.HIGHEST


def sparse_gather_attention(q_qhc, win_kc, win_ok_qw, entries_nc, idx_qk, sink_h, *, scale: float,
                            impl: str = "jnp", interpret=None, block_k: int = 128):
    """-> (o_qhc [Q, H, c] in the keys' dtype, lse_qh [Q, H] float32). See the module docstring.

    `interpret`: None = interpret exactly when running on CPU; or a bool, or (TPU) a hashable
    `pltpu.InterpretParams()` for the stricter TPU interpreter (DMA / semaphore semantics checked).
    `block_k`: entry rows gathered per online-softmax step."""
    if impl not in IMPLS:
        raise ValueError(f"sparse_gather_attention: impl must be one of {IMPLS}, got {impl!r}")
    idx_qk = idx_qk.astype(jnp.int32)
    if impl == "jnp":
        return reference(q_qhc, win_kc, win_ok_qw, entries_nc, idx_qk, sink_h, scale)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return _kernel_attention(q_qhc, win_kc, win_ok_qw, entries_nc, idx_qk, sink_h,
                             (float(scale), impl, interpret, int(block_k)))


def reference(q_qhc, win_kc, win_ok_qw, entries_nc, idx_qk, sink_h, scale):
    """The plain-jnp math (identical to `attention._compressed_branch` + `_sink_softmax_mix`)."""
    lw = jnp.einsum("qhc,wc->qhw", q_qhc, win_kc, precision=HIGHEST).astype(jnp.float32) * scale
    lw = jnp.where(win_ok_qw[:, None, :], lw, -jnp.inf)
    vals_qkc = entries_nc[jnp.maximum(idx_qk, 0)]
    lc = jnp.einsum("qhc,qkc->qhk", q_qhc, vals_qkc, precision=HIGHEST).astype(jnp.float32) * scale
    lc = jnp.where((idx_qk >= 0)[:, None, :], lc, -jnp.inf)
    p, lse = sink_softmax(jnp.concatenate([lw, lc], axis=-1), sink_h)  # [Q, H, Kw + k]
    p = p.astype(win_kc.dtype)
    nw = win_kc.shape[0]
    o = jnp.einsum("qhw,wc->qhc", p[..., :nw], win_kc, precision=HIGHEST)
    o = o + jnp.einsum("qhk,qkc->qhc", p[..., nw:], vals_qkc, precision=HIGHEST)
    return o, lse


def sink_softmax(lg_qhk, sink_h):
    """Softmax over the last axis of fp32 logits with exp(sink_h) added to the denominator (the sink
    takes probability mass and has no value) -> (p [Q, H, K], lse_qh = log of that denominator)."""
    sink = sink_h.astype(jnp.float32)[None, :]
    mx = jnp.maximum(jnp.max(lg_qhk, axis=-1), sink)  # [Q, H], finite thanks to the sink
    p = jnp.exp(lg_qhk - mx[..., None])
    den = jnp.sum(p, axis=-1) + jnp.exp(sink - mx)
    return p / den[..., None], mx + jnp.log(den)


# ------------------------------------------------------------------ custom vjp (backward = reference)
@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _kernel_attention(q, win, ok, ent, idx, sink, statics):
    o, lse = _batched_kernel(*statics)(q[None], win[None], ok[None], ent[None], idx[None], sink[None])
    return o[0], lse[0]


def _kernel_fwd(q, win, ok, ent, idx, sink, statics):
    return _kernel_attention(q, win, ok, ent, idx, sink, statics), (q, win, ok, ent, idx, sink)


def _kernel_bwd(statics, res, cts):
    q, win, ok, ent, idx, sink = res
    _, vjp = jax.vjp(lambda q, w, e, s: reference(q, w, ok, e, idx, s, statics[0]), q, win, ent, sink)
    dq, dw, de, ds = vjp(cts)
    return dq, dw, None, de, None, ds


_kernel_attention.defvjp(_kernel_fwd, _kernel_bwd)


@functools.lru_cache(maxsize=None)
def _batched_kernel(scale, impl, interpret, block_k):
    """The kernel over a leading sequence axis G; vmapped axes fold into G (one pallas_call)."""
    body = _tpu_forward if impl == "pallas_tpu" else _gpu_forward

    @jax.custom_batching.custom_vmap
    def run(q_gqhc, win_gwc, ok_gqw, ent_gnc, idx_gqk, sink_gh):
        o, lse = body(q_gqhc, win_gwc, ok_gqw.astype(jnp.int32), ent_gnc, idx_gqk, sink_gh.astype(jnp.float32),
                      scale=scale, interpret=interpret, block_k=block_k)
        return o[..., :q_gqhc.shape[2], :q_gqhc.shape[3]].astype(win_gwc.dtype), lse[..., :q_gqhc.shape[2]]

    @run.def_vmap
    def _rule(axis_size, in_batched, *args):
        def fold(x, batched):
            x = x if batched else jnp.broadcast_to(x, (axis_size,) + x.shape)
            return x.reshape((-1,) + x.shape[2:])

        o, lse = run(*[fold(x, b) for x, b in zip(args, in_batched)])
        unfold = lambda y: y.reshape((axis_size, -1) + y.shape[1:])  # noqa: E731
        return (unfold(o), unfold(lse)), (True, True)

    return run


def _prec(dtype):
    return HIGHEST if dtype == jnp.float32 else None


def _online(carry, s_hn, vals_nc):
    """Fold one chunk of logits [H, n] (values [n, c]) into (max [H,1], denominator [H,1], acc [H,c])."""
    m, l, acc = carry
    m_new = jnp.maximum(m, jnp.max(s_hn, axis=-1, keepdims=True))
    a = jnp.exp(m - m_new)
    p = jnp.exp(s_hn - m_new)
    pv = jax.lax.dot_general(p.astype(vals_nc.dtype), vals_nc, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32, precision=_prec(vals_nc.dtype))
    return m_new, a * l + jnp.sum(p, axis=-1, keepdims=True), a * acc + pv


def _logits(q_hc, k_nc, scale):
    s = jax.lax.dot_general(q_hc, k_nc, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                            precision=_prec(q_hc.dtype))
    return s * scale  # [H, n]


def _pad_to(x, axis, size, value=0):
    extra = size - x.shape[axis]
    if extra <= 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


# ------------------------------------------------------------------ Pallas TPU (Mosaic)
def _tpu_forward(q_gqhc, win_gwc, ok_gqw, ent_gnc, idx_gqk, sink_gh, *, scale, interpret, block_k):
    from jax.experimental.pallas import tpu as pltpu

    g, nq, h, c = q_gqhc.shape
    kw = win_gwc.shape[1]
    kb = min(block_k, idx_gqk.shape[2])
    nchunk = -(-idx_gqk.shape[2] // kb)
    kp = nchunk * kb
    idx_gqk = _pad_to(idx_gqk, 2, kp, -1)
    dt = ent_gnc.dtype

    def kernel(q_ref, win_ref, ok_ref, idxv_ref, sink_ref, idx_hbm, ent_hbm, o_ref, lse_ref, ids, buf, sem, id_sem):
        gi, qi = pl.program_id(0), pl.program_id(1)

        def row_copy(slot, j, row):  # one entry row HBM -> buf[slot, j]; all of a slot's copies share sem[slot]
            return pltpu.make_async_copy(ent_hbm.at[gi, pl.ds(row, 1)], buf.at[slot, pl.ds(j, 1)], sem.at[slot])

        def start_chunk(ci, slot):
            base = ci * kb
            jax.lax.fori_loop(0, kb, lambda j, _: row_copy(slot, j, jnp.maximum(ids[base + j], 0)).start(), None)

        def wait_chunk(slot):  # a wait needs only the byte count: row 0 stands for every row
            jax.lax.fori_loop(0, kb, lambda j, _: row_copy(slot, j, 0).wait(), None)

        # this query's top-k ids: HBM -> SMEM scratch (kp int32; SMEM never holds more than one row), then
        # the first chunk's gathers start while the window part is computed
        fetch_ids = pltpu.make_async_copy(idx_hbm.at[gi, qi], ids, id_sem)
        fetch_ids.start()
        fetch_ids.wait()
        start_chunk(0, 0)
        q = q_ref[...]  # [H, c]
        sink = sink_ref[...]  # [H, 1]
        s = jnp.where(ok_ref[...] != 0, _logits(q, win_ref[...], scale), -jnp.inf)  # [H, Kw]
        carry = _online((sink, jnp.ones_like(sink), jnp.zeros((h, c), jnp.float32)), s, win_ref[...])

        def chunk(ci, carry):  # double-buffered: chunk ci+1's rows are in flight while chunk ci is used
            slot = ci % 2

            @pl.when(ci + 1 < nchunk)
            def _():
                start_chunk(ci + 1, 1 - slot)

            wait_chunk(slot)
            vals = buf[slot]  # [kb, c]
            valid = idxv_ref[:, pl.ds(pl.multiple_of(ci * kb, kb), kb)] >= 0  # [1, kb]
            return _online(carry, jnp.where(valid, _logits(q, vals, scale), -jnp.inf), vals)

        m, l, acc = jax.lax.fori_loop(0, nchunk, chunk, carry)
        o_ref[...] = (acc / l).astype(o_ref.dtype)
        lse_ref[...] = m + jnp.log(l)

    row = lambda *shape: pl.BlockSpec((None, None) + shape, lambda gi, qi: (gi, qi) + (0,) * len(shape))  # noqa
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    o, lse = pl.pallas_call(
        kernel, grid=(g, nq),
        in_specs=[row(h, c),                                                        # q     [H, c]
                  pl.BlockSpec((None, kw, c), lambda gi, qi: (gi, 0, 0)),           # window slab
                  row(1, kw),                                                       # mask  [1, Kw]
                  row(1, kp),                                                       # ids   [1, k] (VMEM: validity)
                  pl.BlockSpec((None, h, 1), lambda gi, qi: (gi, 0, 0)),            # sink  [H, 1]
                  hbm,                                                              # ids, HBM (-> SMEM rows)
                  hbm],                                                             # entries, HBM
        out_specs=[row(h, c), row(h, 1)],
        scratch_shapes=[pltpu.SMEM((kp,), jnp.int32), pltpu.VMEM((2, kb, c), dt), pltpu.SemaphoreType.DMA((2,)),
                        pltpu.SemaphoreType.DMA(())],
        out_shape=[jax.ShapeDtypeStruct((g, nq, h, c), jnp.float32), jax.ShapeDtypeStruct((g, nq, h, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret, name="csa_sparse_attention_tpu",
    )(q_gqhc, win_gwc, ok_gqw[:, :, None, :], idx_gqk[:, :, None, :], sink_gh[..., None], idx_gqk, ent_gnc)
    return o, lse[..., 0]


# ------------------------------------------------------------------ Pallas GPU (Triton)
def _gpu_forward(q_gqhc, win_gwc, ok_gqw, ent_gnc, idx_gqk, sink_gh, *, scale, interpret, block_k):
    from jax.experimental.pallas import triton as plgpu

    pow2 = lambda n: 1 << max(0, (int(n) - 1).bit_length())  # noqa: E731
    g, nq, h, c = q_gqhc.shape
    hp, cp = max(16, pow2(h)), pow2(c)
    kb = max(16, min(pow2(block_k), pow2(idx_gqk.shape[2])))  # tl.dot wants every dim >= 16
    wb = max(16, min(pow2(block_k), pow2(win_gwc.shape[1])))
    nk, nw = -(-idx_gqk.shape[2] // kb), -(-win_gwc.shape[1] // wb)
    q_gqhc = _pad_to(_pad_to(q_gqhc, 2, hp), 3, cp)
    win_gwc = _pad_to(_pad_to(win_gwc, 1, nw * wb), 2, cp)
    ok_gqw = _pad_to(ok_gqw, 2, nw * wb)
    ent_gnc = _pad_to(ent_gnc, 2, cp)
    idx_gqk = _pad_to(idx_gqk, 2, nk * kb, -1)
    sink_gh = _pad_to(sink_gh, 1, hp)
    n = ent_gnc.shape[1]

    def kernel(q_ref, win_ref, ok_ref, idx_ref, sink_ref, ent_ref, o_ref, lse_ref):
        q = q_ref[...]  # [Hp, c]
        sink = sink_ref[...][:, None]  # [Hp, 1]
        carry = (sink, jnp.ones_like(sink), jnp.zeros((hp, cp), jnp.float32))

        def window(ci, carry):
            rows = pl.ds(pl.multiple_of(ci * wb, wb), wb)
            keys = win_ref[rows, :]  # [wb, c]
            s = jnp.where((ok_ref[rows] != 0)[None, :], _logits(q, keys, scale), -jnp.inf)
            return _online(carry, s, keys)

        def entries(ci, carry):
            ids = idx_ref[pl.ds(pl.multiple_of(ci * kb, kb), kb)]  # [kb]
            valid = ids >= 0
            rows, cols = jnp.maximum(ids, 0)[:, None], jax.lax.broadcasted_iota(jnp.int32, (1, cp), 1)
            vals = plgpu.load(ent_ref.at[rows, cols],  # gathered rows [kb, c] (pointer gather)
                              mask=jnp.broadcast_to(valid[:, None], (kb, cp)), other=0.0)
            s = jnp.where(valid[None, :], _logits(q, vals, scale), -jnp.inf)
            return _online(carry, s, vals)

        carry = jax.lax.fori_loop(0, nw, window, carry)
        m, l, acc = jax.lax.fori_loop(0, nk, entries, carry)
        o_ref[...] = (acc / l).astype(o_ref.dtype)
        lse_ref[...] = (m + jnp.log(l))[:, 0]

    per_q = lambda *shape: pl.BlockSpec((None, None) + shape, lambda gi, qi: (gi, qi) + (0,) * len(shape))  # noqa
    per_g = lambda *shape: pl.BlockSpec((None,) + shape, lambda gi, qi: (gi,) + (0,) * len(shape))  # noqa
    return pl.pallas_call(
        kernel, grid=(g, nq),
        in_specs=[per_q(hp, cp), per_g(nw * wb, cp), per_q(nw * wb), per_q(nk * kb), per_g(hp), per_g(n, cp)],
        out_specs=[per_q(hp, cp), per_q(hp)],
        out_shape=[jax.ShapeDtypeStruct((g, nq, hp, cp), jnp.float32), jax.ShapeDtypeStruct((g, nq, hp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret, name="csa_sparse_attention_gpu",
    )(q_gqhc, win_gwc, ok_gqw, idx_gqk, sink_gh, ent_gnc)
