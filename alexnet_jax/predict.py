"""Classify images with a trained checkpoint: python -m alexnet_jax.predict --workdir=DIR [--checkpoint=STEP]
[--json] IMAGE_OR_FOLDER...

Prints the top-5 classes with probabilities for each image; a folder stands for every image file under it. An image that cannot be read gets one error line
naming it; the others are still classified, and the exit code is 1 if any failed. This is alexnet_jax.inference
(load + predict) as a command: the same view and the same function as evaluation.

In --json output each class has "class" (the name stored in the checkpoint: an ImageNet WordNet id such as
n01440764, or a folder name) and "name" (what a person reads: "tench, Tinca tinca"; the same as "class" when the
stored name is not a WordNet id). A model with more outputs than the checkpoint has class names (a 1000-way head
trained on a 3-class folder) has "class": null and "name": "class <label>" for the unnamed outputs.
"""

import json
import sys

import numpy as np
from absl import app, flags
from etils import epath

from alexnet_jax import checkpointing, cli, inference, metrics, storage
from alexnet_jax.data import imagefolder

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Called only when run as a command, so importing this module defines no flags that would clash with the
    importer's."""
    flags.DEFINE_string("workdir", None, "Training directory, local or gs:// (its checkpoints/ are read).")
    flags.DEFINE_integer("checkpoint", None, "Checkpoint step to load; default: the newest.")
    flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
    flags.DEFINE_integer("top_k", 5, "How many classes to show per image.")
    cli.define_weights_flag()
    flags.mark_flags_as_required(["workdir"])


def _expand_folders(paths: list[str], errors: list[dict]) -> list[str]:
    """Each folder among `paths` stands for the image files under it (sorted, sub-folders included, hidden and
    non-image files left out); a folder without any is an error of its own."""
    expanded = []
    for path in paths:
        if not epath.Path(path).is_dir():
            expanded.append(path)
            continue
        found = [storage.join(path, name) for name in imagefolder.list_image_files(path)]
        if not found:
            errors.append({"file": path, "error": "no image files in this folder"})
            print(f"error: cannot read image {path}: no image files in this folder", file=sys.stderr)
        expanded += found
    return expanded


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give one or more image files", exitcode=2)
    metrics.quiet_library_logs()
    try:
        model = inference.load(FLAGS.workdir, FLAGS.checkpoint, weights=FLAGS.weights)
    except (checkpointing.CheckpointNotFound, checkpointing.CheckpointUnreadable) as error:
        print(f"error: {error}", file=sys.stderr)
        return cli.EXIT_BAD_USAGE
    if len(model.class_names) < model.num_outputs:
        print(f"note: the model has {model.num_outputs} outputs but the checkpoint names {len(model.class_names)} "
              f"classes; outputs {len(model.class_names)} and up show as \"class <label>\"", file=sys.stderr)
    views, ok_paths, errors = [], [], []
    for path in _expand_folders(paths, errors):
        try:
            views.append(model.preprocess(path))
            ok_paths.append(path)
        except inference.UnreadableImage as error:
            errors.append({"file": path, "error": error.reason})
            print(f"error: {error}", file=sys.stderr)
    predictions = []
    if views:
        for path, p in zip(ok_paths, model.probabilities_of_views(np.stack(views))):
            predictions.append({"file": path, "top": model.top(p, FLAGS.top_k)})
    for pred in predictions:
        print(f"{pred['file']}:")
        for rank, t in enumerate(pred["top"], 1):
            short = model.name(t["label"], short=True)
            label = short if t["class"] in (None, short) else f"{short} ({t['class']})"
            print(f"  {rank}. {label:<30} {t['probability']:.4f}")
    if FLAGS.json:
        print(json.dumps({"checkpoint_step": model.step, "predictions": predictions, "errors": errors}))
    return 1 if errors else 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
