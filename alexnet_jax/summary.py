"""Per-layer table of AlexNet (output shape, parameters, multiply-accumulates) and how a train step is split.

    python -m alexnet_jax.summary --config=configs/imagenet.py [--config.model.width=0.25] [--json]

Everything is read off the real model traced abstractly (``nnx.eval_shape``), so the table cannot drift from
models.py and costs no memory or compute even at width 1: no weight is ever allocated.

With a full training config (one with ``mesh``, ``optim`` and ``batch_size``) it also compiles -- never runs --
the train step on this machine's devices and reports its parallelism: the mesh, how many images each device's
convolutions see, the bytes of parameters and optimizer state each device holds, and the collectives in the
compiled program. Simulate N devices on a CPU with XLA_FLAGS=--xla_force_host_platform_device_count=N.
"""

from __future__ import annotations

import json
import math
import re
import sys

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from alexnet_jax import cli, models, sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
_JSON = flags.DEFINE_bool("json", False, "Also print the table as one JSON object on the last stdout line.")

DEFAULT_IMAGE_SIZE = 224
MIN_IMAGE_SIZE = 64


def _size(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _macs(module: nnx.Module, output_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates per image of one layer, from its output shape and its own hyperparameters.

    Each output element of a convolution reads kernel_h * kernel_w * in_channels / groups inputs, which is how a
    grouped convolution gets its lower count. BatchNorm has no multiply-accumulates worth counting: at inference
    it folds into the preceding layer, and the usual convention (torchvision's GFLOPS included) leaves it out.
    """
    if isinstance(module, nnx.Conv):
        inputs_per_output = math.prod(module.kernel_size) * module.in_features // module.feature_group_count
        return math.prod(output_shape) * inputs_per_output
    if isinstance(module, nnx.Linear):
        return math.prod(output_shape) * module.in_features
    return 0


def _paper_order(name: str):
    """Sort key for rows: by the paper's layer number in the name, each conv/fc before its own norm.

    NNX keeps a module's attributes sorted by name, so definition order is lost; the numbered names (a contract
    of models.py) carry the order instead. Unnumbered names go last.
    """
    match = re.fullmatch(r"([a-z_]+?)(\d+)", name)
    if match is None:
        return (math.inf, 1, name)
    return (int(match.group(2)), match.group(1).startswith("bn"), name)


def _trace(model_config, image_size: int) -> tuple[list[dict], int]:
    """(rows, total parameter count) of the model, traced without allocating anything."""
    # Eval mode: dropout then needs no key, and BatchNorm's shapes are the same either way.
    model = nnx.eval_shape(lambda: models.create_model(model_config, rngs=nnx.Rngs(0)))
    model.eval()
    image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)

    def forward(model, image):
        # method_outputs records every submodule's __call__ output under that submodule's path, so the model
        # carries no summary-specific code.
        return nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(image)

    _, outputs = nnx.eval_shape(forward, model, image)

    rows = []
    for name, layer in sorted(nnx.iter_children(model), key=lambda child: _paper_order(child[0])):
        params = _size(nnx.state(layer, nnx.Param))
        if params == 0:
            continue  # dropout: no weights, no arithmetic, shape unchanged
        (output,) = outputs[name]["__call__"].get_value()  # each parameterised layer runs exactly once
        output_shape = tuple(output.shape[1:])
        rows.append(
            {"name": name, "output_shape": list(output_shape), "params": params, "macs": _macs(layer, output_shape)}
        )
    return rows, _size(nnx.state(model, nnx.Param))


def layer_table(model_config, image_size: int = DEFAULT_IMAGE_SIZE) -> list[dict]:
    """One dict per parameterised layer in forward order: name, output_shape (per image, HWC or features),
    params, macs (per image)."""
    rows, _ = _trace(model_config, image_size)
    return rows


def summarize(model_config, image_size: int = DEFAULT_IMAGE_SIZE) -> dict:
    """The ``--json`` object: layers, totals, image size and variant."""
    rows, total_params = _trace(model_config, image_size)
    return {
        "layers": rows,
        "total_params": total_params,
        "total_macs": sum(row["macs"] for row in rows),
        "image_size": image_size,
        "variant": model_config.variant,
    }


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# `%name = <result type> <op>(` in HLO text; async pairs count once, at their -done (the result that lands).
_COLLECTIVE_RE = re.compile(r"=\s*(?P<type>.+?)\s(?P<op>" + "|".join(COLLECTIVES) + r")(?P<phase>-start|-done)?\(")
_ARRAY_RE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
# A forward convolution (the backward ones sit under transpose(...)) whose output labels start with the batch.
_CONV_RE = re.compile(r"=\s*[a-z]+\d*\[(\d+)[\d,]*\]\S*\s+convolution\(.*dim_labels=\w+->b"
                      r".*op_name=\"(?![^\"]*transpose\()[^\"]*conv_general_dilated\"")
_HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f16": 2, "bf16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
              "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def _hlo_result_bytes(result_type: str) -> int:
    return sum(_HLO_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _ARRAY_RE.findall(result_type))


def collectives(hlo_text: str) -> tuple[dict, int]:
    """({kind: count}, total result bytes) of the collectives in a compiled (per-device) HLO module.

    Counts each op once as written: one inside a loop body (e.g. a scan over micro-batches) runs once per
    iteration but is counted once here."""
    counts, total = dict.fromkeys(COLLECTIVES, 0), 0
    for match in _COLLECTIVE_RE.finditer(hlo_text):
        if match["phase"] == "-start":
            continue
        counts[match["op"]] += 1
        total += _hlo_result_bytes(match["type"])
    return counts, total


def conv_batch_per_device(hlo_text: str) -> int | None:
    """The batch each device's convolutions run on, from the compiled program (None where the backend lowered
    them to custom calls, e.g. cuDNN)."""
    batches = {int(match[1]) for match in map(_CONV_RE.search, hlo_text.splitlines()) if match}
    return max(batches) if batches else None


def parallelism(config) -> dict:
    """The train step compiled (not run) for this config on this machine's devices, and what it moves."""
    from alexnet_jax import optim, train  # local: the plain layer table needs neither

    mesh = sharding.mesh_for(config)
    # The schedule's numbers do not change the program, only its constants: any positive lengths do.
    learning_rate_fn = optim.create_learning_rate_fn(config.optim, 1000, 1000)
    tx = train.create_optimizer(config.optim, learning_rate_fn)
    state = train.abstract_train_state(config, mesh, tx)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    step_fn, _ = train.compile_steps(config, mesh, tx, learning_rate_fn, state_shardings)
    size, batch = int(config.data.image_size), sharding.batch_sharding(mesh)
    batch_shapes = {
        "image": jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.uint8, sharding=batch),
        "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=batch)}
    hlo = step_fn.lower(state, batch_shapes).compile().as_text()
    counts, collective_bytes = collectives(hlo)
    return {
        "devices": int(mesh.size),
        "mesh": {name: int(n) for name, n in mesh.shape.items()},
        "shard_optimizer_state": bool(config.mesh.get("shard_optimizer_state", False)),
        "global_batch": int(config.batch_size),
        "conv_batch_per_device": conv_batch_per_device(hlo),
        "param_bytes_per_device": sharding.bytes_per_device(state.params),
        "opt_state_bytes_per_device": sharding.bytes_per_device(state.opt_state),
        "collective_bytes_per_step": collective_bytes,
        "collectives": counts,
    }


def format_parallelism(report: dict) -> str:
    mesh = " x ".join(f"{name} {n}" for name, n in report["mesh"].items())
    counts = ", ".join(f"{kind} {n}" for kind, n in report["collectives"].items() if n) or "none"
    return "\n".join([
        f"Train step on {report['devices']} device(s), mesh {mesh}, global batch {report['global_batch']}"
        f"{', optimizer state sharded over data' if report['shard_optimizer_state'] else ''}:",
        f"  conv batch per device      {report['conv_batch_per_device']}",
        f"  params per device          {report['param_bytes_per_device'] / 1e6:,.1f} MB",
        f"  optimizer state per device {report['opt_state_bytes_per_device'] / 1e6:,.1f} MB",
        f"  collectives per step       {report['collective_bytes_per_step'] / 1e6:,.1f} MB ({counts})",
    ])


def format_table(summary: dict) -> str:
    header = ("layer", "output shape", "params", "MACs")
    lines = [
        (row["name"], "x".join(map(str, row["output_shape"])), f"{row['params']:,}", f"{row['macs']:,}")
        for row in summary["layers"]
    ]
    total = ("total", "", f"{summary['total_params']:,}", f"{summary['total_macs']:,}")
    widths = [max(len(line[i]) for line in [header, *lines, total]) for i in range(len(header))]

    def fmt(line):
        name, shape, params, macs = line
        return (
            f"{name:<{widths[0]}}  {shape:<{widths[1]}}  {params:>{widths[2]}}  {macs:>{widths[3]}}"
        )

    rule = "-" * len(fmt(header))
    title = (
        f"AlexNet variant={summary['variant']} image_size={summary['image_size']} "
        f"(MACs per image: {summary['total_macs'] / 1e6:,.1f} M)"
    )
    return "\n".join([title, fmt(header), rule, *map(fmt, lines), rule, fmt(total)])


def _image_size(config) -> int:
    data = config.get("data") or {}
    return int(data.get("image_size", DEFAULT_IMAGE_SIZE))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        print("--config is required", file=sys.stderr)
        sys.exit(2)
    image_size = _image_size(config)
    if image_size < MIN_IMAGE_SIZE:
        print(f"data.image_size={image_size} is below the model's minimum of {MIN_IMAGE_SIZE}", file=sys.stderr)
        sys.exit(2)
    try:
        summary = summarize(config.model, image_size)
    except ValueError as error:  # models.py names the offending config key in its message
        print(error, file=sys.stderr)
        sys.exit(2)
    print(format_table(summary))
    if all(key in config for key in ("mesh", "optim", "batch_size")):
        from alexnet_jax import config as config_lib

        checked = config.copy_and_resolve_references()
        checked.data.source = "synthetic"  # nothing is read: data paths need not exist where this runs
        try:
            config_lib.validate(checked, jax.device_count(), jax.process_count())
            summary["parallelism"] = parallelism(config)
        except ValueError as error:  # ConfigError is one; so is a mesh the devices cannot form
            print(f"error: config: {error}", file=sys.stderr)
            sys.exit(2)
        print(format_parallelism(summary["parallelism"]))
    if _JSON.value:
        print(json.dumps(summary))


if __name__ == "__main__":
    cli.run(main)
