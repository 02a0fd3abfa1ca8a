"""Config reading, validation errors, and parameter counts from shapes (no allocation)."""
import json

import pytest

from conftest import fixture_dir
from v4jax import model as M
from v4jax.config import ConfigError, ModelConfig


def test_released_configs():
    f, p = ModelConfig.flash(), ModelConfig.pro()
    assert (f.num_hidden_layers, f.dim, f.index_topk, f.n_routed_experts, f.weight_format) == (43, 4096, 512, 256, "fp8")
    assert (p.num_hidden_layers, p.dim, p.index_topk, p.n_routed_experts) == (61, 7168, 1024, 384)
    assert [f.layer_kind(i) for i in (0, 1, 2, 3, 42, 43)] == ["swa", "swa", "csa", "hca", "csa", "swa"]
    assert [p.layer_kind(i) for i in (0, 1, 2, 3, 60, 61)] == ["hca", "hca", "csa", "hca", "csa", "swa"]
    assert f.is_hash_layer(2) and not f.is_hash_layer(3) and not f.is_hash_layer(43)


def test_tiny_has_every_layer_type():
    t = ModelConfig.tiny()
    kinds = {t.layer_kind(i) for i in range(t.num_hidden_layers)}
    assert kinds == {"swa", "csa", "hca"} and t.n_mtp == 1
    assert t.num_hash_layers >= 1 and t.num_hash_layers < t.num_hidden_layers


def test_hub_roundtrip():
    t = ModelConfig.from_hub(fixture_dir("tiny-a-fp8"))
    assert ModelConfig.from_hub(t.to_hub()).compress_ratios == t.compress_ratios == (0, 4, 16, 4, 0)


@pytest.mark.parametrize("key,value,needle", [
    ("num_key_value_heads", 8, "num_key_value_heads"),
    ("compress_ratios", [0, 4], "compress_ratios"),
    ("tie_word_embeddings", True, "tie_word_embeddings"),
    ("scoring_func", "relu", "scoring_func"),
    ("o_groups", 3, "o_groups"),
    ("rope_scaling", {"type": "linear", "factor": 2}, "rope_scaling"),
    ("quantization_config", {"quant_method": "int4"}, "quantization_config.quant_method"),
    ("hidden_act", "gelu", "hidden_act"),
    ("n_group", 8, "n_group"),
])
def test_bad_config_names_the_key(key, value, needle):
    raw = json.load(open(fixture_dir("tiny-a-bf16") + "/config.json"))
    raw[key] = value
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_hub(raw)


def test_unknown_harmless_key_is_ignored():
    raw = json.load(open(fixture_dir("tiny-a-bf16") + "/config.json"))
    raw["some_future_field"] = 3
    assert ModelConfig.from_hub(raw).hidden_size == 128


def test_param_counts_match_the_spec():
    f = M.count_params(ModelConfig.flash())
    assert abs(f["total_main"] / 1e9 - 284.3) < 0.5 and abs(f["active_main"] / 1e9 - 13.8) < 0.1
    p = M.count_params(ModelConfig.pro())
    assert abs(p["total_main"] / 1e9 - 1573) < 2 and abs(p["mtp"] / 1e9 - 25.8) < 0.2
    assert abs(p["active_main"] / 1e9 - 49.8) < 0.2
