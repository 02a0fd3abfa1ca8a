"""Native weights: FP8 / FP4 tensors kept as stored on device, dequantised inside the step (v4jax.native).

The dequantisation is exact, so every logit equals the dequantise-at-load path's (fp32 compute)."""
import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from conftest import fixture_dir
from v4jax import checkpoint, native, quant, scoring
from v4jax import model as M
from v4jax.checkpoint import CheckpointError
from v4jax.sharding import make_mesh

FP8 = "tiny-a-fp8"


def _native_vars(model):
    return [(p, v) for p, v in nnx.to_flat_state(nnx.state(model)) if v.get_metadata().get("fmt")]


def _outputs(model, ids, prefill):
    g, p = nnx.split(model)
    full = M.forward_fn(g, collect=True)(p, ids, jnp.zeros((ids.shape[0],), jnp.int32), None)
    mtp = M.mtp_fn(g)(p, full["streams"][:, :-1], ids[:, 1:], None, None)[0]
    return {"full": np.asarray(full["logits"]), "mtp": np.asarray(mtp),
            "pd": scoring.prefill_decode_logits(model, ids, prefill)}


@pytest.fixture(scope="module")
def dequantised():
    return checkpoint.load_hub(fixture_dir(FP8), native_weights=False)


@pytest.fixture(scope="module")
def ids(expected):
    return jnp.asarray(expected[FP8]["tokens"][:, :160])


def test_native_is_the_default_and_holds_the_stored_bytes(loaded):
    model = loaded[FP8]
    assert model.cfg.native_weights
    st = checkpoint.SafetensorsDir(fixture_dir(FP8))
    quantised = {n: e for n, e in st.entries.items() if e[1] in ("F8_E4M3", "F8_E8M0", "I8")}
    fmts = {v.get_metadata()["fmt"] for _, v in _native_vars(model)}
    assert fmts == {"fp8", "fp4"}
    on_device = sum(v.get_value().nbytes for _, v in _native_vars(model))
    assert on_device == sum(e[4] - e[3] for e in quantised.values())  # codes + scales, byte for byte
    blk = model.block(1)
    assert blk.attn.wq_a.weight.get_value().dtype == jnp.float8_e4m3fn
    assert blk.ffn.experts.w1.get_value().shape == (8, 128, 64)  # packed nibbles
    assert blk.ffn.experts.w1_scale.get_value().shape == (8, 128, 4)
    assert blk.attn.compressor.wkv.weight.get_value().dtype == jnp.float32  # stays dense (spec §10)


def test_native_logits_equal_dequantise_at_load(loaded, dequantised, ids):
    """Full forward, prefill + decode and MTP: native == dequantised at load (fp32, exact)."""
    a, b = _outputs(loaded[FP8], ids, 100), _outputs(dequantised, ids, 100)
    for key in ("full", "pd", "mtp"):
        assert a[key].shape == b[key].shape
        assert np.abs(a[key] - b[key]).max() <= 1e-6, key


def test_dequantisation_matches_the_host_decoders():
    rng = np.random.RandomState(0)
    codes = rng.randint(0, 256, (300, 200)).astype(np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0  # e4m3 NaN codes
    s8 = rng.randint(100, 140, native.scale_shape("fp8", (300, 200))).astype(np.uint8)
    want = quant.dequant_fp8_weight(codes.view(ml_dtypes.float8_e4m3fn), s8)
    got = native.dequant_fp8(jnp.asarray(codes.view(ml_dtypes.float8_e4m3fn)), jnp.asarray(s8), jnp.float32)
    np.testing.assert_array_equal(np.asarray(got), want)
    packed = np.arange(256, dtype=np.uint8).reshape(4, 64).view(np.int8)  # every byte: all nibble pairs
    s4 = rng.randint(100, 140, (4, 4)).astype(np.uint8)
    got = native.dequant_fp4(jnp.asarray(packed), jnp.asarray(s4), jnp.float32)
    np.testing.assert_array_equal(np.asarray(got), quant.dequant_fp4_weight(packed, s4))


def test_shard_shape_never_splits_a_scale_block():
    assert native.shard_shape("fp8", (512, 256)) == (4, 2)
    assert native.shard_shape("fp8", (300, 256)) == (1, 2)  # partial trailing row block: rows unsplit
    assert native.shard_shape("fp4", (8, 128, 96)) == (8, 128, 3)
    assert native.shard_shape("fp4", (8, 128, 80)) == (8, 128, 1)


def _block_ranges(sharding, shape, block):
    """Per device: the [start, stop) of every dim, in units of `block` elements along it."""
    out = {}
    for dev, idx in sharding.devices_indices_map(shape).items():
        out[dev] = tuple((sl.indices(n)[0] * b, sl.indices(n)[1] * b) for sl, n, b in zip(idx, shape, block))
    return out


def test_sharded_native_load_keeps_codes_and_scales_together(loaded, ids):
    mesh = make_mesh("fsdp=2,expert=2,tensor=2")
    model = checkpoint.load_hub(fixture_dir(FP8), mesh=mesh)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    split = 0
    for path, var in _native_vars(model):
        if path[-1] == "scale" or str(path[-1]).endswith("_scale"):
            continue
        scale_path = path[:-1] + ("scale",) if path[-1] == "weight" else path[:-1] + (f"{path[-1]}_scale",)
        codes, scales = var.get_value(), flat[scale_path].get_value()
        fmt = var.get_metadata()["fmt"]
        # elements of the codes' dims per scale entry (fp4: 16 bytes = 32 values along `in`)
        per = (1,) * (codes.ndim - 2) + ((128, 128) if fmt == "fp8" else (1, 16))
        c_rng = _block_ranges(codes.sharding, codes.shape, (1,) * codes.ndim)
        s_rng = _block_ranges(scales.sharding, scales.shape, per)
        for dev in c_rng:  # the scale rows a device holds cover exactly its codes
            for (c0, c1), (s0, s1), n in zip(c_rng[dev], s_rng[dev], codes.shape):
                assert c0 == s0 and min(s1, n) == c1, (path, dev)
        split += any(s is not None for s in codes.sharding.spec)
    assert split > 10  # the test is about sharded arrays: most are split somewhere
    g, p = nnx.split(model)
    got = M.forward_fn(g)(p, ids, jnp.zeros((2,), jnp.int32), None)["logits"]
    g1, p1 = nnx.split(loaded[FP8])
    want = M.forward_fn(g1)(p1, ids, jnp.zeros((2,), jnp.int32), None)["logits"]
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-5


def test_expert_sharded_native_decode_equals_single_device(loaded, ids):
    """Decode gathers each pair's expert codes on its own shard and dequantises only those."""
    model = checkpoint.load_hub(fixture_dir(FP8), mesh=make_mesh("expert=4,tensor=2"))
    got = scoring.prefill_decode_logits(model, ids[:, :48], 40)
    want = scoring.prefill_decode_logits(loaded[FP8], ids[:, :48], 40)
    assert np.abs(got - want).max() <= 1e-5


def _retype(src, dst, name, dtype, data):
    """Copy of a single-file checkpoint with tensor `name` re-stored as `dtype` bytes `data`."""
    os.makedirs(dst, exist_ok=True)
    shutil.copy(os.path.join(src, "config.json"), dst)
    with open(os.path.join(src, "model.safetensors"), "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header, blob = json.loads(f.read(n)), f.read()
    out, chunks, off = {}, [], 0
    for k, meta in header.items():
        if k == "__metadata__":
            continue
        b, e = meta["data_offsets"]
        raw = data if k == name else blob[b:e]
        out[k] = {"dtype": dtype if k == name else meta["dtype"], "shape": meta["shape"],
                  "data_offsets": [off, off + len(raw)]}
        chunks.append(raw)
        off += len(raw)
    hb = json.dumps(out).encode()
    with open(os.path.join(dst, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + b"".join(chunks))
    return dst


@pytest.mark.parametrize("dtype,itemsize", [("BF16", 2), ("F8_E5M2", 1), ("F16", 2)])
def test_unexpected_stored_dtype_is_refused(tmp_path, dtype, itemsize):
    name = "layers.1.attn.wq_a.weight"
    d = _retype(fixture_dir(FP8), str(tmp_path / dtype), name, dtype, b"\0" * (128 * 128 * itemsize))
    with pytest.raises(CheckpointError, match=rf"'{name}' is stored as {dtype}; native fp8 weights need F8_E4M3"):
        checkpoint.load_hub(d)


def test_dequantise_at_load_option_keeps_dense_params(dequantised):
    assert not dequantised.cfg.native_weights
    assert not _native_vars(dequantised)
    assert dequantised.block(1).attn.wq_a.weight.get_value().dtype == jnp.float32


def test_native_weights_refuse_qat():
    from v4jax.config import ConfigError, ModelConfig
    for key in ("qat_fp8_linear", "qat_fp4_experts"):
        with pytest.raises(ConfigError, match=f"config key 'native_weights'.*{key} needs float weights"):
            ModelConfig.from_hub(fixture_dir(FP8), native_weights=True, **{key: True})


def test_bf16_tensors_load_as_stored_bytes():
    """An unquantised BF16 tensor (the embedding) placed in bfloat16 is the stored bits (no float32 detour)."""
    m = checkpoint.load_hub(fixture_dir(FP8), dtype="bfloat16", param_dtype="bfloat16")
    st = checkpoint.SafetensorsDir(fixture_dir(FP8))
    emb = np.asarray(m.embed.weight.get_value())
    assert emb.dtype == ml_dtypes.bfloat16 and st.dtype("embed.weight") == "BF16"
    assert np.array_equal(emb.view(np.uint16), st.read("embed.weight").view(np.uint16))


def test_dequantisation_waits_for_the_input_except_in_decode():
    """A native weight's decode is tied to its layer's input by an optimization barrier (so an unrolled
    stack cannot schedule every layer's dequantised copy at once), except for decode-sized inputs."""
    codes = jnp.zeros((256, 256), jnp.float8_e4m3fn)
    scale = jnp.zeros((2, 2), jnp.uint8)

    def hlo(rows):
        f = lambda x: x @ native.dequant("fp8", codes, scale, jnp.float32, after=x).T  # noqa: E731
        return jax.jit(f).lower(jax.ShapeDtypeStruct((rows, 256), jnp.float32)).as_text()

    assert "optimization_barrier" in hlo(native.DECODE_ROWS + 1)
    assert "optimization_barrier" not in hlo(native.DECODE_ROWS)
