"""Typed, range-checked configuration (issue 13, items 3, 5, 6): hub config.json keys, the model's run-time
keys (`--set` of infer.py), the training run's settings (TOML, `--set` of train.py) and --tokenizer paths.
Every refusal is a ConfigError naming the key, the value and what is allowed, raised before anything is
built or compiled."""
import json
import math
import os

import pytest

import train
from conftest import fixture_dir
from v4jax import data as D
from v4jax.config import REQUIRED_HUB_KEYS, ConfigError, ModelConfig, parse_runtime
from v4jax.trainer import RunConfig
from v4jax.validate import MODEL_KEYS, RUN_KEYS


def _raw(**edits) -> dict:
    with open(os.path.join(fixture_dir("tiny-a-bf16"), "config.json")) as f:
        return {**json.load(f), **edits}


def _yarn(**edits) -> dict:
    return dict(_raw()["rope_scaling"], **edits)


# ---- item 3: values that make every logit NaN ------------------------------------------------------
@pytest.mark.parametrize("key,value,needle", [
    ("rms_norm_eps", 0, "> 0"), ("rms_norm_eps", -1e-6, "> 0"), ("rope_theta", 0, "> 0"),
    ("rope_theta", -10000.0, "> 0"), ("compress_rope_theta", 0.0, "> 0"), ("hc_eps", -1e-6, ">= 0"),
    ("routed_scaling_factor", math.nan, "finite"), ("routed_scaling_factor", math.inf, "finite"),
    ("swiglu_limit", math.nan, "finite"), ("rms_norm_eps", math.inf, "finite"),
    ("compress_rope_theta", 1, "YaRN"), ("initializer_range", -0.02, ">= 0"),
])
def test_values_that_make_logits_nan_are_refused(key, value, needle):
    with pytest.raises(ConfigError, match=f"config key '{key}'.*{needle}"):
        ModelConfig.from_hub(_raw(**{key: value}))


@pytest.mark.parametrize("sub,value", [("factor", 0), ("factor", -2.0), ("beta_fast", 0), ("beta_slow", -1)])
def test_yarn_values_that_make_logits_nan_are_refused(sub, value):
    with pytest.raises(ConfigError, match=f"config key 'rope_scaling.{sub}': must be > 0"):
        ModelConfig.from_hub(_raw(rope_scaling=_yarn(**{sub: value})))


def test_the_boundaries_are_where_nan_starts():
    cfg = ModelConfig.from_hub(_raw(hc_eps=0, routed_scaling_factor=0, rms_norm_eps=1e-12, rope_theta=1))
    assert (cfg.hc_eps, cfg.routed_scaling_factor, cfg.rope_theta) == (0.0, 0.0, 1.0)
    assert isinstance(cfg.hc_eps, float) and isinstance(cfg.rope_theta, float)
    with pytest.raises(ConfigError, match="config key 'rms_norm_eps': must be a finite number > 0, got 0"):
        ModelConfig.from_hub(_raw(rms_norm_eps=0))
    # YaRN keys describe nothing without a compressed layer: with SWA layers only, theta 1 is computable
    ModelConfig.from_hub(_raw(compress_ratios=[0] * 5, compress_rope_theta=1, rope_scaling=_yarn(factor=0)))
    with pytest.raises(ConfigError, match="config key 'rope_scaling.factor'"):
        ModelConfig.from_hub(_raw(compress_ratios=[0, 0, 0, 4, 0], rope_scaling=_yarn(factor=0)))


# ---- item 5: wrong types are refused, not coerced ------------------------------------------------
@pytest.mark.parametrize("key,value,allowed", [
    ("norm_topk_prob", "false", "true or false"), ("norm_topk_prob", 0, "true or false"),
    ("hidden_size", "128", "an integer"), ("num_hidden_layers", "4", "an integer"),
    ("hidden_size", None, "an integer"), ("hidden_size", 128.5, "an integer"), ("vocab_size", True, "an integer"),
    ("num_attention_heads", [4], "an integer"), ("rope_theta", "10000", "a finite number"),
    ("rms_norm_eps", False, "a finite number"), ("scoring_func", 3, "a string"),
    ("tie_word_embeddings", "false", "true or false"), ("attention_bias", "no", "true or false"),
    ("compress_ratios[2]", 16.5, "an integer"), ("compress_ratios[1]", True, "an integer"),
    ("rope_scaling.factor", "16", "a finite number"),
    ("rope_scaling.original_max_position_embeddings", 65536.5, "an integer"),
])
def test_wrong_types_are_refused_naming_key_value_and_allowed(key, value, allowed):
    if key.startswith("compress_ratios"):
        ratios = [0, 4, 16, 4, 0]
        ratios[int(key[-2])] = value
        raw = _raw(compress_ratios=ratios)
    elif key.startswith("rope_scaling."):
        raw = _raw(rope_scaling=_yarn(**{key.split(".")[1]: value}))
    else:
        raw = _raw(**{key: value})
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hub(raw)
    msg = str(e.value)  # the key, what is allowed, the value as written
    assert msg.startswith(f"config key '{key}': must be {allowed}") and msg.endswith(f", got {value!r}"), msg


def test_integral_floats_are_integers():
    cfg = ModelConfig.from_hub(_raw(hidden_size=128.0, compress_ratios=[0, 4.0, 16, 4, 0]))
    assert cfg.hidden_size == 128 and type(cfg.hidden_size) is int
    assert cfg.compress_ratios == (0, 4, 16, 4, 0) and all(type(r) is int for r in cfg.compress_ratios)


def test_every_field_has_a_type():
    fields = set(ModelConfig.__dataclass_fields__) - {"compress_ratios"}
    assert fields == set(MODEL_KEYS)
    assert set(RunConfig.__dataclass_fields__) == set(RUN_KEYS)
    with pytest.raises(ConfigError, match="config key 'attn_block': must be an integer >= 1, got 64.5"):
        ModelConfig.tiny(attn_block=64.5)
    with pytest.raises(ConfigError, match="config key 'indexer_loss': must be true or false, got 'yes'"):
        ModelConfig.tiny(indexer_loss="yes")


def test_misspelt_or_missing_keys_are_refused():
    raw = _raw()
    raw["num_hiden_layers"] = raw.pop("num_hidden_layers")
    needle = r"config key 'num_hiden_layers': unknown key \(did you mean 'num_hidden_layers'"
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_hub(raw)
    raw = _raw(rope_thetaa=5e4)
    del raw["rope_theta"]
    with pytest.raises(ConfigError, match="did you mean 'rope_theta'"):
        ModelConfig.from_hub(raw)
    for key in REQUIRED_HUB_KEYS:
        raw = _raw()
        del raw[key]
        with pytest.raises(ConfigError, match=f"config key '{key}': missing"):
            ModelConfig.from_hub(raw)
    # informational keys stay accepted, near-misses of keys the file has included (other frameworks' fields)
    cfg = ModelConfig.from_hub(_raw(qk_nope_head_dim=64, intermediate_size=512, kv_lora_rank=128, some_future_field=3,
                                    transformers_version="4.57.0", torch_dtype="bfloat16", use_cache=True))
    assert cfg.num_hidden_layers == 4


def test_too_long_compress_ratios_is_refused():
    with pytest.raises(ConfigError, match="config key 'compress_ratios': has 6 entries, more than the 5"):
        ModelConfig.from_hub(_raw(compress_ratios=[0, 4, 16, 4, 0, 0]))
    with pytest.raises(ConfigError, match="config key 'compress_ratios': needs one entry per layer"):
        ModelConfig.from_hub(_raw(compress_ratios=[0, 4, 16, 4]))


def test_unreadable_config_files_name_the_file(tmp_path):
    cases = {"list.json": json.dumps([_raw()]), "text.json": "vocab_size = 3", "binary.json": b"\xff\xfe\x00\x81"}
    for name, body in cases.items():
        p = tmp_path / name
        p.write_bytes(body if isinstance(body, bytes) else body.encode())
        with pytest.raises(ConfigError, match=str(p)):
            ModelConfig.from_hub(str(p))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=f"no config.json at {tmp_path / 'empty'}"):
        ModelConfig.from_hub(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="path or its parsed object, got a list"):
        ModelConfig.from_hub([_raw()])
    with pytest.raises(ConfigError, match="'quantization_config': must be an object or null"):
        ModelConfig.from_hub(_raw(quantization_config="fp8"))


def test_model_runtime_set_is_typed():
    assert parse_runtime(["scan_layers=FALSE", "qat_sim=1", "attn_block=64", "moe_capacity_factor=1.5"]) == {
        "scan_layers": False, "qat_sim": True, "attn_block": 64, "moe_capacity_factor": 1.5}
    for item, needle in [("scan_layers=ture", "'scan_layers': must be true or false, got 'ture'"),
                         ("indexer_loss=yes", "'indexer_loss': must be true or false, got 'yes'"),
                         ("attn_block=6.5", "'attn_block': must be an integer >= 1, got '6.5'"),
                         ("attn_block=0", "'attn_block': must be an integer >= 1, got 0"),
                         ("moe_capacity_factor=nan", "'moe_capacity_factor': must be a finite number >= 0"),
                         ("remat=all", "'remat': unknown 'all' \\(one of none, layer\\)"),
                         ("atn_block=8", "did you mean 'attn_block'")]:
        with pytest.raises(ConfigError, match=needle):
            parse_runtime([item])


def test_run_set_is_typed():
    rc = RunConfig.load(None, ["steps=4", "spike_detect=False", "lr=1e-3", "log_every=1", "mesh=null", "seed=0"])
    assert (rc.steps, rc.spike_detect, rc.lr, rc.log_every, rc.mesh) == (4, False, 1e-3, 1, None)
    assert RunConfig.load(None, ["spike_detect=1", "clip_norm=0"]).spike_detect is True
    for item, needle in [("spike_detect=ture", "'spike_detect': must be true or false, got 'ture'"),
                         ("steps=3.5", "'steps': must be an integer >= 1, got '3.5'"),
                         ("lr=abc", "'lr': must be a finite number > 0, got 'abc'"),
                         ("log_every=0", "'log_every': must be an integer >= 1, got 0"),
                         ("batch=-2", "'batch': must be an integer >= 1"), ("lr=inf", "'lr': must be a finite"),
                         ("end_lr_frac=2", "'end_lr_frac': must be a finite number >= 0 and <= 1"),
                         ("moe_kernel=gmm", "'moe_kernel': unknown 'gmm'"), ("stesp=4", "did you mean 'steps'")]:
        with pytest.raises(ConfigError, match=needle):
            RunConfig.load(None, [item])
    with pytest.raises(ConfigError, match="run setting 'steps': must be an integer >= 1, got 3.5"):
        RunConfig(steps=3.5)


def test_run_toml_is_typed(tmp_path):
    for body, needle in [("steps = 3.5", "'steps': must be an integer >= 1, got 3.5"),
                         ('spike_detect = "true"', "'spike_detect': must be true or false, got 'true'"),
                         ('lr = "3e-3"', "'lr': must be a finite number > 0"),
                         ("log_evry = 5", "did you mean 'log_every'"),
                         ("steps = ", "not valid TOML")]:
        p = tmp_path / "run.toml"
        p.write_text(body + "\n")
        with pytest.raises(ConfigError, match=needle):
            RunConfig.load(str(p), [])
    p.write_text("steps = 7\nlr = 1\nspike_detect = false\n")
    rc = RunConfig.load(str(p), [])
    assert (rc.steps, rc.lr, rc.spike_detect) == (7, 1.0, False) and type(rc.lr) is float


def test_train_cli_refuses_bad_settings_before_compiling(tmp_path, capsys):
    out = str(tmp_path / "run")
    for argv, needle in [(["--set", "steps=3.5"], "'steps'"), (["--set", "log_every=0"], "'log_every'"),
                         (["--set", "spike_detect=ture"], "'spike_detect'"), (["--set", "lr=abc"], "'lr'"),
                         (["--config", str(tmp_path)], "no config.json at")]:
        assert train.main(argv + ["--out", out]) == 2
        assert needle in capsys.readouterr().err
    assert not os.path.exists(out)  # nothing built, nothing written


# ---- item 6: a --tokenizer that was given must exist -----------------------------------------------
def _word_tokenizer(path) -> str:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {D.BOS: 0, D.EOS: 1, "<unk>": 2, "hello": 3}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.save(str(path))
    return str(path)


def test_given_tokenizer_must_exist(tmp_path):
    missing = str(tmp_path / "tokenizer.json")
    with pytest.raises(ConfigError, match=f"tokenizer {missing}: no such file"):
        D.load_tokenizer(missing)
    with pytest.raises(ConfigError, match="is a directory"):
        D.load_tokenizer(str(tmp_path))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="bad.json: not a readable tokenizer.json"):
        D.load_tokenizer(str(tmp_path / "bad.json"))
    # only a default (a checkpoint's own tokenizer.json) may be absent: then bytes
    assert isinstance(D.load_tokenizer(None, default=missing), D.ByteTokenizer)
    tok = _word_tokenizer(tmp_path / "real.json")
    assert isinstance(D.load_tokenizer(None, default=tok), D.HFTokenizer)
    assert isinstance(D.load_tokenizer(tok, default=missing), D.HFTokenizer)


def test_train_cli_refuses_a_missing_tokenizer(tmp_path, capsys):
    missing = str(tmp_path / "nope.json")
    assert train.main(["--tokenizer", missing, "--out", str(tmp_path / "run")]) == 2
    assert f"tokenizer {missing}: no such file" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["generate", "chat"])
def test_infer_cli_refuses_a_missing_tokenizer(tmp_path, capsys, cmd):
    """generate / chat with a --tokenizer that does not exist: exit 2 naming it, before loading the model
    (it used to fall back to the byte tokenizer silently)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("infer_cli", os.path.join(os.path.dirname(train.__file__), "infer.py"))
    infer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer)
    missing = str(tmp_path / "nope.json")
    argv = [cmd, "--checkpoint", fixture_dir("tiny-a-bf16"), "--tokenizer", missing]
    assert infer.main(argv + (["--prompt", "hi"] if cmd == "generate" else [])) == 2
    err = capsys.readouterr().err
    assert f"tokenizer {missing}: no such file" in err and "loaded" not in err
