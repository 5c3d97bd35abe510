"""Classify images with a trained checkpoint: python -m alexnet_jax.predict --workdir=DIR [--json] IMAGE...

Prints the top-5 classes with probabilities for each image. An image that cannot be read gets one error line
naming it; the others are still classified, and the exit code is 1 if any failed.
"""

import functools
import json
import sys

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from PIL import Image

from alexnet_jax import checkpointing, metrics, train
from alexnet_jax.data import transforms

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training directory (its checkpoints/ are read).")
flags.DEFINE_integer("checkpoint", None, "Checkpoint step to load; default: the newest.")
flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
flags.DEFINE_integer("top_k", 5, "How many classes to show per image.")
flags.mark_flags_as_required(["workdir"])


def load_image(path: str, image_size: int, resize_size: int) -> np.ndarray:
    """A file -> the eval view the model was validated on: RGB, short side resized, centre crop."""
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    return transforms.center_crop(rgb, image_size, resize_size)


def probabilities_fn(config):
    _, eval_def = train.model_graphdefs(config.model)
    dtype = jax.numpy.dtype(config.model.dtype)

    @jax.jit
    def probabilities(model_vars, images):
        model = nnx.merge(eval_def, model_vars["params"], model_vars["batch_stats"])
        return jax.nn.softmax(model(transforms.normalize(images, dtype)))

    return probabilities


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give one or more image files")
    metrics.quiet_library_logs()
    try:
        config, class_names, model_vars, step = checkpointing.load_for_inference(FLAGS.workdir, FLAGS.checkpoint)
    except checkpointing.CheckpointNotFound as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    images, ok_paths, errors = [], [], []
    for path in paths:
        try:
            images.append(load_image(path, config.data.image_size, config.data.resize_size))
            ok_paths.append(path)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            errors.append({"file": path, "error": str(error)})
            print(f"error: cannot read image {path}: {error}", file=sys.stderr)
    predictions = []
    if images:
        probs = np.asarray(probabilities_fn(config)(model_vars, np.stack(images)))
        k = min(FLAGS.top_k, probs.shape[-1])
        for path, p in zip(ok_paths, probs):
            top = np.argsort(-p)[:k]
            predictions.append({"file": path, "top": [
                {"label": int(i), "class": class_names[i], "probability": float(p[i])} for i in top]})
    for pred in predictions:
        print(f"{pred['file']}:")
        for rank, t in enumerate(pred["top"], 1):
            print(f"  {rank}. {t['class']:<30} {t['probability']:.4f}")
    if FLAGS.json:
        print(json.dumps({"checkpoint_step": step, "predictions": predictions, "errors": errors}))
    return 1 if errors else 0


if __name__ == "__main__":
    app.run(main)
