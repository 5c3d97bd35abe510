"""Import torchvision AlexNet weights: python -m alexnet_jax.import_torchvision WEIGHTS.pth --out=DIR

Writes DIR/checkpoints/0/ (params, BatchNorm statistics -- none for ``owt`` -- and meta: a config and the class
names), which ``predict``, ``evaluate`` and ``export`` read like any trained checkpoint. There is no optimizer
state in it: it is an inference checkpoint (see checkpointing.save_for_inference).

torch is needed only here (``pip install 'alexnet_jax[torch]'``), and the file is read with
``torch.load(..., weights_only=True)``: a state dict of tensors, never arbitrary pickled objects.

The number of classes and the width are read off the weights (fc8's rows; conv1's 64 filters at width 1), so a
fine-tuned torchvision AlexNet with, say, 102 classes imports as it is; give --class_names=FILE (one per line) for
its names. Without it, a 1000-class model gets ImageNet's WordNet ids (torchvision's label order), which predict
shows with their words, and any other model gets placeholders class_0, class_1, ...
"""

import pickle
import sys

import jax
from absl import app, flags
from etils import epath
from flax import nnx

from alexnet_jax import checkpointing, cli, config as config_lib, interop, metrics, models, sharding, storage
from alexnet_jax.data import classes

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Called only when run as a command: importing this module defines no flags (see predict.define_flags)."""
    flags.DEFINE_string("out", None, "Directory to write; the checkpoint goes to OUT/checkpoints/0/.")
    flags.DEFINE_integer("num_classes", None, "Expected number of classes (default: read off classifier.6.weight).")
    flags.DEFINE_string("class_names", None, "Text file with one class name per line (default: ImageNet's wnids, "
                        "shown by predict with their words).")
    flags.DEFINE_integer("image_size", 224, "Eval crop size stored in the config (predict/evaluate use it).")
    flags.DEFINE_integer("resize_size", 256, "Eval short-side resize stored in the config.")
    flags.mark_flags_as_required(["out"])


EXIT_BAD_USAGE = cli.EXIT_BAD_USAGE


def read_class_names(path: str) -> list[str]:
    return [line.strip() for line in epath.Path(path).read_text().splitlines() if line.strip()]


def infer_layout(state_dict) -> tuple[float, int]:
    """(width, num_classes) of a torchvision-layout state dict; load_torchvision_state_dict checks the rest.

    Width scaling rounds every layer the same way (models.scaled_channels), so conv1's filter count pins it."""
    for key in ("features.0.weight", "classifier.6.weight"):
        if key not in state_dict:
            raise ValueError(f"state_dict is missing {key!r}: not a torchvision AlexNet state dict")
    conv1_filters = int(state_dict["features.0.weight"].shape[0])
    return conv1_filters / 64, int(state_dict["classifier.6.weight"].shape[0])


def import_state_dict(state_dict, out: str, *, num_classes: int | None = None, class_names=None,
                      image_size: int = 224, resize_size: int = 256, source: str = "") -> str:
    """torchvision-layout state dict -> an inference checkpoint in OUT/checkpoints/0. Returns its directory."""
    state_dict = interop.unwrap_state_dict(state_dict)
    width, found_classes = infer_layout(state_dict)
    if num_classes is not None and num_classes != found_classes:
        raise ValueError(f"--num_classes={num_classes} but state_dict['classifier.6.weight'] has "
                         f"{found_classes} rows")
    extra_meta = {"imported_from": storage.absolute(source) if source else "torchvision state dict"}
    if class_names is None and found_classes == 1000:
        # ImageNet's wnids in torchvision's label order: the names an ImageFolder-trained checkpoint stores too,
        # which predict shows with their words.
        class_names = classes.imagenet_wnids()
    elif class_names is None:
        class_names = [f"class_{i}" for i in range(found_classes)]
        extra_meta["note"] = "class names are placeholders: import again with --class_names=FILE"
    if len(class_names) != found_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {found_classes} classes")

    config = config_lib.base_config()
    config.model.variant = "owt"
    config.model.num_classes = found_classes
    config.model.width = width
    config.model.dtype = "float32"
    config.data.image_size = image_size
    config.data.resize_size = resize_size
    # Abstract model: every parameter is overwritten, so random initialisation (seconds at width 1) is skipped.
    model = nnx.eval_shape(lambda: models.create_model(config.model, rngs=nnx.Rngs(0)))
    interop.load_torchvision_state_dict(model, state_dict)
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    replicated = sharding.replicated(sharding.create_mesh(1))
    model_vars = jax.device_put({"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(batch_stats)},
                                replicated)
    return checkpointing.save_for_inference(out, model_vars, config, class_names, step=0, extra_meta=extra_meta)


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("give exactly one weights file: import_torchvision WEIGHTS.pth --out=DIR",
                             exitcode=2)
    path = argv[1]
    metrics.quiet_library_logs()
    try:
        import torch
    except ImportError:
        print("error: this command needs torch: pip install 'alexnet_jax[torch]'", file=sys.stderr)
        return EXIT_BAD_USAGE
    target = checkpointing.checkpoint_dir(FLAGS.out)
    if epath.Path(target).is_dir() and any(epath.Path(target).iterdir()):
        print(f"error: {target} already holds checkpoints; not overwriting them", file=sys.stderr)
        return EXIT_BAD_USAGE
    try:
        class_names = read_class_names(FLAGS.class_names) if FLAGS.class_names else None
        with epath.Path(path).open("rb") as f:  # a local file or a gs:// object
            state_dict = torch.load(f, map_location="cpu", weights_only=True)
        directory = import_state_dict(state_dict, FLAGS.out, num_classes=FLAGS.num_classes, class_names=class_names,
                                      image_size=FLAGS.image_size, resize_size=FLAGS.resize_size, source=path)
    except (OSError, EOFError, ValueError, RuntimeError, pickle.UnpicklingError) as error:
        # torch.load's weights-only refusal is an UnpicklingError; a missing/corrupt file an OSError/RuntimeError.
        print(f"error: {path}: {error}", file=sys.stderr)
        return EXIT_BAD_USAGE
    print(f"wrote {directory}")
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
