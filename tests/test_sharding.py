"""The sharded forward on 8 fake CPU devices equals the single-device forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import fixture_dir
from v4jax import checkpoint
from v4jax import model as M
from v4jax.sharding import batch_sharding, make_mesh, spec_for


@pytest.fixture(scope="module")
def reference(loaded, expected):
    ids = jnp.asarray(expected["tiny-a-bf16"]["tokens"][:, :96])
    g, p = nnx.split(loaded["tiny-a-bf16"])
    return ids, np.asarray(M.forward_fn(g)(p, ids, jnp.zeros((2,), jnp.int32), None)["logits"])


@pytest.mark.parametrize("mesh_spec", ["data=2,expert=2,tensor=2", "fsdp=4,tensor=2"])
def test_sharded_forward_equals_single_device(reference, mesh_spec):
    assert len(jax.devices()) == 8
    ids, ref = reference
    mesh = make_mesh(mesh_spec)
    model = checkpoint.load_hub(fixture_dir("tiny-a-bf16"), mesh=mesh)
    g, p = nnx.split(model)
    shards = {len(v[...].sharding.device_set) for _, v in nnx.to_flat_state(p)}
    assert max(shards) == 8  # parameters really are spread over the mesh
    ids_s = jax.device_put(ids, batch_sharding(mesh, ids.shape))
    start = jax.device_put(jnp.zeros((2,), jnp.int32), batch_sharding(mesh, (2,)))
    got = np.asarray(M.forward_fn(g)(p, ids_s, start, None)["logits"])
    assert np.abs(got - ref).max() <= 1e-5


def test_rules_drop_non_dividing_axes():
    mesh = make_mesh("expert=2,tensor=4")
    assert tuple(spec_for(("experts", "moe_mlp", "embed"), (8, 128, 128), mesh)) == ("expert", "tensor", None)
    assert tuple(spec_for(("heads",), (6,), mesh)) == (None,)  # 6 heads do not split 4 ways


def test_bad_mesh_spec():
    with pytest.raises(ValueError, match="bad --mesh entry"):
        make_mesh("pipeline=2")


def test_optimizer_moments_are_sharded_like_their_parameters():
    """Muon momentum and Adam moments follow their parameter's sharding; counters are replicated."""
    from v4jax.trainer import RunConfig, Trainer
    t = Trainer(RunConfig(mesh="fsdp=2,expert=2,tensor=2"), devices=jax.devices()[:8], abstract=True)
    params = {jax.tree_util.keystr(p): x.sharding.spec for p, x in jax.tree_util.tree_leaves_with_path(t.ts["params"])}
    moments = sharded = 0
    for path, x in jax.tree_util.tree_leaves_with_path(t.ts["opt"]):
        key = jax.tree_util.keystr(path)
        owner = max((k for k in params if key.endswith(k)), key=len, default=None)  # its own, not a namesake
        if owner is None:
            assert x.shape == () and x.sharding.spec == jax.sharding.PartitionSpec(), key
            continue
        moments += 1
        assert x.sharding.spec == params[owner], key
        sharded += any(a is not None for a in x.sharding.spec)
    assert moments >= len(params) and sharded > 20
