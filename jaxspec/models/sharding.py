"""Tensor and data parallelism with `jax.sharding`, declared once per parameter kind.

A mesh has two axes: "data" splits the batch rows, "model" splits each layer along its
key/value heads (whole attention groups: wqkv [D, K, G + 2, Dh], wo's rows, the KV caches), its
MLP columns (w_gate_up [D, 2, F], w_down's rows) and the vocabulary (embed [V, D], lm_head
[D, V]). The stored layouts (see models.decoder) split this way without reshuffling. XLA's
partitioner inserts the collectives; reductions over a split axis (the output layer's
vocabulary in sampling and rejection) stay global, so results do not depend on the mesh
beyond floating-point summation order.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxspec.errors import UserError
from jaxspec.models.config import ModelConfig

DATA, MODEL = "data", "model"

# leaf name -> how it is split; every other leaf (norms) is replicated
PARAM_SPECS = {
    "embed": P(MODEL, None),  # [V, D]
    "lm_head": P(None, MODEL),  # [D, V]
    "wqkv": P(None, MODEL, None, None),  # [D, K, G + 2, Dh]
    "bqkv": P(MODEL, None, None),  # [K, G + 2, Dh]
    "wo": P(MODEL, None),  # [H·Dh, D], query head h = k·G + g: whole groups per shard
    "w_gate_up": P(None, None, MODEL),  # [D, 2, F]
    "w_down": P(MODEL, None),  # [F, D]
}
CACHE_SPEC = P(None, DATA, MODEL, None, None)  # k, v [L, B, K, ., .]
ROWS_SPEC = P(DATA)  # [B, ...] token buffer, lengths, flags


def check(config: ModelConfig, *, tp: int, dp: int, devices: int, what: str = "model") -> None:
    """Refuse a mesh the model or the machine cannot take (one-line UserError)."""
    if tp < 1 or dp < 1:
        raise UserError(f"tp and dp must be >= 1, got tp={tp}, dp={dp}")
    if tp * dp > devices:
        raise UserError(f"tp × dp = {tp * dp} needs {tp * dp} devices; {devices} available")
    for name, size in (("key/value heads", config.num_kv_heads),
                       ("MLP width", config.intermediate_size), ("vocabulary", config.vocab_size)):
        if size % tp:
            raise UserError(f"tp={tp} does not divide the {what}'s {name} ({size}); use a tp "
                            f"that divides {size}")


def mesh_for(config: ModelConfig, *, tp: int, dp: int, platform: str) -> Mesh | None:
    """A checked mesh of tp × dp devices of `platform` ("cpu", "gpu", ...); None for 1 × 1."""
    if tp == 1 and dp == 1:
        return None
    available = jax.devices(platform)
    check(config, tp=tp, dp=dp, devices=len(available), what="target")
    return make_mesh(tp, dp, available)


def make_mesh(tp: int = 1, dp: int = 1, devices=None) -> Mesh:
    """A ("data", "model") mesh of dp × tp devices (the first ones of `devices`)."""
    devices = list(devices if devices is not None else jax.devices())[: dp * tp]
    grid = np.asarray(devices, dtype=object).reshape(dp, tp)
    return Mesh(grid, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))


def param_shardings(params, mesh: Mesh):
    """The NamedSharding of every leaf of a params pytree, by leaf name (PARAM_SPECS)."""
    def spec(path, leaf):
        name = getattr(path[-1], "key", None)
        return NamedSharding(mesh, PARAM_SPECS.get(name, P()))

    return jax.tree_util.tree_map_with_path(spec, params)


def shard_params(params, mesh: Mesh):
    """params placed on the mesh, each shard on its device."""
    return put(params, param_shardings(params, mesh))


def put(tree, shardings):
    """jax.device_put(tree, shardings) (one sharding, or a tree of them), also when they span
    several processes: then every process holds the same host values and supplies its own
    devices' parts (from_host)."""
    if all(s.is_fully_addressable for s in jax.tree.leaves(shardings)):
        return jax.device_put(tree, shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(from_host, tree, shardings)


def from_host(x, split: NamedSharding) -> jax.Array:
    """A host array (the same values in every process) as a global array split by `split`,
    which may span several processes: each process supplies its own devices' parts. A global
    array already (e.g. restored by Orbax) is only resharded where it differs."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x if x.sharding == split else jax.device_put(x, split)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, split, lambda index: x[index])


def to_host(tree):
    """The tree with every array that spans several processes gathered, so that each process
    can read its values (numpy); other leaves unchanged."""
    from jax.experimental import multihost_utils

    def readable(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return x

    return jax.tree.map(readable, tree)


def rows(mesh: Mesh) -> NamedSharding:
    """Batch-major arrays ([B, ...]) split over "data"."""
    return NamedSharding(mesh, ROWS_SPEC)


def cache(mesh: Mesh) -> NamedSharding:
    """KV cache arrays [L, B, K, ., .]: rows over "data", key/value heads over "model"."""
    return NamedSharding(mesh, CACHE_SPEC)


def constrain_cache(kv, mesh: Mesh):
    """A KVCache (inside jit) pinned to the cache layout on the mesh."""
    split = cache(mesh)
    return kv.replace(k=jax.lax.with_sharding_constraint(kv.k, split),
                      v=jax.lax.with_sharding_constraint(kv.v, split))


def shard_model(model, mesh: Mesh):
    """`model` with its params on the mesh: split by PARAM_SPECS where its shapes allow (see
    check), else replicated (e.g. a draft with fewer key/value heads than tp). Carries `mesh`."""
    import dataclasses

    if getattr(model, "mesh", None) == mesh:
        return model
    tp = mesh.shape[MODEL]
    try:
        check(model.config, tp=tp, dp=1, devices=tp)
        params = shard_params(model.params, mesh)
    except UserError:
        params = put(model.params, NamedSharding(mesh, P()))
    return dataclasses.replace(model, params=params, mesh=mesh)
