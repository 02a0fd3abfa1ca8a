"""DeepSeek-V4 model configuration, read from a hub `config.json`.

`ModelConfig` is a frozen dataclass whose field names are the hub keys. `ModelConfig.from_hub(path)`
honours every key that changes the network and rejects contradictory or unsupported values with a
`ConfigError` naming the key; keys that describe nothing v4jax computes (`transformers_version`,
`use_cache`, ...) are ignored. Every value is typed and range-checked (`v4jax.validate.MODEL_KEYS`: no
coercion of "128", 128.5, null or "false"); the shape keys (`REQUIRED_HUB_KEYS`) must be present, and an
unknown key that is a near-miss of a known key the file lacks is refused as a misspelling.

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

from .validate import MODEL_KEYS, ConfigError, Key, check, near_miss, parse_text

_HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = os.path.join(os.path.dirname(_HERE), "configs")


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
    native_weights: bool = False  # quantised tensors kept as stored (FP8/FP4 codes + scales; v4jax.native)

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
        raw = path_or_dict if isinstance(path_or_dict, dict) else _read_json(path_or_dict)
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

        for key, spec in MODEL_KEYS.items():  # types and plain ranges first: the checks below compare numbers
            check(key, getattr(self, key), spec)
        need(isinstance(self.compress_ratios, (tuple, list)) and all(
            isinstance(r, int) and not isinstance(r, bool) for r in self.compress_ratios),
            "compress_ratios", f"must be a list of integers, got {self.compress_ratios!r}")
        _check_attention(self, need)
        _check_layers(self, need)
        _check_moe(self, need)
        _check_rope(self, need)
        # QAT fake-quantises float master weights; native weights are already the codes it would produce
        for key in ("qat_fp8_linear", "qat_fp4_experts"):
            need(not (self.native_weights and getattr(self, key)), "native_weights",
                 f"native (stored FP8/FP4) weights cannot be trained; {key} needs float weights (--weights bf16)")

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
                "remat", "native_weights")


def parse_runtime(items) -> dict:
    """["attention_kernel=pallas_tpu", "attn_block=64", ...] -> ModelConfig run-time fields (typed, checked)."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in RUNTIME_KEYS:
            hint = near_miss(key, RUNTIME_KEYS) if sep else None
            raise ConfigError(f"--set {item}: expected key=value with key one of {', '.join(RUNTIME_KEYS)}"
                              + (f" (did you mean '{hint}'?)" if hint else ""))
        out[key] = parse_text(key, text, MODEL_KEYS[key])
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


# Hub keys whose absence would silently give Flash's value for a tensor shape of another model: a hub
# config.json must spell each out (a misspelt one is a missing one)
REQUIRED_HUB_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "qk_rope_head_dim",
    "q_lora_rank", "o_groups", "o_lora_rank", "compress_ratios", "index_n_heads", "index_head_dim",
    "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "num_hash_layers", "hc_mult",
    "num_nextn_predict_layers",
)
_SPECIAL_KEYS = ("compress_ratios", "rope_scaling", "quantization_config", "tie_word_embeddings", "hidden_act",
                 "attention_bias", "topk_method", "n_group", "topk_group")


def _read_json(path) -> dict[str, Any]:
    """The object in a config.json (a file, or a directory holding one)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"a hub config is a config.json path or its parsed object, got a {type(path).__name__}")
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if os.path.isdir(file):
        raise ConfigError(f"{file}: is a directory, not a config.json file")
    if not os.path.isfile(file):
        raise ConfigError(f"no config.json at {path}" + (" (a directory without one)" if file != path else ""))
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: a config.json holds one JSON object, got a {type(raw).__name__}")
    return raw


def _check_key_names(raw: dict[str, Any]) -> None:
    """Unknown keys are harmless descriptions (a newer transformers field, another framework's key), unless
    one is a near-miss of a known key the config lacks: that is a misspelling whose value would be lost."""
    known = set(_SAME_NAME) | set(_SPECIAL_KEYS)
    absent = known - set(raw)
    for key in raw:
        if key in known or key in _IGNORED_KEYS or not isinstance(key, str) or key.startswith("dspark_"):
            continue
        hint = near_miss(key, absent)
        if hint:
            raise ConfigError(f"config key '{key}': unknown key (did you mean '{hint}'?)")
    for key in REQUIRED_HUB_KEYS:
        if key not in raw:
            raise ConfigError(f"config key '{key}': missing; a hub config.json must give every shape key "
                              f"({', '.join(REQUIRED_HUB_KEYS)})")


def _hub_to_fields(raw: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"a hub config is one JSON object, got a {type(raw).__name__}")
    _check_key_names(raw)
    out: dict[str, Any] = {}
    for key, val in raw.items():
        if key in _SAME_NAME:
            out[key] = check(key, val, MODEL_KEYS[key])  # typed: "128", 128.5, null, true are refused
        elif key == "compress_ratios":  # official: compress_ratios[layer_id], an integer per layer
            if not isinstance(val, (list, tuple)):
                raise ConfigError(f"config key 'compress_ratios': must be a list of integers, got {val!r}")
            out[key] = tuple(check(f"compress_ratios[{i}]", v, _RATIO) for i, v in enumerate(val))
        elif key == "rope_scaling":
            out.update(_rope_scaling(val))
        elif key == "quantization_config":
            out["weight_format"] = _quantization(val)
        elif key in _SPECIAL_KEYS:
            _check_unsupported(key, val)
    return out


_RATIO = Key("int")
_BOOL, _OPT_STR, _OPT_INT = Key("bool"), Key("str", optional=True), Key("int", optional=True)


def _check_unsupported(key: str, val) -> None:
    """Hub keys that describe a model DeepSeek-V4 is not: only their V4 value is accepted."""
    if key == "tie_word_embeddings":
        # official: ParallelHead loads its own head.weight; a tied checkpoint has none to load
        if check(key, val, _BOOL):
            raise ConfigError("config key 'tie_word_embeddings': DeepSeek-V4 has an untied head; true is not supported")
    elif key == "hidden_act":
        # official Expert is hard-wired clamped SwiGLU (F.silu): another activation is another model
        if check(key, val, Key("str")) != "silu":
            raise ConfigError(f"config key 'hidden_act': only 'silu' (clamped SwiGLU) is supported, got '{val}'")
    elif key == "attention_bias":
        # official linear(): assert bias is None (bias tensors would be left unread)
        if check(key, val, _BOOL):
            raise ConfigError("config key 'attention_bias': DeepSeek-V4 projections have no bias")
    elif key == "topk_method":
        # official Gate is the noaux_tc rule (bias for selection only); no other method exists there
        if check(key, val, _OPT_STR) not in ("noaux_tc", None):
            raise ConfigError(f"config key 'topk_method': only 'noaux_tc' is supported, got '{val}'")
    elif key in ("n_group", "topk_group"):
        # official Gate has no group-limited step: a group count > 1 describes routing it never does
        if check(key, val, _OPT_INT) not in (None, 1):
            raise ConfigError(f"config key '{key}': group-limited routing is not part of DeepSeek-V4 ({val})")


def _rope_scaling(val) -> dict[str, Any]:
    if val is None:
        return {"rope_original_max_position": 0}
    if not isinstance(val, dict):
        raise ConfigError(f"config key 'rope_scaling': must be an object or null, got {val!r}")
    kind = val.get("type", val.get("rope_type"))
    # official precompute_freqs_cis knows YaRN only (factor, original length, beta_fast/slow) and never
    # applies an mscale: other kinds, or an mscale, are models it does not compute
    if kind != "yarn":
        raise ConfigError(f"config key 'rope_scaling': only YaRN is supported, got type '{kind}'")
    if val.get("mscale") not in (None, 0, 1) or val.get("mscale_all_dim") not in (None, 0, 1):
        raise ConfigError("config key 'rope_scaling': mscale is not used by DeepSeek-V4 and is not supported")
    for k in ("factor", "original_max_position_embeddings"):
        if k not in val:  # official YaRN needs both (no default factor or original length)
            raise ConfigError(f"config key 'rope_scaling': missing '{k}'")
    sub = {"rope_factor": "factor", "rope_original_max_position": "original_max_position_embeddings",
           "rope_beta_fast": "beta_fast", "rope_beta_slow": "beta_slow"}
    return {field: check(f"rope_scaling.{k}", val[k], MODEL_KEYS[field]) for field, k in sub.items() if k in val}


def _quantization(val) -> str:
    if not val:
        return "bf16"
    if not isinstance(val, dict):
        raise ConfigError(f"config key 'quantization_config': must be an object or null, got {val!r}")
    # official Linear: float8_e4m3fn codes in 128 x 128 blocks (block_size = 128), nothing else. Its fp32
    # scales (scale_fmt null, scale_dtype fp32) would run officially, but v4jax's loader decodes UE8M0
    # scale bytes only (checkpoint.decode_tensor), so that format stays refused
    want = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0"}
    for k, v in want.items():
        if val.get(k, v) != v:
            raise ConfigError(f"config key 'quantization_config.{k}': only '{v}' is supported, got '{val.get(k)}'")
    if list(val.get("weight_block_size", [128, 128])) != [128, 128]:
        raise ConfigError("config key 'quantization_config.weight_block_size': only [128, 128] is supported")
    return "fp8"


# ---- shape validation ----------------------------------------------------------------------------
# A hub config is refused only where DeepSeek's official inference code (inference/model.py of the V4
# release) cannot compute the model either, or where v4jax cannot yet (said so). Each refusal names what
# the official code would do. Everything else is computed with the official formulas, edge cases
# included (tests/test_edge_configs.py): an indexer head with no non-RoPE dims, a main head that is all
# RoPE, one routed expert per token, a window longer than the sequence, one output group, no hash layers,
# hash layers past the main layers (the official rule routes those MTP blocks by hash too), no MTP block.
def _check_attention(cfg: ModelConfig, need) -> None:
    rd = cfg.qk_rope_head_dim
    # official: an empty vocabulary has no row to embed; RMSNorm of a 0-wide vector is 0/0 (NaN)
    need(cfg.vocab_size > 0, "vocab_size", f"must be a positive integer, got {cfg.vocab_size}")
    need(cfg.hidden_size > 0, "hidden_size", f"must be a positive integer, got {cfg.hidden_size}")
    # official: o.view(b, s, n_groups, -1) cannot reshape the empty output of 0 heads
    need(cfg.num_attention_heads > 0, "num_attention_heads", f"must be a positive integer, got {cfg.num_attention_heads}")
    # official: wo_a.weight.view(n_groups, o_lora_rank, -1) needs whole groups of heads (1 group is fine)
    need(cfg.o_groups > 0 and cfg.num_attention_heads % cfg.o_groups == 0, "o_groups",
         f"{cfg.o_groups} does not divide num_attention_heads={cfg.num_attention_heads}")
    # official: one K=V projection wkv [head_dim, dim] shared by all heads; more KV heads are another model
    need(cfg.num_key_value_heads == 1, "num_key_value_heads",
         f"DeepSeek-V4 attention has one shared K=V head; got {cfg.num_key_value_heads}")
    # official apply_rotary_emb(x[..., -rd:]) rotates pairs of the last rd dims: odd rd cannot pair, rd = 0
    # slices the whole vector (x[..., -0:]) against an empty frequency table, rd > head_dim a wider table
    # than the vector. rd == head_dim (no non-RoPE dims) is computable: every dim rotates.
    need(rd % 2 == 0 and 0 < rd <= cfg.head_dim, "qk_rope_head_dim",
         f"must be even, positive and at most head_dim={cfg.head_dim}, got {rd}")
    # official prefill: seqlen % window_size (0: ZeroDivisionError); any window >= 1, longer than the
    # sequence included, is computable
    need(cfg.sliding_window > 0, "sliding_window", f"must be a positive integer, got {cfg.sliding_window}")
    # official: q_lora_rank 0 gives q = 0 (every query attends uniformly, CSA top-k all ties), o_lora_rank 0
    # a zero attention output; v4jax's Linear init (1/sqrt(fan_in)) needs a positive width
    for key in ("q_lora_rank", "o_lora_rank"):
        need(getattr(cfg, key) > 0, key, f"must be a positive integer, got {getattr(cfg, key)}")
    if 4 not in cfg.compress_ratios[:cfg.num_hidden_layers + cfg.num_nextn_predict_layers]:
        return  # the lightning indexer exists only in CSA layers (ratio 4): its keys describe nothing
    # official Indexer: self.n_heads ** -0.5 with 0 heads raises ZeroDivisionError
    need(cfg.index_n_heads > 0, "index_n_heads", f"must be a positive integer, got {cfg.index_n_heads}")
    # official: q[..., -rd:] of a head narrower than rd is the whole head against a wider frequency table;
    # index_head_dim == rd (no non-RoPE part) is computable: every dim rotates, then the Hadamard transform
    need(cfg.index_head_dim >= rd, "index_head_dim", f"must be at least qk_rope_head_dim={rd}, got {cfg.index_head_dim}")
    # official: topk(k < 0) raises; k = 0 selects no compressed entry (the window alone), computable
    need(cfg.index_topk >= 0, "index_topk", f"must be >= 0, got {cfg.index_topk}")


def _check_layers(cfg: ModelConfig, need) -> None:
    # counts: the official range(n) builds nothing for n <= 0; 0 main layers (embed -> HC head -> head)
    # is computable, a negative count is refused as malformed rather than read as 0
    for key in ("num_hidden_layers", "num_nextn_predict_layers"):
        need(getattr(cfg, key) >= 0, key, f"must be >= 0, got {getattr(cfg, key)}")
    n_needed = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    # official: compress_ratios[layer_id] per layer and MTP block (IndexError when short)
    need(len(cfg.compress_ratios) >= n_needed, "compress_ratios",
         f"needs one entry per layer plus one per MTP block ({n_needed}), got {len(cfg.compress_ratios)}")
    # the official code never reads entries past the last MTP block, but a longer list was written for
    # more layers than num_hidden_layers + num_nextn_predict_layers: one of the counts is likely wrong
    need(len(cfg.compress_ratios) <= n_needed, "compress_ratios",
         f"has {len(cfg.compress_ratios)} entries, more than the {n_needed} layers and MTP blocks "
         f"(num_hidden_layers={cfg.num_hidden_layers} + num_nextn_predict_layers={cfg.num_nextn_predict_layers})")
    for i, r in enumerate(cfg.compress_ratios[:n_needed]):
        # official: a negative ratio is truthy and builds a Compressor of torch.empty(ratio, ...): raises
        need(r >= 0, "compress_ratios", f"entry {i} is negative ({r})")
    # official Sinkhorn: softmax + eps, one column normalisation, then range(iters - 1) row/column pairs:
    # 0 iterations is computable (the same as 1); a negative count is refused as malformed
    need(cfg.hc_sinkhorn_iters >= 0, "hc_sinkhorn_iters", f"must be >= 0, got {cfg.hc_sinkhorn_iters}")
    # official: 0 streams make every logit 0 (nothing flows from the embedding to the head)
    need(cfg.hc_mult > 0, "hc_mult", f"must be a positive integer, got {cfg.hc_mult}")
    # num_hash_layers: no check. The official rule is layer_id < n_hash_layers (MTP block i is layer
    # num_hidden_layers + i): <= 0 means none, more than num_hidden_layers also hash-routes MTP blocks.


def _check_moe(cfg: ModelConfig, need) -> None:
    k, e = cfg.num_experts_per_tok, cfg.n_routed_experts
    # official: topk(k) of e < k scores raises; k = 0 would leave the shared expert alone, but v4jax's
    # router (moe.py: the hash table and dispatch) needs k >= 1
    need(k > 0, "num_experts_per_tok", f"must be a positive integer, got {k}")
    need(k <= e, "num_experts_per_tok", f"{k} > n_routed_experts={e}")
    # official: an intermediate size of 0 makes every expert output 0; v4jax's Linear init needs a width
    need(cfg.moe_intermediate_size > 0, "moe_intermediate_size",
         f"must be a positive integer, got {cfg.moe_intermediate_size}")
    # official MoE: assert args.n_shared_experts == 1
    need(cfg.n_shared_experts == 1, "n_shared_experts", f"exactly one shared expert is supported, got {cfg.n_shared_experts}")
    # official Gate: softmax, sigmoid, anything else is computed as sqrtsoftplus (its else branch); an
    # unknown name is refused rather than guessed
    need(cfg.scoring_func in ("sqrtsoftplus", "sigmoid", "softmax"), "scoring_func", f"unsupported '{cfg.scoring_func}'")
    # official Gate has no such switch: it always renormalises non-softmax top-k weights, so "false"
    # describes a model it does not compute
    need(cfg.norm_topk_prob or cfg.scoring_func == "softmax", "norm_topk_prob",
         "DeepSeek-V4 always renormalises the top-k weights of non-softmax scores; false is not supported")
    # swiglu_limit: no check; the official clamp applies when limit > 0, any other value is no clamp


def _check_rope(cfg: ModelConfig, need) -> None:
    # rope_theta, compress_rope_theta > 0 and finite: validate.MODEL_KEYS (a base <= 0 has NaN powers)
    n = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    if cfg.rope_original_max_position == 0 or not any(cfg.compress_ratios[:n]):
        return  # YaRN applies to compressed layers only: its keys describe nothing here
    # official find_correction_range: dim * log(original / (beta * 2 pi)) / (2 log(base)); base 1 divides
    # by zero, beta <= 0 has no logarithm
    need(cfg.compress_rope_theta != 1, "compress_rope_theta", "must not be 1 with YaRN (log(1) = 0 divides)")
    for key, val in (("rope_scaling.beta_fast", cfg.rope_beta_fast), ("rope_scaling.beta_slow", cfg.rope_beta_slow)):
        need(val > 0, key, f"must be > 0, got {val}")
    # official: freqs / factor; 0 makes the long-range frequencies infinite (NaN rotations)
    need(cfg.rope_factor > 0, "rope_scaling.factor", f"must be > 0, got {cfg.rope_factor}")


def yarn_correction_range(cfg: ModelConfig, theta: float) -> tuple[int, int]:
    """(low, high) dims of the YaRN ramp, as the official precompute_freqs_cis computes them."""
    dim = cfg.qk_rope_head_dim

    def corr(rot):
        return dim * math.log(cfg.rope_original_max_position / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low = math.floor(corr(cfg.rope_beta_fast))
    high = math.ceil(corr(cfg.rope_beta_slow))
    return max(low, 0), min(high, dim - 1)
