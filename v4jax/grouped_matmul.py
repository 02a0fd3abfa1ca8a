"""Grouped (sorted) MoE dispatch: exact, static shapes, one grouped-matmul kernel interface.

The T*k (token, expert) assignments a are sorted by expert and laid out in row tiles of `tm` rows, each
tile holding rows of exactly one expert (each expert's group padded up to a multiple of tm; padding rows
are zero). With A = T*k there are at most n = ceil(A/tm) + min(E, A) tiles, M = n*tm rows:
  pos_a    row of assignment a in the [M] layout (expert start + rank within the expert)
  tok_m    token of row m (T, out of range, for padding rows)
  tile_n   expert of tile n (trailing unused tiles: E-1, on zero rows); live_n: tile n is used
  size_e   rows of expert e's padded group (a multiple of tm; sum <= M)
`gmm(lhs_mi, rhs_eoi, layout)` multiplies every row by its expert's matrix (rhs in the checkpoint's
[out, in] layout) with one of three kernels, chosen by `moe_kernel`:
  "jnp"        a `lax.scan` over the tiles, one [tm, i] x [i, o] matmul with its expert's matrix per
               step (custom VJP, d rhs accumulated in place): dense-matmul speed on XLA:CPU, with
               ~1 + E*tm/A rows of work;
  "ragged_dot" `jax.lax.ragged_dot_general` over the expert groups (GPU / TPU; ~E x slower on XLA:CPU);
               lowered for TPU, a HIGH / HIGHEST precision on bf16 operands becomes DEFAULT (see `_gmm_ragged`);
  "megablox"   the Pallas TPU megablox `gmm` (custom VJP: gmm / tgmm backward), interpreted when lowered for
               any other platform.
Rows past sum(size_e) (trailing tiles) are never read back: the combine gathers rows pos_a only, and
the token gather / routing-weight scatter drop them in the backward pass (ragged_dot and megablox
leave them unspecified).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

KERNELS = ("jnp", "ragged_dot", "megablox")
TILE_CANDIDATES = (8, 16, 32, 64, 128, 256, 512)
# one scan step (its expert-matrix read, loop overhead, a small matmul's lower FLOP rate) costs about as
# much as this many rows of matmul (measured on the 2-core XLA:CPU: tm = 32 runs at ~half the dense rate)
STEP_ROWS = 32


def n_tiles(n_assign: int, n_experts: int, tm: int) -> int:
    """Static bound on the tiles: sum_e ceil(c_e / tm) <= ceil(A / tm) + (non-empty experts)."""
    return -(-n_assign // tm) + min(n_experts, n_assign)


def tile_rows(n_assign: int, n_experts: int, kernel: str) -> int:
    """tm: "jnp" minimises the live tiles' cost, n_live * (tm + STEP_ROWS); "ragged_dot" pads least
    (8); "megablox" uses 128-row tiles (its TPU tiling), smaller when there are few rows."""
    if kernel == "ragged_dot":
        return 8
    if kernel == "megablox":
        return max(8, min(128, 1 << max(0, (n_assign // max(n_experts, 1)).bit_length() - 1)))
    live = lambda tm: -(-n_assign // tm) + min(n_experts, n_assign) / 2  # noqa: E731 - tiles run, on average
    return min(TILE_CANDIDATES[1:], key=lambda tm: (live(tm) * (tm + STEP_ROWS), tm))


def layout(idx_tk: jax.Array, n_experts: int, tm: int) -> dict:
    """Sorted tile layout of the assignments idx_tk [T, k] (see the module docstring)."""
    t, k = idx_tk.shape
    a, e = t * k, n_experts
    n = n_tiles(a, e, tm)
    e_a = idx_tk.reshape(-1).astype(jnp.int32)
    count_e = jnp.bincount(e_a, length=e).astype(jnp.int32)
    size_e = (count_e + tm - 1) // tm * tm
    end_e = jnp.cumsum(size_e)
    start_e = end_e - size_e
    order = jnp.argsort(e_a, stable=True)
    rank_sorted = jnp.arange(a, dtype=jnp.int32) - (jnp.cumsum(count_e) - count_e)[e_a[order]]
    rank_a = jnp.zeros((a,), jnp.int32).at[order].set(rank_sorted)
    pos_a = start_e[e_a] + rank_a
    tok_m = jnp.full((n * tm,), t, jnp.int32).at[pos_a].set(jnp.arange(a, dtype=jnp.int32) // k)
    tile_n = jnp.searchsorted(end_e, jnp.arange(n, dtype=jnp.int32) * tm, side="right")
    return {"tm": tm, "pos_a": pos_a, "tok_m": tok_m, "tile_n": jnp.minimum(tile_n, e - 1).astype(jnp.int32),
            "live_n": tile_n < e, "size_e": size_e}


def gmm(lhs_mi: jax.Array, rhs_eoi: jax.Array, lay: dict, kernel: str, out_dtype=None, precision=None):
    """out[m] = lhs[m] @ rhs[expert of m].T: [M, i] x [E, o, i] -> [M, o] (`out_dtype`, default lhs's)."""
    out_dtype = out_dtype or lhs_mi.dtype
    if kernel == "jnp":
        return _gmm_jnp(lhs_mi, rhs_eoi, lay, out_dtype, precision)
    if kernel == "ragged_dot":
        return _gmm_ragged(lhs_mi, rhs_eoi, lay, out_dtype, precision)
    if kernel == "megablox":
        return _gmm_megablox(lhs_mi, rhs_eoi, lay, out_dtype)
    raise ValueError(f"moe_kernel: unknown '{kernel}' (one of {', '.join(KERNELS)})")


def _gmm_jnp(lhs_mi, rhs_eoi, lay, out_dtype, precision):
    return _tile_scan(lhs_mi, rhs_eoi, lay["tile_n"], lay["live_n"], lay["tm"], jnp.dtype(out_dtype), precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _tile_scan(lhs_mi, rhs_eoi, tile_n, live_n, tm, out_dtype, precision):
    """A scan over the n row tiles: out_to = lhs_ti @ rhs[tile_n].T, one expert matrix sliced per step
    (gathering every tile's matrix at once runs at ~1 GB/s on XLA:CPU); unused trailing tiles -> 0."""
    n, o = tile_n.shape[0], rhs_eoi.shape[1]

    def body(_, xs):
        x_ti, e, live = xs

        def mm():
            w_oi = jax.lax.dynamic_index_in_dim(rhs_eoi, e, keepdims=False)
            return jnp.einsum("ti,oi->to", x_ti, w_oi, precision=precision, preferred_element_type=out_dtype)

        return None, jax.lax.cond(live, mm, lambda: jnp.zeros((tm, o), out_dtype))

    _, out_nto = jax.lax.scan(body, None, (lhs_mi.reshape(n, tm, -1), tile_n, live_n))
    return out_nto.reshape(n * tm, o)


def _tile_scan_fwd(lhs_mi, rhs_eoi, tile_n, live_n, tm, out_dtype, precision):
    out = _tile_scan(lhs_mi, rhs_eoi, tile_n, live_n, tm, out_dtype, precision)
    return out, (lhs_mi, rhs_eoi, tile_n, live_n)


def _tile_scan_bwd(tm, out_dtype, precision, res, ct_mo):
    """d lhs = the same scan against rhs^T; d rhs[e] += ct_to^T @ lhs_ti, accumulated in place (fp32)."""
    lhs_mi, rhs_eoi, tile_n, live_n = res
    n = tile_n.shape[0]
    ct_mo = ct_mo.astype(lhs_mi.dtype)
    rhs_eio = rhs_eoi.swapaxes(1, 2).astype(lhs_mi.dtype)
    d_lhs = _tile_scan(ct_mo, rhs_eio, tile_n, live_n, tm, lhs_mi.dtype, precision)

    def body(acc_eoi, xs):
        x_ti, c_to, e, live = xs

        def add():
            upd_oi = jnp.einsum("to,ti->oi", c_to, x_ti, precision=precision, preferred_element_type=jnp.float32)
            cur = jax.lax.dynamic_index_in_dim(acc_eoi, e, keepdims=True)
            return jax.lax.dynamic_update_index_in_dim(acc_eoi, cur + upd_oi[None], e, 0)

        return jax.lax.cond(live, add, lambda: acc_eoi), None

    acc = jnp.zeros(rhs_eoi.shape, jnp.float32)
    d_rhs, _ = jax.lax.scan(body, acc, (lhs_mi.reshape(n, tm, -1), ct_mo.reshape(n, tm, -1), tile_n, live_n))
    return d_lhs, d_rhs.astype(rhs_eoi.dtype), None, None


_tile_scan.defvjp(_tile_scan_fwd, _tile_scan_bwd)


def _gmm_ragged(lhs_mi, rhs_eoi, lay, out_dtype, precision):
    """`ragged_dot_general` [M, i] x [E, o, i] over the expert groups size_e. XLA:TPU runs it as a Mosaic
    kernel that rejects an fp32 contract precision on sub-32-bit operands, so a TPU lowering uses
    `_tpu_precision` (`lax.platform_dependent`: decided when the lowering platform is known, also for
    an AOT compile from a CPU host); CPU / GPU lowerings keep `precision`."""
    dn = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [2]), ([], [])),
                                           lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])

    def call(prec):  # v4jax's meshes use auto axes; an Explicit-axes mesh would also need out_sharding
        return lambda l_mi, r_eoi, s_e: jax.lax.ragged_dot_general(l_mi, r_eoi, s_e, dn, precision=prec,
                                                                   preferred_element_type=out_dtype)

    tpu = _tpu_precision(precision, lhs_mi.dtype, rhs_eoi.dtype)
    args = (lhs_mi, rhs_eoi, lay["size_e"])
    if tpu is precision:
        return call(precision)(*args)
    return jax.lax.platform_dependent(*args, tpu=call(tpu), default=call(precision))


def _tpu_precision(precision, *dtypes):
    """DEFAULT for HIGH / HIGHEST when an operand is narrower than 32 bits (a bf16 x bf16 MXU pass with
    fp32 accumulation already forms exact products; the fp32 contract precision applies to fp32
    operands only), else `precision` itself."""
    if precision is None or all(jnp.dtype(d).itemsize >= 4 for d in dtypes):
        return precision
    try:
        precs = [jax.lax.Precision(p) for p in (precision if isinstance(precision, tuple) else (precision,))
                 if p is not None]
    except (TypeError, ValueError):  # not a Precision (e.g. a DotAlgorithmPreset): left as given
        return precision
    if all(p == jax.lax.Precision.DEFAULT for p in precs):
        return precision
    return jax.lax.Precision.DEFAULT


@functools.lru_cache(maxsize=None)
def megablox_gmm():
    """The megablox `gmm` with its custom VJP, or an ImportError naming what is missing."""
    try:
        from jax.experimental.pallas.ops.tpu.megablox import ops
    except Exception as e:  # noqa: BLE001 - any import failure means the kernel is unavailable
        raise ImportError(f"moe_kernel 'megablox' needs jax.experimental.pallas.ops.tpu.megablox ({e})") from e
    return ops.gmm


def _gmm_megablox(lhs_mi, rhs_eoi, lay, out_dtype):
    """megablox tiling: m a multiple of tm (the layout guarantees it); the k / n dims are tiled by
    min(128, dim) with the kernel masking a ragged last tile. A TPU lowering runs the Mosaic kernel (tm a
    multiple of 8), any other the interpreter: `lax.platform_dependent`, so an AOT compile for a TPU
    topology from a CPU host gets the real kernel too."""
    tm = lay["tm"]
    m, i = lhs_mi.shape
    o = rhs_eoi.shape[1]
    if m % tm:
        raise ValueError(f"moe_kernel 'megablox': rows {m} must be a multiple of tm={tm}")
    tiling = (tm, min(128, i), min(128, o))

    def call(interpret):  # positional: the custom VJP's nondiff args (preferred_element_type, tiling,
        # group_offset, existing_out, transpose_rhs, interpret)
        return lambda l_mi, r_eoi, s_e: megablox_gmm()(l_mi, r_eoi, s_e, jnp.dtype(out_dtype), tiling, None, None,
                                                       True, interpret)

    args = (lhs_mi, rhs_eoi.astype(lhs_mi.dtype), lay["size_e"])
    if tm % 8:  # not a Mosaic tiling: interpreted everywhere (the layouts of `tile_rows` never do this)
        return call(True)(*args)
    return jax.lax.platform_dependent(*args, tpu=call(False), default=call(True))


def dispatch(x_td, r_tk, idx_tk, read, n_experts: int, act, kernel: str, precision=None):
    """Routed-expert output [T, d] fp32: rows x_md = x[tok_m] -> [g | u] = gmm(x, [w1 | w3]) -> h = act(g, u)
    x r_m (routing weight, before w2 as in "dense") -> y_md = gmm(h, w2) fp32 -> y_td = sum_k y[pos_a].
    `read(name)` gives the expert weights [E, o, i] as the forward uses them (QAT applied)."""
    t, k = idx_tk.shape
    dt = x_td.dtype
    lay = layout(idx_tk, n_experts, tile_rows(t * k, n_experts, kernel))
    x_md = x_td.at[lay["tok_m"]].get(mode="fill", fill_value=0)
    w13_egd = jnp.concatenate([read("w1"), read("w3")], axis=1).astype(dt)  # g = 2F: one gmm for w1 and w3
    g_mf, u_mf = jnp.split(gmm(x_md, w13_egd, lay, kernel, precision=precision), 2, axis=1)
    r_m = jnp.zeros((x_md.shape[0],), jnp.float32).at[lay["pos_a"]].set(r_tk.reshape(-1).astype(jnp.float32))
    h_mf = (act(g_mf, u_mf) * r_m[:, None]).astype(dt)
    y_md = gmm(h_mf, read("w2").astype(dt), lay, kernel, out_dtype=jnp.float32, precision=precision)
    # combine: one row gather per k, added (XLA:CPU: 0.55 ms vs 4.4 ms for gather [T*k] + sum over k
    # at T = 4096, d = 512); pos_a is always in range
    pos_tk = lay["pos_a"].reshape(t, k)
    y_td = y_md.at[pos_tk[:, 0]].get(mode="promise_in_bounds")
    for j in range(1, k):
        y_td = y_td + y_md.at[pos_tk[:, j]].get(mode="promise_in_bounds")
    return y_td
