"""Number formats, Hadamard, Sinkhorn and RoPE against the official kernels' vectors (bit-exact)."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES, fixture_dir
from v4jax import layers, quant
from v4jax.config import ModelConfig

V = np.load(os.path.join(FIXTURES, "quant_vectors.npz"))


def _bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


@pytest.mark.parametrize("block", [64, 128])
def test_fp8_sim_bit_exact(block):
    y, q, s = quant.fp8_sim(jnp.asarray(V[f"fp8_b{block}_input"]), block, return_scale=True)
    np.testing.assert_array_equal(_bits(y), _bits(V[f"fp8_b{block}_output"]))
    np.testing.assert_array_equal(np.asarray(s), V[f"fp8_b{block}_scale"])
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), V[f"fp8_b{block}_codes"])


def test_fp4_sim_bit_exact_and_packing():
    y, q, s = quant.fp4_sim(jnp.asarray(V["fp4_b32_input"]), 32, return_scale=True)
    np.testing.assert_array_equal(_bits(y), _bits(V["fp4_b32_output"]))  # signed zeros included
    np.testing.assert_array_equal(np.asarray(s), V["fp4_b32_scale"])
    np.testing.assert_array_equal(quant.pack_fp4(np.asarray(q, np.float32)), V["fp4_b32_packed"])


def test_scale_and_nibble_tables():
    np.testing.assert_array_equal(quant.e8m0_to_float(V["e8m0_bytes"]), V["e8m0_values"])
    np.testing.assert_array_equal(_bits(quant.E2M1_VALUES), _bits(V["e2m1_nibble_values"]))


def test_weight_dequant_with_partial_blocks():
    np.testing.assert_array_equal(quant.dequant_fp8_weight(V["wfp8_codes"], V["wfp8_scale_bytes"]), V["wfp8_dequant"])
    np.testing.assert_array_equal(quant.dequant_fp4_weight(V["wfp4_packed"], V["wfp4_scale_bytes"]), V["wfp4_dequant"])


def test_hadamard():
    out = np.asarray(quant.hadamard(jnp.asarray(V["wht128_input"])))
    ref = V["wht128_output"]
    assert np.all(np.abs(out - ref) <= 1e-5 * np.abs(ref).max(axis=1, keepdims=True))
    h = quant.hadamard_matrix(128)
    np.testing.assert_allclose(h @ h, np.eye(128), atol=1e-6)


@pytest.mark.parametrize("kind,compressed", [("yarn", True), ("plain", False)])
def test_rope_tables(kind, compressed):
    cfg = ModelConfig.from_hub(fixture_dir("tiny-a-bf16"))
    f = layers.rope_inv_freq(cfg, compressed)
    np.testing.assert_allclose(f, V[f"rope_{kind}_inv_freq"], rtol=1e-6)
    cos, sin = layers.rope_cos_sin(jnp.arange(1024), f)
    assert np.abs(np.asarray(cos) - V[f"rope_{kind}_cos"]).max() <= 1e-6
    assert np.abs(np.asarray(sin) - V[f"rope_{kind}_sin"]).max() <= 1e-6


def test_yarn_range_flash():
    from v4jax.config import yarn_correction_range
    assert yarn_correction_range(ModelConfig.flash(), 160000.0) == (15, 25)
