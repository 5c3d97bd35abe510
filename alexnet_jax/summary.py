"""Per-layer table of AlexNet: output shape, parameters and multiply-accumulates.

    python -m alexnet_jax.summary --config=configs/imagenet.py [--config.model.width=0.25] [--json]

Everything is read off the real model traced abstractly (``nnx.eval_shape``), so the table cannot drift from
models.py and costs no memory or compute even at width 1: no weight is ever allocated.
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

from alexnet_jax import cli, models

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
    if _JSON.value:
        print(json.dumps(summary))


if __name__ == "__main__":
    cli.run(main)
