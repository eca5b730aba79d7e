"""Tests for clip_jax.sharding: mesh construction, logical rules, parameter and batch shardings."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax import sharding

# ------------------------------------------------------------------------------------------
# Mesh.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        ({}, (8, 1, 1)),
        ({"fsdp": 2}, (4, 2, 1)),
        ({"data": 2, "fsdp": -1}, (2, 4, 1)),
        ({"data": 2, "fsdp": 2, "model": 2}, (2, 2, 2)),
        ({"data": 1, "fsdp": 1, "model": -1}, (1, 1, 8)),
    ],
)
def test_make_mesh_resolves_sizes(kwargs, shape):
    mesh = sharding.make_mesh(**kwargs)
    assert mesh.axis_names == sharding.MESH_AXES == ("data", "fsdp", "model")
    assert tuple(mesh.shape.values()) == shape
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_make_mesh_on_a_subset_of_devices():
    mesh = sharding.make_mesh(data=-1, fsdp=2, devices=jax.devices()[:4])
    assert tuple(mesh.shape.values()) == (2, 2, 1)
    assert {d.id for d in mesh.devices.flat} == {d.id for d in jax.devices()[:4]}


def test_make_mesh_errors_name_sizes_and_fix():
    with pytest.raises(ValueError, match=r"data=3 x fsdp=1 x model=1 = 3 .*8 devices.*-1"):
        sharding.make_mesh(data=3)
    with pytest.raises(ValueError, match=r"data=4 x fsdp=4 x model=1 = 16 .*8 devices"):
        sharding.make_mesh(data=4, fsdp=4)
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        sharding.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match=r"multiply to 3.*8 devices"):
        sharding.make_mesh(data=-1, fsdp=3)
    with pytest.raises(ValueError, match="positive int or -1"):
        sharding.make_mesh(data=0)


def test_batch_and_replicated_shardings():
    mesh = sharding.make_mesh(data=4, fsdp=2)
    assert sharding.BATCH_AXES == ("data", "fsdp")
    bs = sharding.batch_sharding(mesh)
    assert bs == NamedSharding(mesh, P(("data", "fsdp")))
    x = jax.device_put(jnp.arange(16 * 3).reshape(16, 3), bs)
    # row-major over (data, fsdp): device at mesh position (d, f) holds rows 2*(2d+f) ...
    for shard in x.addressable_shards:
        pos = np.argwhere(mesh.devices == shard.device)[0]
        start = (pos[0] * 2 + pos[1]) * 2
        chex.assert_trees_all_equal(np.asarray(shard.data[:, 0]), np.arange(start, start + 2) * 3)
    assert sharding.replicated(mesh) == NamedSharding(mesh, P())


# ------------------------------------------------------------------------------------------
# Rules and parameter shardings.
# ------------------------------------------------------------------------------------------


class _Toy(nn.Module):
    """One parameter per interesting case; sizes chosen for a (data=1, fsdp=4, model=2) mesh."""

    @nn.compact
    def __call__(self, x):
        def p(name, shape, names):
            init = nn.with_logical_partitioning(nn.initializers.zeros, names)
            return self.param(name, init, shape, jnp.float32)

        p("mlp_in", (32, 64), ("embed", "mlp"))
        p("mlp_out", (64, 32), ("mlp", "embed"))
        p("qkv", (32, 3, 8), ("embed", "heads", "head_dim"))  # 3 heads: head_dim takes model
        p("proj", (32, 16), ("embed", "proj"))
        p("proj_small", (6, 16), ("embed", "proj"))  # 6 % 4: proj takes fsdp instead
        p("mlp_tiny", (6, 3), ("embed", "mlp"))  # nothing divides: replicated
        p("token_embedding", (100, 32), ("vocab", "embed"))
        p("positional_embedding", (77, 32), ("position", "embed"))
        p("ln_scale", (32,), ("norm",))
        p("conv", (3, 3, 3, 8), ("conv_h", "conv_w", "conv_in", "conv_out"))
        p("conv_odd", (3, 3, 8, 6), ("conv_h", "conv_w", "conv_in", "conv_out"))
        p("same_twice", (8, 8), ("embed", "embed"))
        self.param(
            "mesh_named",
            nn.with_partitioning(nn.initializers.zeros, ("fsdp", "model")),
            (8, 3),
            jnp.float32,
        )  # plain nn.Partitioned: 3 % 2 -> model dropped
        self.param("log_scale", nn.initializers.zeros, (), jnp.float32)  # unboxed leaf
        return x


_EXPECTED_FSDP = {
    "mlp_in": P("fsdp", "model"),
    "mlp_out": P("model", "fsdp"),
    "qkv": P("fsdp", None, "model"),
    "proj": P("fsdp"),
    "proj_small": P(None, "fsdp"),
    "mlp_tiny": P(),
    "token_embedding": P(None, "fsdp"),
    "positional_embedding": P(None, "fsdp"),
    "ln_scale": P(),
    "conv": P(None, None, None, "fsdp"),
    "conv_odd": P(None, None, "fsdp"),
    "same_twice": P("fsdp"),
    "mesh_named": P("fsdp"),
    "log_scale": P(),
}


def _abstract_toy():
    return jax.eval_shape(_Toy().init, jax.random.key(0), jnp.zeros((1,)))


def _axes_of(spec):
    out = []
    for entry in spec:
        out += [] if entry is None else ([entry] if isinstance(entry, str) else list(entry))
    return out


def test_param_shardings_fsdp_rules():
    mesh = sharding.make_mesh(data=1, fsdp=4, model=2)
    abstract = _abstract_toy()
    shardings = sharding.param_shardings(abstract, mesh, sharding.logical_rules("fsdp"))
    # Same structure as the unboxed params, NamedSharding leaves.
    assert jax.tree.structure(shardings) == jax.tree.structure(nn.unbox(abstract))
    got = {k: s.spec for k, s in shardings["params"].items()}
    assert got == _EXPECTED_FSDP
    for s in jax.tree.leaves(shardings):
        assert isinstance(s, NamedSharding) and s.mesh == mesh
        axes = _axes_of(s.spec)
        assert len(axes) == len(set(axes)), s.spec  # no mesh axis used twice


def test_param_shardings_fall_back_on_other_meshes():
    abstract = _abstract_toy()
    rules = sharding.logical_rules("fsdp")
    # model=1: no 'model' entries at all; fsdp=8 does not divide 6 or 16 -> those replicate.
    specs = sharding.param_partition_specs(abstract, sharding.make_mesh(data=1, fsdp=8), rules)[
        "params"
    ]
    assert specs["mlp_in"] == P("fsdp") and specs["qkv"] == P("fsdp")
    assert specs["proj_small"] == P(None, "fsdp")  # 16 % 8 == 0
    assert specs["conv_odd"] == P(None, None, "fsdp")
    assert specs["mlp_tiny"] == P()
    # pure data parallel mesh: everything replicated even with fsdp rules
    dp_mesh = sharding.make_mesh()
    assert all(
        s == P()
        for s in jax.tree.leaves(
            sharding.param_partition_specs(abstract, dp_mesh, rules),
            is_leaf=lambda x: isinstance(x, P),
        )
    )


def test_dp_rules_replicate_everything():
    mesh = sharding.make_mesh(data=1, fsdp=4, model=2)
    shardings = sharding.param_shardings(_abstract_toy(), mesh, sharding.logical_rules("dp"))
    assert {s.spec for k, s in shardings["params"].items() if k != "mesh_named"} == {P()}
    with pytest.raises(ValueError, match=r"'dp', 'fsdp'"):
        sharding.logical_rules("zero3")


def test_every_strategy_has_one_rule_per_logical_axis():
    # The axis names of docs/architecture.md, written out: the models' list must not drift.
    documented = {
        "embed",
        "mlp",
        "heads",
        "head_dim",
        "vocab",
        "position",
        "proj",
        "conv_in",
        "conv_out",
        "conv_h",
        "conv_w",
        "norm",
    }
    for strategy in sharding.STRATEGIES:
        names = [name for name, _ in sharding.logical_rules(strategy)]
        assert sorted(names) == sorted(documented), strategy


def test_rules_work_with_flax_and_with_jit_init():
    mesh = sharding.make_mesh(data=1, fsdp=4, model=2)
    rules = sharding.logical_rules("fsdp")
    abstract = _abstract_toy()
    # flax reads the same rules (without the divisibility fall-back): agree where all divide.
    # (flax refuses a param naming one logical axis twice, e.g. "same_twice"; ours does not.)
    logical = nn.get_partition_spec(abstract)["params"]
    ours = sharding.param_shardings(abstract, mesh, rules)
    for name in ("mlp_in", "mlp_out", "proj", "token_embedding", "conv"):
        flax_sh = nn.logical_to_mesh_sharding(logical[name], mesh, rules)
        ndim = len(abstract["params"][name].value.shape)
        assert flax_sh.is_equivalent_to(ours["params"][name], ndim), name
    # and the shardings place a real initialisation.
    params = jax.jit(lambda k: nn.unbox(_Toy().init(k, jnp.zeros((1,)))), out_shardings=ours)(
        jax.random.key(0)
    )
    assert params["params"]["mlp_in"].sharding.spec == P("fsdp", "model")
    assert params["params"]["mlp_in"].addressable_shards[0].data.shape == (8, 32)
