"""Packed documents: attention, compressors and the indexer never mix documents; positions restart."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from v4jax import model as M


@pytest.fixture(scope="module")
def packed(loaded, expected):
    m = loaded["tiny-a-bf16"]
    toks = expected["tiny-a-bf16"]["tokens"]
    d1, d2 = toks[0, :80], toks[1, :100]  # doc 2 starts at 80, a multiple of every ratio (4, 16)
    row = jnp.asarray(np.concatenate([d1, d2])[None])
    seg = jnp.asarray(np.array([1] * 80 + [2] * 100)[None], jnp.int32)
    pos = jnp.asarray(np.concatenate([np.arange(80), np.arange(100)])[None], jnp.int32)
    return m, d1, d2, row, seg, pos


def test_packed_row_equals_documents_alone(packed):
    m, d1, d2, row, seg, pos = packed
    g, p = nnx.split(m)

    def fwd(params, ids, pos, seg):
        return nnx.merge(g, params)(ids, positions=pos, segment_ids=seg)["logits"]

    got = np.asarray(jax.jit(fwd)(p, row, pos, seg))[0]
    z = jnp.zeros((1,), jnp.int32)
    alone1 = np.asarray(M.forward_fn(g)(p, jnp.asarray(d1[None]), z, None)["logits"])[0]
    alone2 = np.asarray(M.forward_fn(g)(p, jnp.asarray(d2[None]), z, None)["logits"])[0]
    assert np.abs(got[:80] - alone1).max() <= 1e-4
    assert np.abs(got[80:] - alone2).max() <= 1e-4
    # without the document ids the second document does see the first
    mixed = np.asarray(jax.jit(fwd)(p, row, pos, jnp.ones_like(seg)))[0]
    assert np.abs(mixed[80:] - alone2).max() > 1e-2


def test_no_gradient_across_the_boundary(packed):
    m, d1, d2, row, seg, pos = packed
    g, p = nnx.split(m)
    emb = m.embed(row)

    def loss_at(e, t):  # cross-entropy of the token predicted at position t of the packed row
        logits = nnx.merge(g, p)(row, positions=pos, segment_ids=seg, inputs_embeds=e)["logits"]
        return optax.softmax_cross_entropy_with_integer_labels(logits[0, t], row[0, t + 1])

    grad = jax.jit(jax.grad(loss_at), static_argnums=1)(emb, 85)
    assert np.abs(np.asarray(grad[0, :80])).max() == 0.0
    assert np.abs(np.asarray(grad[0, 80:86])).max() > 0.0  # but it does depend on its own document
