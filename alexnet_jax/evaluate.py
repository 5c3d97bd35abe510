"""Evaluate a checkpoint: python -m alexnet_jax.evaluate --config=CONFIG --workdir=DIR [--checkpoint=STEP]
[--json] [--per-class]

Prints eval_loss, eval_top1 and eval_top5 over every example of the eval split (each counted once, as in
training). The checkpoint's stored config describes the model and how it sees an image (data.image_size,
data.resize_size, data.eval_crops); --config says where the eval data is (its data section, seed and eval batch
size), so a checkpoint trained on one cluster evaluates against a copy of the data elsewhere. Only the eval data is
needed: its labels are the checkpoint's class names. The checkpoint's view wins over the --config file's unless a
key is set on the command line (--config.data.image_size=...). Without --config, the checkpoint's own config is
used for the data too.

Multi-process: the same --coordinator_address/--num_processes/--process_id or --distributed flags as training;
each process reads its share of every eval batch, and the metrics are exact sums over all of them.

Only params and BatchNorm statistics are read, replicated onto whatever devices this machine has: a checkpoint
from 4 devices or a pod slice evaluates on one CPU with the same numbers.

--per-class adds each class's precision and recall and their means, and writes the confusion matrix (rows: true
class, columns: predicted) beside the checkpoints as DIR/confusion_<step>.npy and .csv.
"""

import csv
import functools
import io
import json
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from alexnet_jax import checkpointing, cli, config as config_lib, inference, metrics, models, sharding, train
from alexnet_jax.data import sources

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Called only when run as a command: importing this module defines no flags (see predict.define_flags)."""
    config_flags.DEFINE_config_file("config", None, "Config whose data section names the eval data "
                                    "(default: the checkpoint's own config).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Training directory, local or gs:// (its checkpoints/ are read).")
    flags.DEFINE_integer("checkpoint", None, "Checkpoint step to evaluate; default: the newest.")
    flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
    flags.DEFINE_bool("per-class", False, "Also report per-class precision/recall and save the confusion matrix.")
    flags.DEFINE_alias("per_class", "per-class")
    cli.define_weights_flag()
    cli.define_distributed_flags()
    flags.mark_flags_as_required(["workdir"])


EXIT_BAD_USAGE = cli.EXIT_BAD_USAGE
# How the model sees an image: a property of the checkpoint, not of where the data lives.
EVAL_VIEW_KEYS = ("data.image_size", "data.resize_size", "data.eval_crops")


def masked_predictions(model_vars: dict, batch: dict, *, graphdef, **view_options) -> jax.Array:
    """The argmax class of each row of a padded eval batch; -1 where `mask` marks a padding row."""
    images = train.eval_images(batch, **view_options)
    log_probs = train.eval_log_probs(model_vars, images, graphdef=graphdef, **view_options)
    return jnp.where(batch["mask"], jnp.argmax(log_probs, -1).astype(jnp.int32), -1)


def eval_step_with_confusion(model_vars: dict, batch: dict, *, graphdef, num_classes: int, **view_options) -> dict:
    """train.eval_step's sums plus this batch's (true, predicted) count matrix, computed on the device so it is
    exact and needs no host round trip (or cross-process gather) per batch. Both halves run the same forward pass
    on the same operands inside one jit, which XLA computes once."""
    sums = train.eval_step(model_vars, batch, graphdef=graphdef, **view_options)
    predictions = masked_predictions(model_vars, batch, graphdef=graphdef, **view_options)
    real = predictions >= 0
    confusion = jnp.zeros((num_classes, num_classes), jnp.int32).at[
        batch["label"], jnp.where(real, predictions, 0)].add(real.astype(jnp.int32))
    return {**sums, "confusion": confusion}


def compile_eval(config, mesh, *, per_class: bool = False):
    """The jitted eval function over replicated params and a 'data'-sharded batch."""
    _, eval_def = models.model_graphdefs(config.model)
    options = train.eval_view_options(config)
    replicated = sharding.replicated(mesh)
    if per_class:
        fn = functools.partial(eval_step_with_confusion, graphdef=eval_def,
                               num_classes=int(config.model.num_classes), **options)
    else:
        fn = functools.partial(train.eval_step, graphdef=eval_def, **options)
    return jax.jit(fn, in_shardings=(replicated, sharding.batch_sharding(mesh)), out_shardings=replicated)


def evaluate_model(model_vars: dict, eval_source, config, mesh, *, per_class: bool = False):
    """(train.evaluate's result, confusion matrix or None): the same loop and arithmetic as training's eval."""
    eval_fn = compile_eval(config, mesh, per_class=per_class)
    if not per_class:
        return train.evaluate(eval_fn, model_vars, eval_source, config, mesh), None
    confusion = []

    def sums_only(variables, batch):  # train.evaluate adds up the sums; the matrix is accumulated beside it
        sums = dict(eval_fn(variables, batch))
        batch_confusion = sums.pop("confusion")
        confusion[:] = [confusion[0] + batch_confusion if confusion else batch_confusion]
        return sums

    result = train.evaluate(sums_only, model_vars, eval_source, config, mesh)
    return result, np.asarray(jax.device_get(confusion[0]))


def per_class_metrics(confusion: np.ndarray, class_names) -> dict:
    """Precision and recall per class and their means (macro averages) from a (true, predicted) count matrix.

    A class absent from the split has no recall (null) and is left out of both means; a class that is present but
    never predicted has precision 0 (it was missed every time), as scikit-learn's default does. So mean_recall is
    the balanced accuracy over the classes the split contains.
    """
    class_names = inference.output_names(class_names, len(confusion))
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    correct = np.diag(confusion)
    rows = []
    for i, name in enumerate(class_names):
        recall = correct[i] / support[i] if support[i] else None
        precision = correct[i] / predicted[i] if predicted[i] else (0.0 if support[i] else None)
        rows.append({"label": i, "class": name, "precision": None if precision is None else float(precision),
                     "recall": None if recall is None else float(recall), "support": int(support[i]),
                     "predicted": int(predicted[i])})
    present = [r for r in rows if r["support"]]
    return {
        "per_class": rows,
        "mean_precision": float(np.mean([r["precision"] for r in present])) if present else None,
        "mean_recall": float(np.mean([r["recall"] for r in present])) if present else None,
    }


def save_confusion(confusion: np.ndarray, class_names, workdir: str, step: int) -> tuple[str, str]:
    """DIR/confusion_<step>.npy (exact counts) and .csv (with class names, for spreadsheets); DIR may be gs://."""
    names = inference.output_names(class_names, len(confusion))
    npy, table = epath.Path(workdir) / f"confusion_{step}.npy", io.StringIO(newline="")
    with npy.open("wb") as f:
        np.save(f, confusion)
    writer = csv.writer(table)  # quotes ImageNet names such as "tench, Tinca tinca"
    writer.writerow(["true \\ predicted", *names])
    for name, row in zip(names, confusion):
        writer.writerow([name, *row.tolist()])
    csv_path = npy.with_suffix(".csv")
    csv_path.write_text(table.getvalue())
    return str(npy), str(csv_path)


def _deep_update(base: dict, update: dict) -> dict:
    for key, value in update.items():
        base[key] = (_deep_update(dict(base[key]), value)
                     if isinstance(value, dict) and isinstance(base.get(key), dict) else value)
    return base


def eval_config(data_config, checkpoint_config, overrides=()) -> ml_collections.ConfigDict:
    """The given config (or the checkpoint's) with the checkpoint's model section and eval view (EVAL_VIEW_KEYS,
    except those named in `overrides`, the keys the user set explicitly) and a model axis of 1 (params are
    replicated here), over today's defaults, so a checkpoint written before a key existed still validates."""
    source = checkpoint_config if data_config is None else data_config
    merged = _deep_update(config_lib.base_config().to_dict(), source.to_dict())
    merged["model"] = _deep_update(merged["model"], checkpoint_config.model.to_dict())
    for key in EVAL_VIEW_KEYS:
        section, name = key.split(".")
        if key not in overrides and name in checkpoint_config[section]:
            merged[section][name] = checkpoint_config[section][name]
    merged["mesh"]["model"] = 1
    return ml_collections.ConfigDict(merged)


def _view(config) -> dict:
    return {key: config.data.get(key.split(".")[1]) for key in EVAL_VIEW_KEYS}


def evaluate_checkpoint(workdir: str, data_config=None, step: int | None = None, *, per_class: bool = False,
                        overrides=(), weights: str | None = None):
    """Loads a checkpoint for inference and evaluates it; returns (result dict, confusion or None, class names).
    `overrides` names the keys of `data_config` that win over the checkpoint's eval view (e.g.
    "data.image_size"). Every process of a multi-process run calls it; all get the same result.

    Raises checkpointing.CheckpointNotFound, checkpointing.CheckpointUnreadable and config_lib.ConfigError (naming
    the key) for bad input, before anything compiles.
    """
    checkpoint_config, class_names, model_vars, step = checkpointing.load_for_inference(workdir, step,
                                                                                       weights=weights)
    config = eval_config(data_config, checkpoint_config, overrides)
    if note := config_lib.follow_image_size(config, overrides, checkpoint_config, "checkpoint's"):
        logging.info("%s", note)
    config_lib.validate(config, jax.device_count(), jax.process_count(), splits=("eval",))
    try:
        eval_source = sources.create_source(config.data, "eval", config.model.num_classes, config.seed,
                                            class_names=class_names)
    except ValueError as error:  # e.g. a source this build cannot read; the message names data.source
        raise config_lib.ConfigError(str(error)) from None
    mesh = sharding.create_mesh(1)
    result, confusion = evaluate_model(model_vars, eval_source, config, mesh, per_class=per_class)
    result = {"checkpoint_step": int(step), **result,
              "weights": weights or checkpointing.default_weights(checkpoint_config),
              "image_size": int(config.data.image_size),
              "resize_size": int(config.data.resize_size), "devices": jax.device_count(),
              "processes": jax.process_count()}
    used, trained = _view(config), _view(checkpoint_config)
    changed = [key for key in EVAL_VIEW_KEYS if trained[key] not in (None, used[key])]
    if changed:
        result["note"] = (f"evaluated with {', '.join(f'{k}={used[k]}' for k in changed)}; the checkpoint was "
                          f"trained with {', '.join(f'{k}={trained[k]}' for k in changed)}")
    return result, confusion, class_names


def print_report(result: dict, workdir: str) -> None:
    print(f"checkpoint {result['checkpoint_step']} of {workdir}: {result['eval_examples']} examples at "
          f"{result['image_size']} px")
    for key in ("eval_loss", "eval_top1", "eval_top5"):
        print(f"  {key:<10} {result[key]:.6f}")
    if "note" in result:
        print(f"  note: {result['note']}")
    if "per_class" not in result:
        return
    # Outputs that no example has and nothing was predicted as (a head wider than the data) would only be noise.
    rows = [row for row in result["per_class"] if row["support"] or row["predicted"]]
    width = max([12, *(len(str(row["class"])) for row in rows)])
    print(f"  {'class':<{width}} precision  recall  support")
    fmt = lambda v: "      -" if v is None else f"{v:7.4f}"  # noqa: E731
    for row in rows:
        print(f"  {row['class']:<{width}}   {fmt(row['precision'])} {fmt(row['recall'])}  {row['support']:7d}")
    if len(rows) < len(result["per_class"]):
        print(f"  ({len(result['per_class']) - len(rows)} classes with no examples and no predictions not shown)")
    print(f"  mean precision {fmt(result['mean_precision'])}  mean recall {fmt(result['mean_recall'])}")
    print(f"  confusion matrix: {result['confusion_matrix']} (and .csv)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}", exitcode=2)
    metrics.quiet_library_logs()
    cli.init_distributed()
    # Keys set on the command line (--config.data.image_size=...) are what the user asks for; the rest of the
    # --config file only says where the data is, so the checkpoint's eval view wins over it.
    overrides = list(config_flags.get_override_values(FLAGS["config"])) if FLAGS.config is not None else []
    try:
        result, confusion, class_names = evaluate_checkpoint(FLAGS.workdir, FLAGS.config, FLAGS.checkpoint,
                                                             per_class=FLAGS["per-class"].value,
                                                             overrides=overrides, weights=FLAGS.weights)
    except (checkpointing.CheckpointNotFound, checkpointing.CheckpointUnreadable) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_USAGE
    except config_lib.ConfigError as error:
        print(f"error: config: {error}", file=sys.stderr)
        return EXIT_BAD_USAGE
    if jax.process_index() != 0:  # every process holds the same result; one reports it
        return 0
    if confusion is not None:
        result.update(per_class_metrics(confusion, class_names))
        npy_path, csv_path = save_confusion(confusion, class_names, FLAGS.workdir, result["checkpoint_step"])
        result["confusion_matrix"] = npy_path
        result["confusion_matrix_csv"] = csv_path
    print_report(result, FLAGS.workdir)
    if FLAGS.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
