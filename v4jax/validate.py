"""Typed configuration keys: one checking layer for the model config (hub config.json keys and the
run-time keys of `--set`) and the training run config (TOML, `--set`, flags).

Every key has a `Key`: a kind ("int", "float", "bool", "str"), an optional range or set of choices,
and whether null (None) is allowed. `check` takes a parsed value (JSON, TOML, Python) and refuses a
wrong type instead of coercing it: a bool is not a number, "128" is not an integer, 128.5 is not an
integer (128.0 is), NaN and infinities are not numbers. `parse_text` reads a command-line string
(`--set key=value`): true/false/1/0 for booleans, an integer literal for integers, then `check`.
Every error is a `ConfigError` naming the key, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from typing import Any


class ConfigError(ValueError):
    """A configuration value (config.json key, run setting, command-line path) v4jax cannot honour."""


@dataclasses.dataclass(frozen=True)
class Key:
    kind: str  # "int" | "float" | "bool" | "str"
    min: float | None = None  # inclusive lower bound
    above: float | None = None  # exclusive lower bound
    max: float | None = None  # inclusive upper bound
    choices: tuple[str, ...] | None = None
    optional: bool = False  # None (JSON null) allowed

    def allowed(self) -> str:
        """What this key accepts, in words ("an integer >= 1", "true or false", ...)."""
        text = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string"}[self.kind]
        bounds = [f">= {_num(self.min)}" if self.min is not None else None,
                  f"> {_num(self.above)}" if self.above is not None else None,
                  f"<= {_num(self.max)}" if self.max is not None else None]
        if any(bounds):
            text += " " + " and ".join(b for b in bounds if b)
        if self.choices:
            text = "one of " + ", ".join(self.choices)
        return text + (" or null" if self.optional else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _fail(where: str, name: str, key: Key, value) -> ConfigError:
    if key.choices and isinstance(value, str):
        return ConfigError(f"{where} '{name}': unknown {value!r} ({key.allowed()})")
    return ConfigError(f"{where} '{name}': must be {key.allowed()}, got {value!r}")


def _typed(key: Key, value):
    """value as key.kind, or raises TypeError; no coercion beyond int -> float and 4.0 -> 4."""
    if key.kind == "bool":
        if isinstance(value, bool):
            return value
    elif key.kind == "str":
        if isinstance(value, str):
            return value
    elif isinstance(value, bool):  # True is not 1 here
        pass
    elif key.kind == "int":
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
    elif key.kind == "float":
        if isinstance(value, numbers.Real) and math.isfinite(float(value)):
            return float(value)
    raise TypeError


def check(name: str, value: Any, key: Key, where: str = "config key"):
    """The value of key `name` as its kind, range and choices checked -> value (ints as int, floats as float)."""
    if value is None and key.optional:
        return None
    try:
        typed = _typed(key, value)
    except TypeError:
        raise _fail(where, name, key, value) from None
    if key.choices and typed not in key.choices:
        raise _fail(where, name, key, value)
    if ((key.min is not None and typed < key.min) or (key.above is not None and typed <= key.above)
            or (key.max is not None and typed > key.max)):
        raise _fail(where, name, key, value)
    return typed


def parse_text(name: str, text: str, key: Key, where: str = "--set"):
    """A command-line string for key `name` -> its typed, checked value."""
    low = text.strip().lower()
    if key.optional and low in ("none", "null"):
        return None
    value: Any = text
    if key.kind == "bool":
        value = {"true": True, "1": True, "false": False, "0": False}.get(low, text)
    elif key.kind == "int":
        try:
            value = int(low, 10)
        except ValueError:
            pass
    elif key.kind == "float":
        try:
            value = float(low)
        except ValueError:
            pass
    return check(name, value, key, where)


def near_miss(name: str, candidates) -> str | None:
    """The known key `name` is most likely a misspelling of, if any."""
    hits = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.8)
    return hits[0] if hits else None


# ---- the model config's keys ----------------------------------------------------------------------
# Types and the ranges that hold whatever the other keys are; ranges that depend on other keys (and the
# reasons the official code needs them) are in config._check_attention / _check_layers / _check_moe.
_INT, _POS, _NONNEG = Key("int"), Key("int", min=1), Key("int", min=0)
_FLOAT = Key("float")
MODEL_KEYS: dict[str, Key] = {
    **{k: Key("int") for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "index_n_heads",
        "index_head_dim", "index_topk", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
        "moe_intermediate_size", "num_hash_layers", "hc_mult", "hc_sinkhorn_iters", "num_nextn_predict_layers")},
    # RoPE: theta ** (-2i / rd) of a base <= 0 is NaN (every rotated query and key, so every logit)
    "rope_theta": Key("float", above=0), "compress_rope_theta": Key("float", above=0),
    "rope_factor": _FLOAT, "rope_beta_fast": _FLOAT, "rope_beta_slow": _FLOAT,  # YaRN: config._check_rope
    "rope_original_max_position": _NONNEG, "max_position_embeddings": _POS,
    "scoring_func": Key("str"), "routed_scaling_factor": _FLOAT, "norm_topk_prob": Key("bool"),
    "swiglu_limit": _FLOAT,  # <= 0: no clamp (official), any finite value
    # official RMSNorm x * rsqrt(mean(x^2) + eps): eps <= 0 divides by zero (or takes the root of a
    # negative) wherever a row is small, eps = 0 on the zero rows of the HC streams: NaN logits
    "rms_norm_eps": Key("float", above=0),
    # official Sinkhorn / HC head: softmax or sigmoid + eps, then divisions by (sum + eps): eps < 0 can
    # make a weight or a sum 0 or negative; 0 is computable (softmax and sigmoid are positive)
    "hc_eps": Key("float", min=0),
    "bos_token_id": _NONNEG, "eos_token_id": _NONNEG, "initializer_range": Key("float", min=0),
    "weight_format": Key("str", choices=("bf16", "fp8")),
    "expert_dtype": Key("str", choices=("fp4", "fp8", "bf16"), optional=True),
    # run-time keys (not in config.json)
    "dtype": Key("str", choices=("float32", "bfloat16", "float16")),
    "param_dtype": Key("str", choices=("float32", "bfloat16")),
    "qat_sim": Key("bool"), "qat_fp8_linear": Key("bool"), "qat_fp4_experts": Key("bool"),
    "attn_block": _POS,
    "moe_impl": Key("str", choices=("auto", "dense", "gather", "grouped", "ep")),
    "moe_kernel": Key("str", choices=("jnp", "ragged_dot", "megablox")),
    "moe_capacity_factor": Key("float", min=0),
    "csa_mode": Key("str", choices=("sparse", "dense")), "indexer_loss": Key("bool"),
    "attention_kernel": Key("str", choices=("jnp", "pallas_tpu", "pallas_gpu")),
    "scan_layers": Key("bool"), "remat": Key("str", choices=("none", "layer")), "native_weights": Key("bool"),
}

# ---- the training run's keys (v4jax.trainer.RunConfig) ----------------------------------------------
_PATH, _OPT_PATH = Key("str"), Key("str", optional=True)
RUN_KEYS: dict[str, Key] = {
    "config": _PATH, "steps": _POS, "batch": _POS, "seq_len": _POS, "lr": Key("float", above=0),
    "warmup": Key("int", min=0, optional=True), "end_lr_frac": Key("float", min=0, max=1), "weight_decay": Key("float", min=0),
    "clip_norm": _FLOAT,  # <= 0: no clipping (optim.OptimConfig)
    "seed": _NONNEG, "out": _PATH,
    "save_every": _NONNEG,  # 0: only at the last step
    "keep": _POS, "resume_step": Key("int", min=-1),
    "schedule_change": Key("str", choices=("refuse", "extend", "adopt")), "mesh": _OPT_PATH, "data": _OPT_PATH, "data_max_bytes": _POS, "tokenizer": _OPT_PATH,
    "log_every": _POS, "bias_gamma": Key("float", min=0), "balance_alpha": Key("float", min=0),
    "mtp_weight": Key("float", min=0), "mtp_weight_late": Key("float", min=0), "spike_detect": Key("bool"),
    "spike_window": _POS, "spike_factor": Key("float", above=0), "snapshot_every": _POS,
    "ar_delta": _NONNEG, "ar_steps": _NONNEG, "inject_spike_at": Key("int", min=-1),
    "phases": Key("str"), "indexer_kl_weight": Key("float", min=0), "sample_tokens": _NONNEG, "tensorboard": Key("bool"), "profile_steps": Key("str"), "wandb_project": _OPT_PATH,
    "seq_stages": Key("str"), "grad_accum": _POS, "qat": Key("str"),
    **{k: MODEL_KEYS[k] for k in ("attention_kernel", "moe_impl", "moe_kernel", "moe_capacity_factor",
                                  "scan_layers", "remat", "dtype", "param_dtype")},
}
