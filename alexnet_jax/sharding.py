"""Where every array lives: the device mesh, parameter placement rules, and host batches -> global arrays.

The mesh has two axes. 'data' splits the batch; 'model' splits the large fully-connected layers (fc6 alone is
38M of AlexNet's 61M parameters), which is how the 2014 "one weird trick" paper parallelised AlexNet: data
parallel convolutions, model parallel classifier. With `mesh.model = 1` (the default) everything but the batch is
replicated and the program is plain data parallelism.
"""

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# (regex over the '/'-joined parameter path -> PartitionSpec); the first match wins, no match means replicated.
# FC kernels are (in, out): split the output features, so fc6->fc7->fc8 need one all-gather per layer.
PARAM_RULES = (
    (r"^fc[67]/kernel$", P(None, "model")),
    (r"^fc[67]/bias$", P("model")),
    (r"^bn[67]/(scale|bias|mean|var)$", P("model")),
)


def create_mesh(model_axis_size: int = 1, devices=None) -> Mesh:
    devices = np.asarray(jax.devices() if devices is None else devices)
    if devices.size % model_axis_size:
        raise ValueError(f"mesh.model={model_axis_size} does not divide {devices.size} devices")
    return Mesh(devices.reshape(-1, model_axis_size), ("data", "model"))


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The PartitionSpec for one parameter, falling back to replication where the axis does not divide it."""
    for pattern, spec in PARAM_RULES:
        if re.search(pattern, path):
            divisible = all(axis is None or dim % mesh.shape[axis] == 0 for dim, axis in zip(shape, spec))
            return spec if divisible else P()
    return P()


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def tree_shardings(tree, mesh: Mesh):
    """NamedShardings for a pytree of arrays whose paths end like parameter paths (also optimizer state)."""

    def one(path, leaf):
        shape = getattr(leaf, "shape", ())
        # Optimizer state nests params under its own keys (e.g. .../trace/fc6/kernel): match on the tail.
        parts = _path_str(path).split("/")
        tail = "/".join(parts[-2:]) if len(parts) >= 2 else parts[-1]
        return NamedSharding(mesh, spec_for(tail, shape, mesh) if len(shape) else P())

    return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over 'data'; every 'model' slice of a data shard sees the same examples."""
    return NamedSharding(mesh, P("data"))


def host_to_global(local_batch: dict, mesh: Mesh) -> dict:
    """This process's slice of the global batch (numpy) -> global jax.Arrays sharded over 'data'.

    Each process passes only the rows it loaded; JAX stitches them into one logical array without any
    cross-host copy. The leading dimension of the result is local_rows * process_count.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
