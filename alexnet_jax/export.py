"""Export a checkpoint for other runtimes: python -m alexnet_jax.export --workdir=DIR --out=FILE
[--format=stablehlo|onnx|torchvision] [--checkpoint=STEP] [--batch=N] [--platforms=cpu,cuda,tpu]

--format=stablehlo (the default): FILE holds `jax.export`'s serialization of  images -> probabilities:
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

--format=onnx: FILE is an ONNX model of the same function (same input, same output, batch dimension "b"
unless --batch), converted by jax2onnx; the description above is in the model's metadata_props (JSON values),
class names included. Runs in onnxruntime, nothing else needed.

--format=torchvision: FILE is a state dict that torchvision.models.alexnet(num_classes=N) loads with
strict=True (torch.save'd tensors, for torch.load(FILE, weights_only=True)); it takes normalised NCHW floats and
returns logits, like every torchvision model. Only owt models at width 1 with ReLU fit that module. FILE.json
gives the class names and the same preprocessing description.

Every format takes its preprocessing description from data.transforms.eval_preprocessing. A format whose
converter package is missing, or that cannot represent the checkpoint's model, is refused with one line (exit 2)
before anything is written.
"""

import importlib.util
import io
import json
import logging
import os
import sys

import jax
import jax.numpy as jnp
from absl import app, flags
from absl import logging as absl_logging
from etils import epath

from alexnet_jax import checkpointing, cli, inference, interop, metrics, storage
from alexnet_jax.data import transforms

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Called only when run as a command: importing this module defines no flags (see predict.define_flags)."""
    flags.DEFINE_string("workdir", None, "Training directory (its checkpoints/ are read).")
    flags.DEFINE_string("out", None, "File to write; FILE.json gets the description (stablehlo, torchvision).")
    flags.DEFINE_string("format", "stablehlo", f"What to write: one of {', '.join(FORMATS)}.")
    flags.DEFINE_integer("checkpoint", None, "Checkpoint step to export; default: the newest.")
    flags.DEFINE_integer("batch", None, "Fixed batch size (stablehlo, onnx); default: symbolic (any batch size).")
    flags.DEFINE_list("platforms", ["cpu", "cuda", "tpu"], "Platforms the exported function can run on (stablehlo).")
    cli.define_weights_flag()
    flags.mark_flags_as_required(["workdir", "out"])


EXIT_BAD_USAGE = cli.EXIT_BAD_USAGE
# jax.export lowers for any of these from any machine; it does not reject a misspelt name itself.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
FORMATS = ("stablehlo", "onnx", "torchvision")
# jax2onnx's own metadata pins orbax-checkpoint below the version this package is tested with and pulls in
# equinox, huggingface_hub and netron, none of which its converter core imports: the [onnx] extra holds what it
# does need (onnx, onnx-ir, and onnxruntime to run the result), and jax2onnx goes in without its pins.
JAX2ONNX = "jax2onnx>=0.17.1,<0.18"
# format -> (modules it needs to write FILE, the install line that provides them)
REQUIREMENTS = {
    "stablehlo": (("flatbuffers",), "pip install flatbuffers"),  # jax's serializer, which jax does not install
    "onnx": (("onnx", "onnx_ir", "jax2onnx"),
             f"pip install 'alexnet_jax[onnx]' && pip install --no-deps '{JAX2ONNX}'"),
    "torchvision": (("torch",), "pip install 'alexnet_jax[torch]'"),
}
ONNX_OPSET = 21  # onnxruntime >= 1.16, and what TensorRT 10 and OpenVINO 2024 read


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
        **transforms.eval_preprocessing(size, resize, normalization_inside=True),
        "output": {"shape": [_dim(d) for d in exported.out_avals[0].shape],
                   "dtype": str(exported.out_avals[0].dtype), "meaning": "softmax probabilities",
                   "num_outputs": num_outputs, "named_outputs": min(len(class_names), num_outputs)},
        # class_names[i] names output i; outputs past the end of the list have no name (a head with more outputs
        # than the training data had classes).
        "class_names": list(class_names),
        "model": config.model.to_dict(),
        "checkpoint": {"workdir": storage.absolute(workdir), "step": int(step)},
    }


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # sys.modules[module] is None: an import of it is blocked
        return False


def _missing_requirement(fmt: str) -> str | None:
    modules, install = REQUIREMENTS[fmt]
    missing = [m for m in modules if not _importable(m)]
    return f"--format={fmt} needs {', '.join(missing)}: {install}" if missing else None


def export_onnx(config, class_names, model_vars, step: int, workdir: str, *, batch: int | None = None):
    """The StableHLO export's function (uint8 NHWC -> probabilities) as an onnx.ModelProto, described in its
    metadata_props."""
    # Imported here: only this format needs it. Its plugin discovery logs a traceback for each optional
    # framework it finds missing (equinox, dm_pix: irrelevant to a Flax model), and it and onnx_ir log a dozen
    # progress lines and warnings about values it leaves untyped on purpose, none of them ours to act on.
    absl_logging.get_absl_handler().python_handler.addFilter(
        lambda record: record.levelno >= logging.ERROR or not any(
            part in record.pathname for part in ("/jax2onnx/", "/onnx_ir/")))
    logging.getLogger("jax2onnx").setLevel(logging.ERROR)
    import jax2onnx

    described = config
    config = config.copy_and_resolve_references()
    # float32 whatever "auto" picks on this machine (bfloat16 on a GPU: few ONNX runtimes run it well), and
    # conv1 as the plain convolution with the same kernel, which every runtime has a fast kernel for.
    config.model.dtype = "float32"
    config.model.space_to_depth = False
    size = int(config.data.image_size)
    probabilities = inference.probabilities_fn(config)
    constants = jax.device_get(model_vars)
    images = jax.ShapeDtypeStruct(("b" if batch is None else int(batch), size, size, 3), jnp.uint8)
    model = jax2onnx.to_onnx(lambda x: probabilities(constants, x), [images], model_name="alexnet_jax",
                             opset=ONNX_OPSET, input_names=["images"], output_names=["probabilities"])
    # Intermediate shapes as jax2onnx stamps them are partly in NHWC order on NCHW tensors (onnxruntime warns
    # and ignores them); every runtime infers them itself from the inputs.
    del model.graph.value_info[:]
    num_outputs = int(config.model.num_classes)
    batch_dim = "b" if batch is None else int(batch)
    description = {
        "input": {"name": "images", "shape": [batch_dim, size, size, 3], "dtype": "uint8", "layout": "NHWC",
                  "channel_order": "RGB", "value_range": [0, 255]},
        **transforms.eval_preprocessing(size, int(config.data.resize_size), normalization_inside=True),
        "output": {"name": "probabilities", "shape": [batch_dim, num_outputs], "dtype": "float32",
                   "meaning": "softmax probabilities", "num_outputs": num_outputs,
                   "named_outputs": min(len(class_names), num_outputs)},
        "class_names": list(class_names),
        "model": described.model.to_dict(),
        "checkpoint": {"workdir": storage.absolute(workdir), "step": int(step)},
    }
    for key, value in description.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    return model


def export_torchvision(config, class_names, model_vars, step: int, workdir: str) -> tuple[bytes, dict]:
    """(torch.save'd state dict, its FILE.json) for torchvision.models.alexnet(num_classes=N). The caller has
    checked interop.torchvision_incompatibility."""
    import torch

    state_dict = interop.to_torchvision_state_dict(model_vars["params"])
    buffer = io.BytesIO()
    torch.save({key: torch.from_numpy(value) for key, value in state_dict.items()}, buffer)
    size, num_classes = int(config.data.image_size), int(config.model.num_classes)
    sidecar = {
        "format": f"torchvision.models.alexnet(num_classes={num_classes}).load_state_dict("
                  "torch.load(FILE, weights_only=True))",
        "input": {"shape": ["b", 3, size, size], "dtype": "float32", "layout": "NCHW", "channel_order": "RGB"},
        **transforms.eval_preprocessing(size, int(config.data.resize_size), normalization_inside=False),
        "output": {"shape": ["b", num_classes], "meaning": "logits (softmax them for probabilities)",
                   "num_outputs": num_classes, "named_outputs": min(len(class_names), num_classes)},
        "class_names": list(class_names),
        "model": config.model.to_dict(),
        "checkpoint": {"workdir": storage.absolute(workdir), "step": int(step)},
    }
    return buffer.getvalue(), sidecar


def _write(path: str, content: bytes) -> None:
    # A reader never sees half a file, and an interrupted export leaves the old one intact: locally written then
    # renamed; on gs:// one upload, which replaces the object only when complete.
    if storage.is_remote(path):
        epath.Path(path).write_bytes(content)
        return
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(content)
    os.replace(tmp, path)


def _sidecar_bytes(description: dict) -> bytes:
    return (json.dumps(description, indent=1) + "\n").encode()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}", exitcode=2)
    metrics.quiet_library_logs()
    fmt = FLAGS.format
    if fmt not in FORMATS:
        print(f"error: --format={fmt!r} is not one of {', '.join(FORMATS)}", file=sys.stderr)
        return EXIT_BAD_USAGE
    if FLAGS.batch is not None and FLAGS.batch < 1:
        print(f"error: --batch must be >= 1 (got {FLAGS.batch})", file=sys.stderr)
        return EXIT_BAD_USAGE
    if fmt == "torchvision" and FLAGS.batch is not None:
        print("error: --batch does not apply to --format=torchvision (a state dict has no batch size)",
              file=sys.stderr)
        return EXIT_BAD_USAGE
    if fmt != "stablehlo" and FLAGS["platforms"].present:
        print(f"error: --platforms applies to --format=stablehlo only, not {fmt}", file=sys.stderr)
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
    if fmt == "torchvision" and (why := interop.torchvision_incompatibility(config.model)):
        print(f"error: --format=torchvision cannot hold checkpoint {step} of {FLAGS.workdir}: {why}",
              file=sys.stderr)
        return EXIT_BAD_USAGE
    # After the model check: installing a converter would not help a model the format cannot represent.
    missing = _missing_requirement(fmt)
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return EXIT_BAD_USAGE

    batch = "any" if FLAGS.batch is None else FLAGS.batch
    if fmt == "stablehlo":
        exported = export_model(config, model_vars, batch=FLAGS.batch, platforms=FLAGS.platforms)
        files = {FLAGS.out: exported.serialize(),
                 FLAGS.out + ".json": _sidecar_bytes(describe(config, class_names, step, exported, FLAGS.workdir))}
        detail = f"batch {batch}, {config.data.image_size} px, platforms {','.join(exported.platforms)}"
    elif fmt == "onnx":
        model = export_onnx(config, class_names, model_vars, step, FLAGS.workdir, batch=FLAGS.batch)
        files = {FLAGS.out: model.SerializeToString()}
        detail = f"batch {batch}, {config.data.image_size} px, opset {ONNX_OPSET}"
    else:
        state_dict, sidecar = export_torchvision(config, class_names, model_vars, step, FLAGS.workdir)
        files = {FLAGS.out: state_dict, FLAGS.out + ".json": _sidecar_bytes(sidecar)}
        detail = f"torchvision.models.alexnet(num_classes={config.model.num_classes})"
    epath.Path(storage.absolute(FLAGS.out)).parent.mkdir(parents=True, exist_ok=True)
    for path, content in files.items():
        _write(path, content)
    extra = "".join(f" and {path}" for path in list(files)[1:])
    print(f"wrote {FLAGS.out} ({len(files[FLAGS.out]) / 2**20:.1f} MiB; checkpoint {step}, {detail}){extra}")
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
