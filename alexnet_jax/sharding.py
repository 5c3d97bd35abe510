"""Where every array lives: the device mesh, parameter placement rules, and host batches -> global arrays.

The layout is the hybrid one of Krizhevsky 2014, "One weird trick for parallelizing convolutional neural
networks": the convolutions hold ~95% of AlexNet's arithmetic and the fully-connected layers ~95% of its
parameters, so

- the batch is split over *every* device (both mesh axes, `BATCH`): each convolution runs on
  batch / device_count examples per device whatever `mesh.model` is, and conv gradients are all-reduced once;
- before fc6 the activations are re-laid out (`classifier_layout`, applied by models.py) to be split over
  'data' only, so fc6/fc7 (and fc8 where its width divides) run model parallel over 'model' on their slice of
  the kernels, and their gradients are all-reduced over 'data' only: a 1/M share each.

With `mesh.model = 1` (the default) this is plain data parallelism. `mesh.shard_optimizer_state` additionally
splits momentum over 'data' (ZeRO-1).
"""

import collections
import math
import re

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"
# Leading (batch) axis over both mesh axes: every device holds distinct rows, so none repeats another's convs.
BATCH = P((DATA, MODEL))

# (regex over the '/'-joined parameter path -> PartitionSpec); the first match wins, no match means replicated.
# FC kernels are (in, out): split the output features. fc8 is split too where num_classes divides by the axis.
PARAM_RULES = (
    (r"^fc[678]/kernel$", P(None, MODEL)),
    (r"^fc[678]/bias$", P(MODEL)),
    (r"^bn[67]/(scale|bias|mean|var)$", P(MODEL)),
)
# Below this many elements a leaf's optimizer state stays whole: splitting a bias saves bytes nobody misses and
# costs a collective's latency on every step.
MIN_SHARDED_ELEMENTS = 1 << 14


def create_mesh(model_axis_size: int = 1, num_slices: int = 1, devices=None) -> Mesh:
    """A ('data', 'model') mesh laid out on the physical topology by jax's mesh_utils.

    'model' is the inner axis (the most traffic: activations every layer) so it lands on the closest devices;
    with `num_slices` > 1 (several TPU slices, or processes, joined over the data-centre network) only 'data'
    crosses slices, as it carries just one gradient all-reduce per step. Raises ValueError naming the key.
    """
    devices = list(jax.devices() if devices is None else devices)
    count = len(devices)
    if model_axis_size < 1 or count % model_axis_size:
        raise ValueError(f"mesh.model={model_axis_size} must divide the {count} devices")
    data = count // model_axis_size
    if num_slices < 1 or data % num_slices:
        raise ValueError(f"mesh.num_slices={num_slices} must divide the {data} data-parallel devices "
                         f"({count} devices / mesh.model={model_axis_size})")
    try:
        if num_slices == 1:
            grid = mesh_utils.create_device_mesh((data, model_axis_size), devices)
        else:
            # Multi-slice TPUs number their slices; elsewhere (GPU clusters, CPU) every device reports slice 0 or
            # none, and a process is the unit that talks to the others over the slower network.
            by_process = len({getattr(d, "slice_index", 0) for d in devices}) != num_slices
            grid = mesh_utils.create_hybrid_device_mesh(
                (data // num_slices, model_axis_size), (num_slices, 1), devices, process_is_granule=by_process)
    except (ValueError, NotImplementedError, AssertionError) as error:
        raise ValueError(f"mesh.model={model_axis_size}, mesh.num_slices={num_slices}: no {data}x"
                         f"{model_axis_size} mesh on these {count} devices: {error}") from None
    return Mesh(grid, (DATA, MODEL))


def mesh_for(config) -> Mesh:
    """The mesh a config asks for (`mesh.model`, `mesh.num_slices`) on this run's devices."""
    return create_mesh(int(config.mesh.model), int(config.mesh.get("num_slices", 1)))


def _divisible(spec: P, shape, mesh: Mesh) -> bool:
    def size(axis):
        names = axis if isinstance(axis, tuple) else (axis,)
        return math.prod(mesh.shape[name] for name in names)

    return all(axis is None or dim % size(axis) == 0 for dim, axis in zip(shape, spec))


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The PartitionSpec for one parameter, falling back to replication where the axis does not divide it."""
    for pattern, spec in PARAM_RULES:
        if re.search(pattern, path):
            return spec if _divisible(spec, shape, mesh) else P()
    return P()


def with_data_axis(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """`spec` with its largest still-whole dimension that divides by the 'data' axis split over 'data' too.

    ZeRO-1: each data-parallel replica then keeps and updates only its 1/D of a leaf's optimizer state, and XLA
    gathers the updated parameters back (a memory saving: `summary` shows what it costs in collectives).
    """
    data = mesh.shape[DATA]
    if data == 1 or math.prod(shape) < MIN_SHARDED_ELEMENTS:
        return spec
    axes = list(spec) + [None] * (len(shape) - len(spec))
    whole = [i for i, (dim, axis) in enumerate(zip(shape, axes)) if axis is None and dim % data == 0]
    if not whole:
        return spec
    axes[max(whole, key=lambda i: shape[i])] = DATA
    return P(*axes)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def tree_shardings(tree, mesh: Mesh, *, over_data: bool = False):
    """NamedShardings for a pytree of arrays whose paths end like parameter paths (also optimizer state).

    over_data=True also splits each large leaf over 'data' (`with_data_axis`), for optimizer state."""

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        if not shape:
            return NamedSharding(mesh, P())
        # Optimizer state nests params under its own keys (e.g. .../trace/fc6/kernel): match on the tail.
        parts = _path_str(path).split("/")
        spec = spec_for("/".join(parts[-2:]), shape, mesh)
        return NamedSharding(mesh, with_data_axis(spec, shape, mesh) if over_data else spec)

    return jax.tree_util.tree_map_with_path(one, tree)


def train_state_shardings(state, mesh: Mesh, *, shard_optimizer_state: bool = False):
    """Shardings for a TrainState: params and BatchNorm statistics by PARAM_RULES, optimizer state likewise or
    (shard_optimizer_state) also split over 'data'."""
    shardings = tree_shardings(state, mesh)
    if shard_optimizer_state:
        shardings = shardings.replace(opt_state=tree_shardings(state.opt_state, mesh, over_data=True))
    return shardings


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over all devices, 'data' major: device (d, m) holds row block d * M + m."""
    return NamedSharding(mesh, BATCH)


def classifier_layout(mesh: Mesh, num_classes: int) -> tuple[NamedSharding, ...]:
    """Shardings models.fc_layout pins the classifier's activations to: (fc6 input, fc6/fc7 outputs, fc8
    output, logits).

    The flattened features are split over 'data' and whole within each 'model' group: the group gathers its M
    row blocks (batch/D rows of 9,216 features, small next to fc6's kernel) and each member multiplies them by
    its own 1/M of the columns, giving rows over 'data' and features over 'model'. fc8's output is laid out the
    same where num_classes divides by the 'model' axis (else whole), and the logits go back to the batch
    layout for the loss. Pinned activations (and gradients, by transposition) keep XLA from moving weights."""
    split = NamedSharding(mesh, P(DATA, MODEL))
    whole = NamedSharding(mesh, P(DATA, None))
    return whole, split, split if num_classes % mesh.shape[MODEL] == 0 else whole, batch_sharding(mesh)


def host_to_global(local_batch: dict, mesh: Mesh) -> dict:
    """This process's slice of the global batch (numpy) -> global jax.Arrays sharded over all devices.

    Each process passes only the rows it loaded (its own 1/P of the global batch); JAX stitches them into one
    logical array without any cross-host copy. Every device holds distinct rows, so a process's devices need
    exactly its local rows, whichever mesh axes they span: the local rows fill, in order, the row blocks its
    devices hold (on jax.devices()' process-major order, block p of the global batch: the rows the pipeline
    gave process p). A mesh that interleaves processes only permutes rows within the global batch, which the
    mean loss does not see.
    """
    sharding = batch_sharding(mesh)
    if mesh.devices.flat[0].platform == "cpu":
        # A CPU jax.Array made from a numpy array may be that array's own memory; with grain workers, a shared-
        # memory block, which then lives as long as XLA holds the array and is released on XLA's threads, maybe
        # after the pipeline's close has waited for its blocks (reported as leaked at exit). A copy ends the
        # block's life with the local batch; on accelerators the transfer is that copy.
        local_batch = {k: np.array(v) for k, v in local_batch.items()}
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


class DevicePrefetch:
    """Global batches from an iterator of local ones, the next `size` already on their way to the devices.

    `jax.make_array_from_process_local_data` only issues the host-to-device copies, so holding `size` batches
    that have been handed to it means their transfers run while the current step computes, instead of the step
    waiting for its input to cross PCIe (or the network to a TPU host's chips) after the previous one. size 0:
    each batch is put on the devices when asked for. `close()` closes the underlying iterator."""

    def __init__(self, local_batches, mesh: Mesh, size: int = 2):
        self._local, self._mesh, self._size = local_batches, mesh, size
        self._queue = collections.deque()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while len(self._queue) <= self._size:
            try:
                self._queue.append(host_to_global(next(self._local), self._mesh))
            except StopIteration:
                break
        if not self._queue:
            raise StopIteration
        return self._queue.popleft()

    def close(self) -> None:
        self._queue.clear()
        self._local.close()


def with_fc_layout(fn, mesh: Mesh, num_classes: int):
    """`fn` (a functools.partial), traced with the model's classifier laid out for the mesh (classifier_layout)."""
    from alexnet_jax import models  # local: models is the heavier import, and only tracing needs it

    layout = classifier_layout(mesh, num_classes)

    def traced(*args):
        with models.fc_layout(*layout):
            return fn(*args)

    traced.__name__ = traced.__qualname__ = fn.func.__name__  # what profiles and HLO dumps call it
    return traced


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a pytree of arrays or ShapeDtypeStructs with shardings (the largest share)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.shape else ()
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total
