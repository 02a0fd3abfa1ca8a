"""The sparse-attention training recipe at model level: dense CSA phase and the indexer's KL loss."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax import model as M


def _forward(model, cfg, ids):
    g = nnx.graphdef(M.abstract(cfg))
    return M.forward_fn(g)(nnx.state(model), ids, jnp.zeros((ids.shape[0],), jnp.int32), None)


def test_dense_csa_equals_sparse_when_topk_covers_everything(loaded, expected):
    m = loaded["tiny-a-bf16"]
    ids = jnp.asarray(expected["tiny-a-bf16"]["tokens"][:1, :160])  # 40 entries <= top-k 64
    wide = dataclasses.replace(m.cfg, index_topk=64)
    sparse = np.asarray(_forward(m, wide, ids)["logits"])
    dense = np.asarray(_forward(m, dataclasses.replace(wide, csa_mode="dense"), ids)["logits"])
    assert np.abs(sparse - dense).max() <= 1e-5
    narrow_dense = np.asarray(_forward(m, dataclasses.replace(m.cfg, csa_mode="dense"), ids)["logits"])
    assert np.abs(narrow_dense - sparse).max() <= 1e-5  # dense ignores the top-k size
    narrow_sparse = np.asarray(_forward(m, m.cfg, ids)["logits"])
    assert np.abs(narrow_sparse - dense).max() > 1e-3  # with k = 16 < 40 entries, top-k does select


def test_indexer_kl_trains_only_the_indexer(loaded, expected):
    m = loaded["tiny-a-bf16"]
    cfg = dataclasses.replace(m.cfg, csa_mode="dense", indexer_loss=True)
    g, params, rest = nnx.split(M.abstract(cfg), nnx.Param, ...)
    params = nnx.state(m, nnx.Param)
    rest = nnx.state(m, nnx.Not(nnx.Param))
    ids = jnp.asarray(expected["tiny-a-bf16"]["tokens"][:1, :96])

    def kl(p):
        out = nnx.merge(g, p, rest)(ids)
        return sum(a["indexer_kl"] for i, a in enumerate(out["aux"]) if m.cfg.layer_ratio(i) == 4)

    val, grads = jax.jit(jax.value_and_grad(kl))(params)
    assert np.isfinite(float(val)) and float(val) > 0
    flat = {".".join(map(str, k)): np.abs(np.asarray(v[...])).max() for k, v in nnx.to_flat_state(grads)}
    for i, (s, j, _) in enumerate(m.layer_index()):  # the tiny fixture's segments hold one layer each
        flat.update({k.replace(f"stack.{s}.{j}.", f"layers.{i}.", 1): v for k, v in flat.items()
                     if k.startswith(f"stack.{s}.{j}.")})
    assert flat["layers.1.attn.indexer.wq_b.weight"] > 0 and flat["layers.1.attn.indexer.compressor.wkv.weight"] > 0
    assert flat["layers.1.attn.wq_a.weight"] == 0 and flat["embed.weight"] == 0 and flat["layers.0.attn.wkv.weight"] == 0
