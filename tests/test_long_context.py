"""Million-token state and long real contexts on the CPU.

The engine is allocated for max_context = 1,048,576; a context of V4JAX_LONG_CONTEXT tokens (CI: 8K;
`V4JAX_LONG_CONTEXT=131072 pytest tests/test_long_context.py` for the 128K run) is prefilled in
8K chunks, then one-token decode steps at that context must equal a chunked prefill of the same
tokens from a fork of the same state. A lighter indexer (1 head) keeps the CPU prefill short: the
prefill's indexer work is O(S^2/4) by design."""
import json
import os

import jax
import numpy as np
import pytest

from v4jax import model as M
from v4jax.config import CONFIG_DIR, ModelConfig
from v4jax.engine import Engine
from v4jax.sampling import SamplingConfig
from v4jax.serving import kv_report

CONTEXT = int(os.environ.get("V4JAX_LONG_CONTEXT", 8192))
MAX_CONTEXT = 1 << 20


@pytest.fixture(scope="module")
def long_cfg():
    with open(os.path.join(CONFIG_DIR, "tiny.json")) as f:
        raw = json.load(f)
    raw.update(num_hidden_layers=2, compress_ratios=[4, 128, 0], index_n_heads=1, num_hash_layers=0)
    return ModelConfig.from_hub(raw)


def test_decode_at_long_context_equals_chunked_prefill(long_cfg):
    eng = Engine(M.build(long_cfg, 0), max_context=MAX_CONTEXT, batch=1, min_bucket=CONTEXT + 8,
                 prefill_chunk=8192, fixed_chunk=True)
    ids = np.random.default_rng(0).integers(2, long_cfg.vocab_size, CONTEXT + 4)
    for s in range(0, CONTEXT, 8192):
        eng.prefill([ids[s:min(s + 8192, CONTEXT)]])
    assert eng.pos[0] == CONTEXT
    fork = eng.snapshot()
    stepped = []
    for t in ids[CONTEXT:]:
        _, lg = eng.decode([t], SamplingConfig(), jax.random.key(0))
        stepped.append(np.asarray(lg)[0])
    eng.restore(fork)  # shares the entry buffers, copies windows and tails
    chunked = eng.prefill([ids[CONTEXT:]], chunk=8192, all_logits=True)[0]
    assert np.isfinite(chunked).all()
    assert np.abs(np.stack(stepped) - chunked).max() <= 1e-4


def test_million_token_state_matches_kv_report(long_cfg):
    tiny = ModelConfig.tiny()
    for cfg in (tiny, long_cfg):
        for layout in ("bfloat16", "fp8"):
            st = jax.eval_shape(lambda: M.abstract(cfg).init_state(1, MAX_CONTEXT, layout))
            rep = kv_report(cfg, MAX_CONTEXT, layout)
            assert rep["total_bytes"] == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(st))
    rep = kv_report(tiny, MAX_CONTEXT, "bfloat16")
    # tiny: 2 CSA layers x (128 + 128 bf16) x 2 B / 4 + 1 HCA (ratio 16) x 128 x 2 B / 16
    assert rep["bytes_per_token"] == 2 * 256 * 2 / 4 + 128 * 2 / 16
