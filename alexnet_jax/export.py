"""Export a checkpoint as one serialized StableHLO function: python -m alexnet_jax.export --workdir=DIR
--out=FILE [--checkpoint=STEP] [--batch=N] [--platforms=cpu,cuda,tpu]

FILE holds `jax.export`'s serialization of  images -> probabilities:
  in   uint8 (batch, H, W, 3) RGB, H = W = the checkpoint's data.image_size, already resized and centre-cropped
       the way predict does it (short side to data.resize_size, bilinear, then the central square);
  out  float32 (batch, model.num_classes) softmax probabilities, one per model output (the checkpoint may name
       fewer classes than that: class_names[i] names output i while i < len(class_names)).
Normalisation (ImageNet mean/std) happens inside, and the params are baked in as constants, so FILE is all a
consumer needs, with plain JAX plus the `flatbuffers` package (jax's serializer, which jax does not install)
and without this package:

    from jax import export
    probs = export.deserialize(open(FILE, "rb").read()).call(images_uint8)

The batch dimension is symbolic by default (any batch size); --batch=N fixes it. FILE.json beside it gives, as
numbers, the input shape and layout, the preprocessing (resize_short_side, crop_size), the normalisation (mean,
std), the output shape, the class names and where the weights came from. FILE may be a gs:// URL.
"""

import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
from absl import app, flags
from etils import epath

from alexnet_jax import checkpointing, cli, inference, metrics, storage
from alexnet_jax.data import transforms

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Called only when run as a command: importing this module defines no flags (see predict.define_flags)."""
    flags.DEFINE_string("workdir", None, "Training directory (its checkpoints/ are read).")
    flags.DEFINE_string("out", None, "File to write the serialized function to; FILE.json gets the description.")
    flags.DEFINE_integer("checkpoint", None, "Checkpoint step to export; default: the newest.")
    flags.DEFINE_integer("batch", None, "Fixed batch size; default: symbolic (any batch size).")
    flags.DEFINE_list("platforms", ["cpu", "cuda", "tpu"], "Platforms the exported function can run on.")
    cli.define_weights_flag()
    flags.mark_flags_as_required(["workdir", "out"])


EXIT_BAD_USAGE = cli.EXIT_BAD_USAGE
# jax.export lowers for any of these from any machine; it does not reject a misspelt name itself.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def export_model(config, model_vars: dict, *, batch: int | None = None, platforms=("cpu",)) -> jax.export.Exported:
    """uint8 NHWC images -> probabilities, with `model_vars` baked in as constants.

    It reuses inference.probabilities_fn, so the exported program is the same computation predict runs.
    """
    size = int(config.data.image_size)
    probabilities = inference.probabilities_fn(config)
    # Host numpy values become constants of the program, independent of the devices the checkpoint loaded onto.
    constants = jax.device_get(model_vars)
    batch_dim = jax.export.symbolic_shape("b")[0] if batch is None else int(batch)
    images = jax.ShapeDtypeStruct((batch_dim, size, size, 3), jnp.uint8)
    return jax.export.export(jax.jit(lambda x: probabilities(constants, x)), platforms=tuple(platforms))(images)


def _dim(d):
    return d if isinstance(d, int) else str(d)  # a symbolic batch dimension is written by name, e.g. "b"


def describe(config, class_names, step: int, exported: jax.export.Exported, workdir: str) -> dict:
    """FILE.json: everything a consumer needs to feed the function and read its output, as numbers."""
    size, resize = int(config.data.image_size), int(config.data.resize_size)
    num_outputs = int(exported.out_avals[0].shape[-1])
    return {
        "format": "jax.export serialized (StableHLO); load with jax.export.deserialize(bytes).call(images) "
                  "(needs the flatbuffers package)",
        "jax_version": jax.__version__,
        "platforms": list(exported.platforms),
        "input": {"shape": [_dim(d) for d in exported.in_avals[0].shape], "dtype": str(exported.in_avals[0].dtype),
                  "layout": "NHWC", "channel_order": "RGB", "value_range": [0, 255]},
        # The eval view, done by the caller: upright RGB, short side to resize_short_side (bilinear), then the
        # central crop_size square. Normalisation is inside the function.
        "preprocessing": {"resize_short_side": resize, "resample": "bilinear", "crop": "center", "crop_size": size},
        "normalization": {"applied_inside": True, "mean_rgb": list(transforms.MEAN_RGB),
                          "std_rgb": list(transforms.STDDEV_RGB),
                          "note": "(pixel - mean) / std per channel, in 0..255 units; pass raw uint8 pixels"},
        "output": {"shape": [_dim(d) for d in exported.out_avals[0].shape],
                   "dtype": str(exported.out_avals[0].dtype), "meaning": "softmax probabilities",
                   "num_outputs": num_outputs, "named_outputs": min(len(class_names), num_outputs)},
        # class_names[i] names output i; outputs past the end of the list have no name (a head with more outputs
        # than the training data had classes).
        "class_names": list(class_names),
        "model": config.model.to_dict(),
        "checkpoint": {"workdir": storage.absolute(workdir), "step": int(step)},
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}", exitcode=2)
    metrics.quiet_library_logs()
    if FLAGS.batch is not None and FLAGS.batch < 1:
        print(f"error: --batch must be >= 1 (got {FLAGS.batch})", file=sys.stderr)
        return EXIT_BAD_USAGE
    if importlib.util.find_spec("flatbuffers") is None:  # jax's serializer, which jax itself does not install
        print("error: jax.export serialization needs flatbuffers: pip install flatbuffers",
              file=sys.stderr)
        return EXIT_BAD_USAGE
    unknown = [p for p in FLAGS.platforms if p not in PLATFORMS]
    if unknown or not FLAGS.platforms:
        print(f"error: --platforms must name some of {', '.join(PLATFORMS)} (got {','.join(FLAGS.platforms)})",
              file=sys.stderr)
        return EXIT_BAD_USAGE
    problem = storage.unwritable(FLAGS.out, "file")
    if problem:
        print(f"error: --out: {problem}", file=sys.stderr)
        return EXIT_BAD_USAGE
    try:
        config, class_names, model_vars, step = checkpointing.load_for_inference(FLAGS.workdir, FLAGS.checkpoint,
                                                                                 weights=FLAGS.weights)
    except (checkpointing.CheckpointNotFound, checkpointing.CheckpointUnreadable) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_USAGE
    exported = export_model(config, model_vars, batch=FLAGS.batch, platforms=FLAGS.platforms)
    epath.Path(storage.absolute(FLAGS.out)).parent.mkdir(parents=True, exist_ok=True)
    # A reader never sees half a file, and an interrupted export leaves the old one intact: locally written then
    # renamed; on gs:// one upload, which replaces the object only when complete.
    sidecar = json.dumps(describe(config, class_names, step, exported, FLAGS.workdir), indent=1) + "\n"
    serialized = exported.serialize()
    for path, content in ((FLAGS.out, serialized), (FLAGS.out + ".json", sidecar.encode())):
        if storage.is_remote(path):
            epath.Path(path).write_bytes(content)
            continue
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(content)
        os.replace(tmp, path)
    batch = "any" if FLAGS.batch is None else FLAGS.batch
    print(f"wrote {FLAGS.out} ({len(serialized) / 2**20:.1f} MiB; checkpoint {step}, batch {batch}, "
          f"{config.data.image_size} px, platforms {','.join(exported.platforms)}) and {FLAGS.out}.json")
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
