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
                Mosaic only slices tiled memory at tile-aligned offsets, and a bf16 row shares its
                32-bit words with its neighbour (rows 2r, 2r+1 are packed), so a single bf16 row cannot
                be DMA'd: the DMAs move 32-bit word rows instead, bf16 entries through a free in-kernel
                uint32 view [N/2, c] (2x the bytes of the row, one half kept: `_tpu_kernel`).
                AOT-compiled (tests/test_tpu_kernels.py) for v5p / v6e / v5e / tpu7x at the tiny config,
                Flash (H 64, c 512, k 512) and Pro (H 128, c 512, k 1024) shapes, bf16 and fp32: with
                block_k 128 the kernel's scoped VMEM is <= 7 MiB (Flash bf16 1.0 - 1.5 MiB, fp32
                3.1 - 5.4 MiB), under every chip's default limit, so no vmem_limit_bytes is set.
  "pallas_gpu"  Triton-style kernel, same grid and online softmax; entry rows are gathered with a
                masked vector load (`plgpu.load(ref.at[rows], mask=...)`). Heads are padded to a power
                of two >= 16 and the chunked axes to powers of two >= 16 (Triton block shapes, tl.dot sizes).
Both kernels run in interpret mode automatically when lowered for CPU.

Gradients: `jax.custom_vjp`; the backward of the Pallas paths RECOMPUTES the jnp reference and takes
its vjp (no Pallas backward kernel), so gradients are exact. Chosen over a Pallas backward because
d entries is a scatter-add of Q*k rows into [N, c] with colliding ids (the same entry is picked by
many queries and heads): a Mosaic version needs a sort-by-entry pass or serialised read-modify-write
DMAs, while the recompute is one XLA gather / einsum / scatter-add whose memory is bounded per query
block. Its cost: per block call it materialises the gathered [Q, k, c] values and their cotangent
and [Q, H, Kw + k] fp32 logits (Flash bf16, Q 128: ~100 MB of HBM temp), but only one block at a
time under `attend_sequence`'s `lax.map(jax.checkpoint(block))`, so the compiled memory is linear in
the sequence length: value_and_grad compiled for v5p, tiny shapes (H 4, c 128, k 16, W 32) at S = 2,
4, 8, 16, 32, 64 blocks of 128: temp 2.85, 2.77, 3.92, 5.42, 8.57, 14.98 MB (+0.19..0.29 MB a block
from S = 4 on: the stacked o and lse, the rest is XLA re-packing the per-call buffers); Flash shapes
at S = 4, 8, 16, 32: 157, 191, 305, 440 MB (+8.5 MB a block from 16 to 32 = the stacked bf16 o
[Q, H, c]; the 8 -> 16 step also re-packs the constant part).
Batching: a `custom_vmap` rule folds vmapped axes (batch, layers) into the kernels' leading sequence
axis instead of looping over pallas_calls.
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

    `interpret`: None = interpret exactly when lowering for CPU (`lax.platform_dependent`, so an AOT
    compile for a TPU topology from a CPU host gets the Mosaic kernel); or a bool, or (TPU) a hashable
    `pltpu.InterpretParams()` for the stricter TPU interpreter (DMA / semaphore semantics checked).
    `block_k`: entry rows gathered per online-softmax step."""
    if impl not in IMPLS:
        raise ValueError(f"sparse_gather_attention: impl must be one of {IMPLS}, got {impl!r}")
    idx_qk = idx_qk.astype(jnp.int32)
    if impl == "jnp":
        return reference(q_qhc, win_kc, win_ok_qw, entries_nc, idx_qk, sink_h, scale)
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
        args = (q_gqhc, win_gwc, ok_gqw.astype(jnp.int32), ent_gnc, idx_gqk, sink_gh.astype(jnp.float32))
        call = lambda interp: functools.partial(body, scale=scale, interpret=interp, block_k=block_k)  # noqa: E731
        if interpret is None:  # chosen when the lowering platform is known
            o, lse = jax.lax.platform_dependent(*args, cpu=call(True), default=call(False))
        else:
            o, lse = call(interpret)(*args)
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
def _rows_per_word(dtype) -> int:
    """Entry rows per 32-bit word of the DMA view: 1 (32-bit entries) or 2 (bfloat16, packed in pairs)."""
    if jnp.dtype(dtype).itemsize == 4:
        return 1
    if jnp.dtype(dtype) == jnp.bfloat16:
        return 2
    raise ValueError(f"sparse_gather_attention 'pallas_tpu': entries must be 32-bit or bfloat16, got {dtype}")


def _tpu_forward(q_gqhc, win_gwc, ok_gqw, ent_gnc, idx_gqk, sink_gh, *, scale, interpret, block_k):
    """Shapes: q [G, Q, H, c], window [G, Kw, c], ok [G, Q, Kw], entries [G, N, c], ids [G, Q, k] ->
    o [G, Q, H, c] (the window's dtype), lse [G, Q, H] fp32 (written lane-major, [1, H] a query). ids are padded with -1 to nchunk * kb and passed twice: raw in
    HBM (one query's row DMA'd to SMEM: scalar DMA addresses) and as [nchunk, kb] VMEM blocks (validity
    masks; chunk ci is sublane row ci). bf16 entries are DMA'd as 32-bit words (see `_tpu_kernel`); an
    odd N is padded by one zero row so the [N/2, c] word view exists."""
    from jax.experimental.pallas import tpu as pltpu

    g, nq, h, c = q_gqhc.shape
    kw, k = win_gwc.shape[1], idx_gqk.shape[2]
    kb = k if k <= block_k else block_k
    nchunk = -(-k // kb)
    idx_gqk = _pad_to(idx_gqk, 2, nchunk * kb, -1)
    pack = _rows_per_word(ent_gnc.dtype)
    ent = _pad_to(ent_gnc, 1, -(-ent_gnc.shape[1] // pack) * pack)
    view = pack > 1
    if view and isinstance(interpret, pltpu.InterpretParams):  # the strict interpreter cannot DMA through
        ent, view = _word_view(ent), False                     # a bitcast ref: XLA builds the same view
    row = lambda *shape: pl.BlockSpec((None, None) + shape, lambda gi, qi: (gi, qi) + (0,) * len(shape))  # noqa
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    o, lse = pl.pallas_call(
        _tpu_kernel(h, c, kb, nchunk, scale, ent_gnc.dtype, view), grid=(g, nq),
        in_specs=[row(h, c),                                                        # q     [H, c]
                  pl.BlockSpec((None, kw, c), lambda gi, qi: (gi, 0, 0)),           # window slab
                  row(1, kw),                                                       # mask  [1, Kw]
                  row(nchunk, kb),                                                  # ids (validity)
                  pl.BlockSpec((None, h, 1), lambda gi, qi: (gi, 0, 0)),            # sink  [H, 1]
                  hbm,                                                              # ids, HBM (-> SMEM rows)
                  hbm],                                                             # entries, HBM
        out_specs=[row(h, c), row(1, h)],
        scratch_shapes=[pltpu.SMEM((nchunk * kb,), jnp.int32),
                        pltpu.VMEM((2, kb, c), jnp.uint32 if pack > 1 else ent_gnc.dtype),
                        pltpu.SemaphoreType.DMA((2,)), pltpu.SemaphoreType.DMA(())],
        out_shape=[jax.ShapeDtypeStruct((g, nq, h, c), win_gwc.dtype), jax.ShapeDtypeStruct((g, nq, 1, h), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret, name="csa_sparse_attention_tpu",
    )(q_gqhc, win_gwc, ok_gqw[:, :, None, :], idx_gqk.reshape(g, nq, nchunk, kb), sink_gh[..., None], idx_gqk, ent)
    return o, lse[:, :, 0]


def _word_view(ent_gnc):
    """bf16 [G, N, c] -> uint32 [G, N/2, c], word (r, col) = rows 2r (low 16 bits) and 2r+1 (high) at col:
    the layout of the in-kernel ref bitcast, built as an XLA array (a copy) for the strict interpreter."""
    g, n, c = ent_gnc.shape
    return jax.lax.bitcast_convert_type(ent_gnc.reshape(g, n // 2, 2, c).swapaxes(2, 3), jnp.uint32)


def _tpu_kernel(h, c, kb, nchunk, scale, dtype, view):
    """One (sequence gi, query qi) grid step. Mosaic DMAs need slice offsets aligned to the memory tiles
    along the two minor dims; a 32-bit row can start at any sublane, a packed bf16 row cannot (two rows
    share a 32-bit word). So entries are DMA'd as 32-bit words: bf16 [N, c] is viewed (`view`: in-kernel
    ref bitcast, free) as uint32 [N/2, c] whose word row r holds entry rows 2r (low half) and 2r+1 (high
    half); entry id copies word row id >> 1 into buf[slot, j] and `_unpack_rows` keeps its half (2x the
    DMA bytes of a bf16 row, no HBM copy). 32-bit entries are copied row for row (pack = 1)."""
    from jax.experimental.pallas import tpu as pltpu

    pack = _rows_per_word(dtype)

    def kernel(q_ref, win_ref, ok_ref, idxv_ref, sink_ref, idx_hbm, ent_hbm, o_ref, lse_ref, ids, buf, sem, id_sem):
        gi, qi = pl.program_id(0), pl.program_id(1)
        words = ent_hbm.at[gi].bitcast(jnp.uint32) if view else ent_hbm.at[gi]  # [N / pack, c]

        def row_copy(slot, j, word_row):  # one word row HBM -> buf[slot, j]; a slot's copies share sem[slot]
            return pltpu.make_async_copy(words.at[pl.ds(word_row, 1)], buf.at[slot, pl.ds(j, 1)], sem.at[slot])

        def start_chunk(ci, slot):
            def start(j, _):
                row_copy(slot, j, jax.lax.shift_right_logical(jnp.maximum(ids[ci * kb + j], 0), pack - 1)).start()
            jax.lax.fori_loop(0, kb, start, None)

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
            slot = jax.lax.rem(ci, 2)

            @pl.when(ci + 1 < nchunk)
            def _():
                start_chunk(ci + 1, 1 - slot)

            wait_chunk(slot)
            ids_1k = idxv_ref[pl.ds(ci, 1), :]  # [1, kb]
            vals = _unpack_rows(buf[slot], ids_1k, dtype) if pack > 1 else buf[slot]  # [kb, c]
            return _online(carry, jnp.where(ids_1k >= 0, _logits(q, vals, scale), -jnp.inf), vals)

        m, l, acc = jax.lax.fori_loop(0, nchunk, chunk, carry)
        o_ref[...] = (acc / l).astype(o_ref.dtype)
        lse_ref[...] = _flip(m + jnp.log(l))  # [H, 1] -> [1, H]: no 128x lane padding in HBM

    return kernel


def _unpack_rows(w_kc, ids_1k, dtype):
    """bf16 entry rows [kb, c] from their uint32 word rows [kb, c] (row j = the word row of id j).

    The ids' parities are needed per sublane (row), but arrive along lanes [1, kb]: `_flip` turns them
    into a column [kb, 1]. Row 2r is the low half of its word: bf16 bits << 16 are the fp32 of that
    value, so the upper half (id odd) is masked, the lower one shifted; the fp32 -> bf16 cast is exact."""
    odd_k1 = _flip(jnp.maximum(ids_1k, 0) & 1)  # [kb, 1]
    bits = jnp.where(odd_k1 != 0, w_kc & jnp.uint32(0xFFFF0000), jax.lax.shift_left(w_kc, jnp.uint32(16)))
    return jax.lax.bitcast_convert_type(bits, jnp.float32).astype(dtype)


def _flip(x):
    """[n, 1] <-> [1, n] without a vector transpose: a diagonal select and a sum over the size-1 side's
    partner axis (exact: every other term is 0)."""
    n = max(x.shape)
    eye = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0) == jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return jnp.sum(jnp.where(eye, x, jnp.zeros((), x.dtype)), axis=1 if x.shape[0] == 1 else 0, keepdims=True)


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
