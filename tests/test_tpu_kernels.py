"""AOT compiles of the Pallas / Mosaic kernels for TPU topologies, on the CPU host (no TPU needed).

`jax.experimental.topologies.get_topology_desc` gives abstract TPU devices; lowering with shardings on
them and `.compile()` runs the real XLA:TPU compiler, Mosaic included, so a kernel that Mosaic rejects
(tile-misaligned DMA, unsupported matmul precision) or that overflows VMEM fails here. Nothing runs.
  - CSA sparse attention (`impl="pallas_tpu"`, the default `interpret=None`: the TPU lowering must pick
    the Mosaic kernel), forward and value_and_grad, at the tiny config's shapes and at DeepSeek-V4 Flash /
    Pro shapes, bf16 and fp32, for v5p and v6e (forward also v5e, tpu7x);
  - its backward (the jnp recompute) under `lax.map(jax.checkpoint(block))`: temp memory linear in S;
  - the MoE grouped matmuls: megablox `gmm` and `ragged_dot` (bf16, precision HIGHEST), forward + grad.
libtpu missing or the topology API failing: skip, except under CI (env CI set), which must bring libtpu.
"""
import functools
import os
import re

# AOT compiles touch no chip: don't let another process's libtpu lock (e.g. a compile-only run) block us
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from v4jax import grouped_matmul  # noqa: E402
from v4jax.kernels import sparse_gather_attention  # noqa: E402

HIGHEST = jax.lax.Precision.HIGHEST
MIB = 1 << 20
# Q queries, H heads, head dim c, top-k, Kw window rows (Q + W in attend_sequence), N entries. N only
# sizes an HBM operand, so it is kept small; "tiny" = configs/tiny.json with attn_block 128 (W 32),
# "tiny_short" = a 37-token sequence (block = T, N = 37 // 4 = 9 entries, so k = min(16, 9))
SHAPES = {"tiny": (128, 4, 128, 16, 160, 64), "tiny_short": (37, 4, 128, 9, 69, 9),
          "flash": (128, 64, 512, 512, 256, 256), "pro": (128, 128, 512, 1024, 256, 256)}


@functools.lru_cache(maxsize=None)
def _devices(topology: str):
    try:
        import libtpu  # noqa: F401
        from jax.experimental import topologies
        return tuple(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as e:  # noqa: BLE001 - any failure means no TPU compiler here
        return e


def _sharding(topology: str) -> NamedSharding:
    devs = _devices(topology)
    if isinstance(devs, Exception):
        if os.environ.get("CI"):
            pytest.fail(f"TPU topology {topology} unavailable in CI (libtpu must be installed): {devs!r}")
        pytest.skip("libtpu not installed: pip install -e '.[test]'")
    return NamedSharding(Mesh(devs[:1], ("x",)), P())


def _aot(fn, topology, *shapes_dtypes):
    """jit(fn).lower(ShapeDtypeStructs on one TPU device of `topology`).compile()."""
    sh = _sharding(topology)
    return jax.jit(fn).lower(*[jax.ShapeDtypeStruct(s, d, sharding=sh) for s, d in shapes_dtypes]).compile()


def _mosaic_calls(compiled) -> list[tuple[str, int]]:
    """(instruction name, scoped VMEM bytes the kernel uses) of every Mosaic custom call."""
    out = []
    for line in compiled.as_text().splitlines():
        if 'custom_call_target="tpu_custom_call"' in line:
            name = line.strip().split(" ", 1)[0].lstrip("%")
            vmem = re.search(r'used_scoped_memory_configs":\[\{"memory_space":"1","offset":"0","size":"(\d+)"', line)
            out.append((name, int(vmem.group(1)) if vmem else 0))
    return out


# ------------------------------------------------------------------ CSA sparse attention
def _csa_loss(q_bqhc, win_bwc, ok_bqw, ent_bnc, idx_bqk, sink_h):
    """A batch of 2 query blocks (vmapped: the custom_vmap folds it into the kernel's grid)."""
    one = lambda q, w, o, e, i: sparse_gather_attention(q, w, o, e, i, sink_h, scale=0.1, impl="pallas_tpu")  # noqa
    o, lse = jax.vmap(one)(q_bqhc, win_bwc, ok_bqw, ent_bnc, idx_bqk)
    return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(lse)


def _csa_compile(topology, shape, dtype, grad):
    nq, h, c, k, kw, n = SHAPES[shape]
    fn = jax.value_and_grad(_csa_loss, argnums=(0, 1, 3, 5)) if grad else _csa_loss
    args = [((2, nq, h, c), dtype), ((2, kw, c), dtype), ((2, nq, kw), jnp.bool_), ((2, n, c), dtype),
            ((2, nq, k), jnp.int32), ((h,), jnp.float32)]
    return _aot(fn, topology, *args)


def _check_csa_kernel(compiled, shape):
    """One Mosaic call, the CSA kernel; its scoped VMEM holds at least the two gather buffers (2 x kb
    rows of c 32-bit words) and fits the smallest default scoped VMEM limit (16 MiB, v5e) with no
    vmem_limit_bytes."""
    _, _, c, k, _, _ = SHAPES[shape]
    calls = _mosaic_calls(compiled)
    assert [name.split(".")[0] for name, _ in calls] == ["csa_sparse_attention_tpu"], calls
    kb = min(k, 128)
    assert 2 * kb * c * 4 <= calls[0][1] < 16 * MIB, calls


@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x4"])
@pytest.mark.parametrize("shape,dtype", [("tiny", jnp.bfloat16), ("tiny", jnp.float32), ("tiny_short", jnp.bfloat16),
                                         ("flash", jnp.bfloat16)])
def test_csa_kernel_forward_and_grad_compile(topology, shape, dtype):
    """value_and_grad keeps the forward kernel (grad alone would DCE it: the backward recomputes the jnp
    reference). HBM temp bound: the reference backward's per-call buffers, i.e. the gathered [Q, k, c]
    values and their cotangent, a few [Q, H, Kw + k] fp32 logit / probability arrays and [Q, H, c] fp32
    outputs / cotangents (x 2 sequences), plus 4 MiB."""
    compiled = _csa_compile(topology, shape, dtype, grad=True)
    _check_csa_kernel(compiled, shape)
    nq, h, c, k, kw, _ = SHAPES[shape]
    bound = 2 * (2 * nq * k * c * jnp.dtype(dtype).itemsize + 4 * nq * h * (kw + k) * 4 + 2 * nq * h * c * 4) + 4 * MIB
    assert compiled.memory_analysis().temp_size_in_bytes < bound


@pytest.mark.parametrize("topology,shape,dtype", [("v5p:2x2x1", "pro", jnp.bfloat16), ("v6e:2x4", "pro", jnp.float32),
                                                  ("v5e:2x2", "flash", jnp.bfloat16),
                                                  ("tpu7x:2x2x1", "flash", jnp.bfloat16),
                                                  ("tpu7x:2x2x1", "tiny_short", jnp.float32)])
def test_csa_kernel_forward_compiles(topology, shape, dtype):
    _check_csa_kernel(_csa_compile(topology, shape, dtype, grad=False), shape)


def _blocks_loss(q_thc, ext_rc, ent_nc, sink_h, idx_tk, *, block, window):
    """`attend_sequence`'s CSA structure: lax.map over query blocks, each rematerialised (jax.checkpoint)."""
    def one(bi):
        j0 = bi * block
        jj, r = jnp.arange(block)[:, None], jnp.arange(block + window)[None, :]
        o, lse = sparse_gather_attention(
            jax.lax.dynamic_slice_in_dim(q_thc, j0, block), jax.lax.dynamic_slice_in_dim(ext_rc, j0, block + window),
            (r >= jj + 1) & (r <= jj + window), ent_nc, jax.lax.dynamic_slice_in_dim(idx_tk, j0, block), sink_h,
            scale=0.1, impl="pallas_tpu")
        return o, lse

    o, lse = jax.lax.map(jax.checkpoint(one), jnp.arange(q_thc.shape[0] // block))
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(lse)  # constant cotangents: only o, lse are stacked


def test_csa_backward_memory_is_linear_in_sequence():
    """Tiny shapes (H 4, c 128, k 16, W 32, Q 128, N = T / 4), S = 4 and 8 blocks on v5p. Going from 4 to
    8 blocks may add the per-block outputs (o [Q, H, c] bf16 + lse [Q, H] fp32; x 2 slack) plus a
    quarter of temp(4): XLA re-packs the per-call buffers differently at each S (measured S = 2 .. 64:
    +0.19 .. 0.29 MB a block, the 4 -> 8 step being the noisiest). Keeping every block's backward
    residuals (gathered [Q, k, c] values, [Q, H, Kw + k] logits: ~0.9 MB a block) or an [N, c] fp32
    cotangent per block (quadratic) would exceed that."""
    h, c, k, w, q = 4, 128, 16, 32, 128
    temps = {}
    for nblk in (4, 8):
        t = nblk * q
        fn = jax.value_and_grad(functools.partial(_blocks_loss, block=q, window=w), argnums=(0, 1, 2, 3))
        compiled = _aot(fn, "v5p:2x2x1", ((t, h, c), jnp.bfloat16), ((t + w, c), jnp.bfloat16),
                        ((t // 4, c), jnp.bfloat16), ((h,), jnp.float32), ((t, k), jnp.int32))
        assert [n.split(".")[0] for n, _ in _mosaic_calls(compiled)] == ["csa_sparse_attention_tpu"]
        temps[nblk] = compiled.memory_analysis().temp_size_in_bytes
    per_block = q * h * c * 2 + q * h * 4
    assert 0 < temps[8] - temps[4] <= 4 * 2 * per_block + temps[4] // 4, temps


# ------------------------------------------------------------------ MoE grouped matmuls
def _gmm_loss(kernel, n_experts, x_td, w_eoi, idx_tk):
    lay = grouped_matmul.layout(idx_tk, n_experts, grouped_matmul.tile_rows(idx_tk.size, n_experts, kernel))
    x_md = x_td.at[lay["tok_m"]].get(mode="fill", fill_value=0)
    y_mo = grouped_matmul.gmm(x_md, w_eoi, lay, kernel, out_dtype=jnp.float32, precision=HIGHEST)
    return jnp.sum(y_mo ** 2)


@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x4"])
@pytest.mark.parametrize("kernel", ["megablox", "ragged_dot"])
def test_moe_grouped_matmul_forward_and_grad_compile(topology, kernel):
    """bf16 operands, precision HIGHEST (as `Experts.grouped` passes it): ragged_dot's TPU lowering must
    drop to DEFAULT, megablox must be the Mosaic kernel (not the interpreter) in a TPU lowering. Three
    Mosaic calls each: the forward, d lhs (gmm against rhs^T) and d rhs (tgmm / the transposed ragged dot)."""
    t, k, e, d, f = 128, 2, 8, 256, 512
    fn = jax.value_and_grad(functools.partial(_gmm_loss, kernel, e), argnums=(0, 1))
    compiled = _aot(fn, topology, ((t, d), jnp.bfloat16), ((e, f, d), jnp.bfloat16), ((t, k), jnp.int32))
    calls = _mosaic_calls(compiled)
    # megablox: exactly its three kernels. ragged_dot's lowering is libtpu's own and differs by version:
    # 0.0.42 gives one "ragged-dot-metadata" kernel + two matmuls, 0.0.50 two metadata kernels + three
    assert (len(calls) >= 3 if kernel == "ragged_dot" else len(calls) == 3), calls
    assert all(v < 16 * MIB for _, v in calls), calls


def test_ragged_dot_keeps_highest_off_tpu():
    """The CPU lowering is unchanged: bf16 ragged_dot still asks for HIGHEST."""
    lay = grouped_matmul.layout(jnp.zeros((16, 2), jnp.int32), 4, 8)
    fn = lambda x, w: grouped_matmul.gmm(x, w, lay, "ragged_dot", precision=HIGHEST)  # noqa: E731
    text = jax.jit(fn).lower(jnp.ones((lay["tok_m"].shape[0], 32), jnp.bfloat16),
                             jnp.ones((4, 16, 32), jnp.bfloat16)).as_text()
    assert "precision = [HIGHEST, HIGHEST]" in text
