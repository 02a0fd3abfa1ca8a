"""DeepSeek-V4 model configuration, read from a hub `config.json`.

`ModelConfig` is a frozen dataclass whose field names are the hub keys. `ModelConfig.from_hub(path)`
honours every key that changes the network and rejects contradictory or unsupported values with a
`ConfigError` naming the key; keys that describe nothing v4jax computes (`transformers_version`,
`use_cache`, ...) are ignored.

Run-time choices that are not part of the checkpoint (compute dtype, QAT simulation, attention block
size, MoE dispatch, quantisation-aware training, the layer scan and its rematerialisation) live in the
same dataclass under `dtype`, `qat_sim`, `attn_block`, `moe_impl`, `moe_kernel`, `qat_fp8_linear`,
`qat_fp4_experts`, `scan_layers`, `remat`, and are changed with `dataclasses.replace`
or `cfg.with_runtime(...)`.

`attention_kernel` (run-time too) picks who computes CSA's sparse branch (window + gathered top-k
entries, one softmax with the sink): "jnp" (default, plain XLA), "pallas_tpu" (Mosaic kernel: the
scalar-prefetched top-k ids drive one DMA per selected entry) or "pallas_gpu" (Triton kernel: gathered
loads). Off their accelerator (CPU) the kernels run in Pallas interpret mode: exact, slow. SWA, HCA and
dense-phase CSA always use jnp.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = os.path.join(os.path.dirname(_HERE), "configs")


class ConfigError(ValueError):
    """A config.json value v4jax cannot honour."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # -- shapes (hub keys) --
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    compress_ratios: tuple[int, ...] = ()
    # -- rope --
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    rope_original_max_position: int = 65536  # 0 = no YaRN anywhere
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    max_position_embeddings: int = 1048576
    # -- lightning indexer --
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    # -- MoE --
    n_routed_experts: int = 256
    num_experts_per_tok: int = 6
    n_shared_experts: int = 1
    moe_intermediate_size: int = 2048
    num_hash_layers: int = 3
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    norm_topk_prob: bool = True
    swiglu_limit: float = 10.0
    # -- mHC --
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    # -- misc --
    num_nextn_predict_layers: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 1
    weight_format: str = "bf16"  # "fp8" when quantization_config says so (informational: loaders read dtypes)
    expert_dtype: str | None = None
    initializer_range: float = 0.02
    # -- run-time (not hub keys) --
    dtype: str = "float32"  # activation / compute dtype
    param_dtype: str = "float32"
    qat_sim: bool = False  # official FP8 KV / FP4 indexer quantise-dequantise simulations (straight-through grads)
    qat_fp8_linear: bool = False  # FP8 training of Linear layers: 1x128 activation / 128x128 weight fake quant (STE)
    qat_fp4_experts: bool = False  # FP4 QAT of routed experts: MXFP4 (1x32) weight fake quant, then FP8 (STE)
    attn_block: int = 128  # queries per block in the full-sequence attention scan
    moe_impl: str = "auto"  # "dense" | "gather" | "grouped" | "ep" (expert parallel, needs jax.set_mesh) | "auto"
    moe_kernel: str = "jnp"  # grouped matmul of "grouped": "jnp" (XLA:CPU) | "ragged_dot" (GPU) | "megablox" (TPU)
    moe_capacity_factor: float = 0.0  # "ep" slots per (device, expert): 0 = every local token (exact, no drops)
    csa_mode: str = "sparse"  # "dense": CSA attends to every causal entry (first phase of the training recipe)
    indexer_loss: bool = False  # compute the indexer's KL toward the main attention (detached inputs)
    attention_kernel: str = "jnp"  # CSA sparse branch: "jnp" | "pallas_tpu" | "pallas_gpu" (module doc)
    scan_layers: bool = True  # layers of one kind under one lax.scan (v4jax.stack); False: one per layer
    remat: str = "none"  # "layer": each scanned layer recomputed in the backward (only its input kept)

    # ---- derived -------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.hidden_size

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def n_mtp(self) -> int:
        return self.num_nextn_predict_layers

    def layer_ratio(self, layer: int) -> int:
        """Compression ratio of main layer `layer` (0 = SWA); MTP block i is layer num_hidden_layers+i."""
        return self.compress_ratios[layer]

    def layer_kind(self, layer: int) -> str:
        r = self.layer_ratio(layer)
        return "swa" if r == 0 else ("csa" if r == 4 else "hca")

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.num_hash_layers  # MTP blocks have index >= num_hidden_layers

    def with_runtime(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ---- constructors --------------------------------------------------------------------------
    @classmethod
    def from_hub(cls, path_or_dict: str | dict, **runtime) -> "ModelConfig":
        """Reads a hub config.json (a path, a directory holding one, or the parsed dict)."""
        if isinstance(path_or_dict, dict):
            raw = dict(path_or_dict)
        else:
            path = path_or_dict
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.exists(path):
                raise ConfigError(f"no config.json at {path_or_dict}")
            with open(path) as f:
                try:
                    raw = json.load(f)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}: not valid JSON ({e})") from None
        cfg = cls(**_hub_to_fields(raw), **runtime)
        cfg.validate()
        return cfg

    @classmethod
    def named(cls, name: str, **runtime) -> "ModelConfig":
        return cls.from_hub(os.path.join(CONFIG_DIR, f"{name}.json"), **runtime)

    @classmethod
    def tiny(cls, **runtime) -> "ModelConfig":
        return cls.named("tiny", **runtime)

    @classmethod
    def flash(cls, **runtime) -> "ModelConfig":
        return cls.named("deepseek-v4-flash", **runtime)

    @classmethod
    def pro(cls, **runtime) -> "ModelConfig":
        return cls.named("deepseek-v4-pro", **runtime)

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, key: str, msg: str):
            if not cond:
                raise ConfigError(f"config key '{key}': {msg}")

        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                    "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "index_n_heads",
                    "index_head_dim", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                    "hc_mult", "hc_sinkhorn_iters"):
            need(int(getattr(self, key)) > 0, key, f"must be a positive integer, got {getattr(self, key)}")
        need(self.num_key_value_heads == 1, "num_key_value_heads",
             f"DeepSeek-V4 attention has one shared K=V head; got {self.num_key_value_heads}")
        need(self.qk_rope_head_dim % 2 == 0 and 0 < self.qk_rope_head_dim < self.head_dim,
             "qk_rope_head_dim", f"must be even and smaller than head_dim={self.head_dim}")
        need(self.qk_rope_head_dim < self.index_head_dim, "index_head_dim",
             f"must exceed qk_rope_head_dim={self.qk_rope_head_dim}")
        need(self.num_attention_heads % self.o_groups == 0, "o_groups",
             f"{self.o_groups} does not divide num_attention_heads={self.num_attention_heads}")
        n_needed = self.num_hidden_layers + self.num_nextn_predict_layers
        need(len(self.compress_ratios) >= n_needed, "compress_ratios",
             f"needs one entry per layer plus one per MTP block ({n_needed}), got {len(self.compress_ratios)}")
        for i, r in enumerate(self.compress_ratios[:n_needed]):
            need(r >= 0, "compress_ratios", f"entry {i} is negative ({r})")
        need(0 <= self.num_hash_layers <= self.num_hidden_layers, "num_hash_layers",
             f"must be within [0, num_hidden_layers={self.num_hidden_layers}]")
        need(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
             f"{self.num_experts_per_tok} > n_routed_experts={self.n_routed_experts}")
        need(self.n_shared_experts == 1, "n_shared_experts", f"exactly one shared expert is supported, got {self.n_shared_experts}")
        need(self.scoring_func in ("sqrtsoftplus", "sigmoid", "softmax"), "scoring_func",
             f"unsupported '{self.scoring_func}'")
        need(self.norm_topk_prob or self.scoring_func == "softmax", "norm_topk_prob",
             "DeepSeek-V4 always renormalises the top-k weights of non-softmax scores; false is not supported")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        need(self.index_topk > 0, "index_topk", "must be positive")
        need(self.swiglu_limit >= 0, "swiglu_limit", "must be >= 0 (0 disables the clamp)")
        need(self.dtype in ("float32", "bfloat16", "float16"), "dtype", f"unsupported compute dtype {self.dtype}")
        need(self.param_dtype in ("float32", "bfloat16"), "param_dtype", f"unsupported {self.param_dtype}")
        need(self.moe_impl in ("auto", "dense", "gather", "grouped", "ep"), "moe_impl", f"unknown '{self.moe_impl}'")
        need(self.moe_kernel in ("jnp", "ragged_dot", "megablox"), "moe_kernel",
             f"unknown '{self.moe_kernel}' (one of jnp, ragged_dot, megablox)")
        need(self.moe_capacity_factor >= 0, "moe_capacity_factor", f"must be >= 0, got {self.moe_capacity_factor}")
        need(self.attn_block > 0, "attn_block", "must be positive")
        need(self.csa_mode in ("sparse", "dense"), "csa_mode", f"unknown '{self.csa_mode}'")
        need(self.attention_kernel in ("jnp", "pallas_tpu", "pallas_gpu"), "attention_kernel",
             f"unknown '{self.attention_kernel}' (one of jnp, pallas_tpu, pallas_gpu)")
        need(self.expert_dtype in (None, "fp4", "fp8", "bf16"), "expert_dtype", f"unknown '{self.expert_dtype}'")
        need(self.remat in ("none", "layer"), "remat", f"unknown '{self.remat}' (none or layer)")
        for key in ("qat_sim", "qat_fp8_linear", "qat_fp4_experts", "scan_layers"):
            need(isinstance(getattr(self, key), bool), key, f"must be true or false, got {getattr(self, key)!r}")

    # ---- serialisation -------------------------------------------------------------------------
    def to_hub(self) -> dict:
        """The hub-schema dict for this config (what `from_hub` reads back)."""
        d = {
            "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": 1, "head_dim": self.head_dim, "qk_rope_head_dim": self.qk_rope_head_dim,
            "q_lora_rank": self.q_lora_rank, "o_groups": self.o_groups, "o_lora_rank": self.o_lora_rank,
            "sliding_window": self.sliding_window, "compress_ratios": list(self.compress_ratios),
            "rope_theta": self.rope_theta, "compress_rope_theta": self.compress_rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "index_n_heads": self.index_n_heads, "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk, "n_routed_experts": self.n_routed_experts,
            "num_experts_per_tok": self.num_experts_per_tok, "n_shared_experts": self.n_shared_experts,
            "moe_intermediate_size": self.moe_intermediate_size, "num_hash_layers": self.num_hash_layers,
            "scoring_func": self.scoring_func, "routed_scaling_factor": self.routed_scaling_factor,
            "norm_topk_prob": self.norm_topk_prob, "swiglu_limit": self.swiglu_limit,
            "hc_mult": self.hc_mult, "hc_sinkhorn_iters": self.hc_sinkhorn_iters, "hc_eps": self.hc_eps,
            "rms_norm_eps": self.rms_norm_eps, "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": False, "hidden_act": "silu", "initializer_range": self.initializer_range,
            "expert_dtype": self.expert_dtype,
        }
        if self.rope_original_max_position:
            d["rope_scaling"] = {"type": "yarn", "factor": self.rope_factor,
                                 "original_max_position_embeddings": self.rope_original_max_position,
                                 "beta_fast": self.rope_beta_fast, "beta_slow": self.rope_beta_slow}
        return d


RUNTIME_KEYS = ("dtype", "param_dtype", "qat_sim", "qat_fp8_linear", "qat_fp4_experts", "attn_block", "moe_impl",
                "moe_kernel", "moe_capacity_factor", "csa_mode", "indexer_loss", "attention_kernel", "scan_layers",
                "remat")


def parse_runtime(items) -> dict:
    """["attention_kernel=pallas_tpu", "attn_block=64", ...] -> ModelConfig run-time fields (typed)."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in RUNTIME_KEYS:
            raise ConfigError(f"--set {item}: expected key=value with key one of {', '.join(RUNTIME_KEYS)}")
        default = fields[key].default
        if isinstance(default, bool):
            out[key] = text.lower() in ("1", "true", "yes", "on")
        elif isinstance(default, (int, float)):
            try:
                out[key] = type(default)(text)
            except ValueError:
                raise ConfigError(f"--set {item}: '{text}' is not a number") from None
        else:
            out[key] = text
    return out


# Hub keys that carry no information for v4jax (descriptive, or about other frameworks).
_IGNORED_KEYS = {
    "architectures", "model_type", "torch_dtype", "transformers_version", "use_cache", "attention_dropout",
    "auto_map", "_name_or_path", "dtype", "pad_token_id", "first_k_dense_replace",
}
_SAME_NAME = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window",
    "rope_theta", "compress_rope_theta", "max_position_embeddings", "index_n_heads", "index_head_dim",
    "index_topk", "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "moe_intermediate_size",
    "num_hash_layers", "scoring_func", "routed_scaling_factor", "norm_topk_prob", "swiglu_limit", "hc_mult",
    "hc_sinkhorn_iters", "hc_eps", "rms_norm_eps", "num_nextn_predict_layers", "bos_token_id",
    "eos_token_id", "initializer_range", "expert_dtype",
}


def _hub_to_fields(raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, val in raw.items():
        if key in _IGNORED_KEYS or key.startswith("dspark_"):
            continue
        if key in _SAME_NAME:
            out[key] = val
        elif key == "compress_ratios":
            if not isinstance(val, (list, tuple)) or not all(isinstance(v, int) for v in val):
                raise ConfigError("config key 'compress_ratios': must be a list of integers")
            out[key] = tuple(int(v) for v in val)
        elif key == "rope_scaling":
            out.update(_rope_scaling(val))
        elif key == "quantization_config":
            out["weight_format"] = _quantization(val)
        elif key == "tie_word_embeddings":
            if val:
                raise ConfigError("config key 'tie_word_embeddings': DeepSeek-V4 has an untied head; true is not supported")
        elif key == "hidden_act":
            if val != "silu":
                raise ConfigError(f"config key 'hidden_act': only 'silu' (clamped SwiGLU) is supported, got '{val}'")
        elif key == "attention_bias":
            if val:
                raise ConfigError("config key 'attention_bias': DeepSeek-V4 projections have no bias")
        elif key == "topk_method":
            if val not in ("noaux_tc", None):
                raise ConfigError(f"config key 'topk_method': only 'noaux_tc' is supported, got '{val}'")
        elif key in ("n_group", "topk_group"):
            if val not in (None, 1):
                raise ConfigError(f"config key '{key}': group-limited routing is not part of DeepSeek-V4 ({val})")
        else:
            # unknown keys are harmless descriptions (e.g. a newer transformers field); ignore them
            continue
    for key in ("routed_scaling_factor", "rope_theta", "compress_rope_theta", "hc_eps", "rms_norm_eps", "swiglu_limit"):
        if key in out:
            out[key] = float(out[key])
    return out


def _rope_scaling(val) -> dict[str, Any]:
    if val is None:
        return {"rope_original_max_position": 0}
    if not isinstance(val, dict):
        raise ConfigError("config key 'rope_scaling': must be an object or null")
    kind = val.get("type", val.get("rope_type"))
    if kind != "yarn":
        raise ConfigError(f"config key 'rope_scaling': only YaRN is supported, got type '{kind}'")
    if val.get("mscale") not in (None, 0, 1) or val.get("mscale_all_dim") not in (None, 0, 1):
        raise ConfigError("config key 'rope_scaling': mscale is not used by DeepSeek-V4 and is not supported")
    try:
        return {"rope_factor": float(val["factor"]),
                "rope_original_max_position": int(val["original_max_position_embeddings"]),
                "rope_beta_fast": float(val.get("beta_fast", 32)),
                "rope_beta_slow": float(val.get("beta_slow", 1))}
    except KeyError as e:
        raise ConfigError(f"config key 'rope_scaling': missing {e}") from None


def _quantization(val) -> str:
    if not val:
        return "bf16"
    want = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0"}
    for k, v in want.items():
        if val.get(k, v) != v:
            raise ConfigError(f"config key 'quantization_config.{k}': only '{v}' is supported, got '{val.get(k)}'")
    if list(val.get("weight_block_size", [128, 128])) != [128, 128]:
        raise ConfigError("config key 'quantization_config.weight_block_size': only [128, 128] is supported")
    return "fp8"


def yarn_correction_range(cfg: ModelConfig, theta: float) -> tuple[int, int]:
    """(low, high) dims of the YaRN ramp, as the official precompute_freqs_cis computes them."""
    dim = cfg.qk_rope_head_dim

    def corr(rot):
        return dim * math.log(cfg.rope_original_max_position / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low = math.floor(corr(cfg.rope_beta_fast))
    high = math.ceil(corr(cfg.rope_beta_slow))
    return max(low, 0), min(high, dim - 1)
