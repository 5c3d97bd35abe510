"""Classify images with a trained checkpoint: python -m alexnet_jax.predict --workdir=DIR [--checkpoint=STEP]
[--json] IMAGE...

Prints the top-5 classes with probabilities for each image. An image that cannot be read gets one error line
naming it; the others are still classified, and the exit code is 1 if any failed. Only params and BatchNorm
statistics are loaded (checkpointing.load_for_inference), replicated onto this machine's devices.

In --json output each class has "class" (the name stored in the checkpoint: an ImageNet WordNet id such as
n01440764, or a folder name) and "name" (what a person reads: "tench, Tinca tinca"; the same as "class" when the
stored name is not a WordNet id).
"""

import json
import sys

import jax
import numpy as np
from absl import app, flags
from PIL import Image

from alexnet_jax import checkpointing, cli, metrics, storage, train
from alexnet_jax.data import classes, pipeline

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Called only when run as a command, so importing this module (export reuses `probabilities_fn`) defines
    no flags that would clash with the importer's."""
    flags.DEFINE_string("workdir", None, "Training directory (its checkpoints/ are read).")
    flags.DEFINE_integer("checkpoint", None, "Checkpoint step to load; default: the newest.")
    flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
    flags.DEFINE_integer("top_k", 5, "How many classes to show per image.")
    flags.mark_flags_as_required(["workdir"])


def load_image(path: str, image_size: int, resize_size: int, eval_crops: int = 1) -> np.ndarray:
    """A file -> exactly the host view evaluation used (RGB, EXIF-upright, short side resized, centre crop)."""
    return pipeline.eval_view(storage.read_bytes(path), image_size, resize_size, eval_crops)


def probabilities_fn(config, eval_crops: int = 1):
    """jitted (model_vars, uint8 NHWC views) -> class probabilities, through the same code as evaluation."""
    _, eval_def = train.model_graphdefs(config.model)
    options = dict(train.eval_view_options(config), eval_crops=eval_crops)
    return jax.jit(lambda model_vars, images: jax.numpy.exp(
        train.eval_log_probs(model_vars, images, graphdef=eval_def, **options)))


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give one or more image files", exitcode=2)
    metrics.quiet_library_logs()
    try:
        config, class_names, model_vars, step = checkpointing.load_for_inference(FLAGS.workdir, FLAGS.checkpoint)
    except checkpointing.CheckpointNotFound as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    eval_crops = config.data.get("eval_crops", 1)
    images, ok_paths, errors = [], [], []
    for path in paths:
        try:
            images.append(load_image(path, config.data.image_size, config.data.resize_size, eval_crops))
            ok_paths.append(path)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            errors.append({"file": path, "error": str(error)})
            print(f"error: cannot read image {path}: {error}", file=sys.stderr)
    predictions = []
    if images:
        probs = np.asarray(probabilities_fn(config, eval_crops)(model_vars, np.stack(images)))
        k = min(FLAGS.top_k, probs.shape[-1])
        for path, p in zip(ok_paths, probs):
            top = np.argsort(-p)[:k]
            predictions.append({"file": path, "top": [
                {"label": int(i), "class": class_names[i], "name": classes.display_name(class_names[i]),
                 "probability": float(p[i])} for i in top]})
    for pred in predictions:
        print(f"{pred['file']}:")
        for rank, t in enumerate(pred["top"], 1):
            short = classes.display_name(t["class"], short=True)
            label = short if short == t["class"] else f"{short} ({t['class']})"
            print(f"  {rank}. {label:<30} {t['probability']:.4f}")
    if FLAGS.json:
        print(json.dumps({"checkpoint_step": step, "predictions": predictions, "errors": errors}))
    return 1 if errors else 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
