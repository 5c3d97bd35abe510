"""Training and evaluation: a pure, jitted train step and the loop that feeds it.

A batch's path: grain yields this process's uint8 slice (data/pipeline.py) -> `sharding.host_to_global` makes
it one global array split over every device -> `train_step` normalises/flips it on the device, runs the model,
and applies the optax update. Metrics stay on the device until a log step, so the host never waits on the step.
The step refuses non-finite updates on the device; at log steps `stability.Recovery` judges the row and may roll
back to a good checkpoint (see stability.py).
"""

import functools
import os
import time
import types

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx

from alexnet_jax import checkpointing, metrics, models, optim, precise_bn, sharding, stability, utilization
from alexnet_jax import config as config_lib
from alexnet_jax.data import pipeline, sources, transforms
from alexnet_jax.optim import create_optimizer  # clip threshold and learning-rate factor live in its state


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    skipped_steps: jax.Array  # steps whose loss or gradient was not finite and were not applied
    ema_params: dict | None = None  # exponential moving average of params (optim.ema_decay > 0), else None


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example cross-entropy against integer labels, or against (1 - s) x one-hot + s / classes."""
    if label_smoothing == 0:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def micro_batches(x: jax.Array, k: int, batch_sharding) -> jax.Array:
    """(B, ...) -> (k, B/k, ...): micro-batch j is rows j, j+k, j+2k, ... Each device's contiguous block of rows
    splits into k equal parts of its own, so no example moves between devices and every micro-batch stays
    sharded as the batch was (on whatever mesh axes `batch_sharding` splits it over)."""
    x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    spec = jax.sharding.PartitionSpec(None, *batch_sharding.spec)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(batch_sharding.mesh, spec))


def ema_decay_at(step: jax.Array, ema_decay: float) -> jax.Array:
    """The averaging weight of update `step` (0-based): min(ema_decay, (1 + t) / (10 + t)), the usual warm-up
    (TensorFlow's ExponentialMovingAverage with num_updates), so early weights, far from the trained ones, fade
    within tens of steps instead of thousands."""
    t = step.astype(jnp.float32)
    return jnp.minimum(jnp.float32(ema_decay), (1 + t) / (10 + t))


def train_step(state: TrainState, batch: dict, *, graphdef, tx, learning_rate_fn, dropout_key, dtype,
               flip: bool, lighting_std: float, label_smoothing: float = 0.0, grad_accum_steps: int = 1,
               batch_sharding=None, ema_decay: float = 0.0, crop_key=None, crop_size: int = 0,
               augment: str = "alexnet"):
    """One optimizer step. Pure: (state, global batch) -> (new state, metrics); randomness is fold_in(key, step).

    A batch with "position" holds stored pixels (data.device_crops): the step first cuts each example's
    `crop_size` crop, drawn from fold_in(crop_key, its global stream position), so which crop an example gets
    depends on the data seed and its place in the stream only: `augment` "alexnet", a square at a uniform offset
    (transforms.device_crop_offsets); "inception", a random-resized box resampled to the square
    (transforms.device_inception_crops).

    `tx` comes from `optim.create_optimizer`: clip threshold and learning-rate factor are scalars in its state.
    With grad_accum_steps = k > 1 the batch runs as k micro-batches in a scan (only one micro-batch's
    activations are alive at a time) and their mean gradient makes the one update; `batch_sharding` is how the
    batch is laid out, which each micro-batch keeps. Metrics are over the whole global batch either way."""
    flip_key, lighting_key, drop_key = jax.random.split(jax.random.fold_in(dropout_key, state.step), 3)
    # Crop and augment the whole batch before splitting it, so the images a step trains on do not depend on k.
    images = batch["image"]
    if "position" in batch and augment == "inception":
        images = transforms.device_inception_crops(images, crop_key, batch["position"], crop_size)
    elif "position" in batch:
        bounds = (images.shape[1] - crop_size + 1, images.shape[2] - crop_size + 1)
        offsets = transforms.device_crop_offsets(crop_key, batch["position"], bounds)
        images = transforms.device_crops(images, offsets, crop_size)
    images = transforms.random_flip(images, flip_key) if flip else images
    if lighting_std > 0:
        images = transforms.pca_lighting(images, lighting_key, lighting_std)
    images, labels = transforms.normalize(images, dtype), batch["label"]

    def loss_fn(params, batch_stats, images, labels, key):
        model = nnx.merge(graphdef, params, batch_stats)
        logits = model(images, rngs=nnx.Rngs(dropout=key))
        loss = cross_entropy(logits, labels, label_smoothing).mean()
        correct = jnp.sum(jnp.argmax(logits, -1) == labels)
        return loss, (correct, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum_steps == 1:
        (loss, (correct, batch_stats)), grads = grad_fn(state.params, state.batch_stats, images, labels, drop_key)
    else:
        def accumulate(carry, micro):
            grad_sum, loss_sum, correct_sum, batch_stats = carry
            (loss, (correct, batch_stats)), grads = grad_fn(state.params, batch_stats, *micro)
            # BatchNorm's running averages thread through the micro-batches: one update each, as in PyTorch.
            return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss.astype(jnp.float32),
                    correct_sum + correct, batch_stats), None

        k = grad_accum_steps
        micro = (micro_batches(images, k, batch_sharding), micro_batches(labels, k, batch_sharding),
                 jax.random.split(drop_key, k))
        zero = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32),
                state.batch_stats)
        (grad_sum, loss_sum, correct, batch_stats), _ = jax.lax.scan(accumulate, zero, micro)
        # Equal micro-batches: the mean of their mean losses and gradients is the whole batch's mean.
        grads, loss = jax.tree.map(lambda g: g / k, grad_sum), loss_sum / k
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    stats = stability.step_stats(grads, updates, state.params, state.opt_state)  # grad norms are pre-clip
    # A non-finite loss, gradient or update would poison params and momentum for good; keep the old ones instead.
    # The param norm is in the test too (always finite) so that the new params depend on its read of the old
    # ones: with every read ordered before the write, XLA updates the donated buffers in place instead of first
    # copying all the params (a 6% faster step on CPU).
    finite = (jnp.isfinite(loss) & jnp.isfinite(stats["grad_norm"]) & jnp.isfinite(stats.pop("update_norm"))
              & jnp.isfinite(stats.pop("param_norm")))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params = keep(optax.apply_updates(state.params, updates), state.params)
    if state.ema_params is not None:
        decay = ema_decay_at(state.step, ema_decay)
        ema_params = keep(jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, params),
                          state.ema_params)
    else:
        ema_params = None
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        ema_params=ema_params,
        batch_stats=keep(batch_stats, state.batch_stats),
        opt_state=keep(opt_state, state.opt_state),
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
    )
    step_metrics = {
        "train_loss": loss,
        "train_top1": correct / labels.shape[0],
        # The rate this update used: optax's own count, which (unlike state.step) skipped steps do not advance.
        "learning_rate": learning_rate_fn(optax.tree_utils.tree_get(state.opt_state, "count"))
        * state.opt_state.lr_scale,
        "skipped": ~finite,
        **stats,  # grad_norm, layer_grad_norms, update_ratio, clipped
    }
    return new_state, step_metrics


def eval_log_probs(model_vars: dict, images: jax.Array, *, graphdef, dtype, eval_crops: int = 1,
                   image_size: int = 0) -> jax.Array:
    """Log class probabilities of uint8 NHWC images: one centre view, or (eval_crops=10) the paper's ten views
    (corners, centre and their mirrors, cut on the device from the resize_size square) with softmaxes averaged."""
    model = nnx.merge(graphdef, model_vars["params"], model_vars["batch_stats"])
    apply = lambda views: model(transforms.normalize(views, dtype))
    if eval_crops == 10:
        return jnp.log(jnp.maximum(transforms.ten_crop_probabilities(apply, images, image_size), 1e-30))
    return jax.nn.log_softmax(apply(images))


def eval_images(batch: dict, *, eval_crops: int = 1, image_size: int = 0, **_) -> jax.Array:
    """The images of an eval batch (given eval_log_probs' options) as eval_log_probs takes them. Images larger
    than the view are stored pixels at the crop's scale (data.device_crops, pipeline.device_eval_problem): the
    view is their central image_size square; for ten crops the stored square is shipped whole, and is the
    resize_size square."""
    images = batch["image"]
    return images if eval_crops == 10 or not image_size else transforms.central_view(images, image_size)


def eval_step(model_vars: dict, batch: dict, *, graphdef, **view_options):
    """Sums (not means) over the real rows of a padded batch, so the totals are exact over the whole split."""
    log_probs = eval_log_probs(model_vars, eval_images(batch, **view_options), graphdef=graphdef, **view_options)
    labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
    top5 = jax.lax.top_k(log_probs, min(5, log_probs.shape[-1]))[1]
    return {
        "loss": -jnp.sum(jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0] * mask),
        "top1": jnp.sum((jnp.argmax(log_probs, -1) == labels) * mask),
        "top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
        "count": jnp.sum(mask),
    }


def eval_view_options(config) -> dict:
    """The static arguments of eval_step / eval_log_probs that a config decides."""
    return {"dtype": models.compute_dtype(config.model.dtype), "eval_crops": int(config.data.eval_crops),
            "image_size": int(config.data.image_size)}


def _init_fn(model_config, tx, ema: bool = False):
    def init(key) -> TrainState:
        model = models.create_model(model_config, rngs=nnx.Rngs(params=key))
        _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        params, batch_stats = nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                          opt_state=tx.init(params), skipped_steps=jnp.zeros((), jnp.int32),
                          ema_params=jax.tree.map(jnp.copy, params) if ema else None)

    return init


def uses_ema(config) -> bool:
    return float(optim.get(config.optim, "ema_decay")) > 0


def abstract_train_state(config, mesh, tx) -> TrainState:
    """The train state as ShapeDtypeStructs carrying their mesh shardings: the target layout for both a fresh
    initialisation and a checkpoint restore, computed without allocating anything. EMA params (if any) are laid
    out like the params: the sharding rules match on a path's tail."""
    abstract = jax.eval_shape(_init_fn(config.model, tx, uses_ema(config)), jax.random.key(config.seed))
    shardings = sharding.train_state_shardings(
        abstract, mesh, shard_optimizer_state=bool(config.mesh.get("shard_optimizer_state", False)))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def create_train_state(config, tx, abstract_state: TrainState) -> TrainState:
    """A fresh TrainState, initialised directly into the mesh layout (no device ever holds a full replica it
    should not)."""
    shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
    # Initialisation runs once, so XLA:CPU's optimisation passes only cost time there: ~20 s for the random
    # initialisers alone, ~2 s without them. Accelerators compile it quickly as it is.
    fast = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    key = jax.random.key(config.seed)
    lowered = jax.jit(_init_fn(config.model, tx, uses_ema(config)), out_shardings=shardings).lower(key)
    return lowered.compile(compiler_options=fast)(key)


def num_train_steps(config, train_examples: int) -> int:
    if config.num_train_steps > 0:
        return config.num_train_steps
    return config.num_epochs * pipeline.steps_per_epoch(train_examples, config.batch_size)


def eval_batch_size(config) -> int:
    return config.eval_batch_size if config.eval_batch_size > 0 else config.batch_size


def evaluate(eval_fn, model_vars, eval_source, config, mesh, batches=None, abandon=None) -> dict | None:
    """Exact eval_loss / eval_top1 / eval_top5 over every example of the split, each counted once.

    `batches`: this process's local batches of one pass (e.g. a pipeline.eval_passes pass, whose grain workers
    live across evals); by default a pipeline of its own. `abandon`: asked before each batch; once it answers
    True the pass stops and None is returned (a stop request: the checkpoint must not wait for the eval)."""
    if batches is None:
        own = pipeline.eval_batches(
            eval_source, global_batch_size=eval_batch_size(config), image_size=config.data.image_size,
            resize_size=config.data.resize_size, eval_crops=config.data.eval_crops,
            process_index=jax.process_index(), process_count=jax.process_count(),
            on_device=pipeline.eval_views_on_device(eval_source, config.data, "eval"),
            **pipeline.feed_options(config.data, purpose="eval", images=len(eval_source),
                                    global_batch_size=eval_batch_size(config), process_count=jax.process_count()))
        try:
            return evaluate(eval_fn, model_vars, eval_source, config, mesh, batches=own)
        finally:
            own.close()  # its grain workers and their shared memory
    totals = None
    for local_batch in batches:
        if abandon is not None and abandon():
            return None
        sums = eval_fn(model_vars, sharding.host_to_global(local_batch, mesh))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {"eval_loss": float(totals["loss"]) / count, "eval_top1": float(totals["top1"]) / count,
            "eval_top5": float(totals["top5"]) / count, "eval_examples": int(count)}


def model_shardings_of(state_shardings) -> dict:
    return {"params": state_shardings.params, "batch_stats": state_shardings.batch_stats}


def compile_steps(config, mesh, tx, learning_rate_fn, state_shardings):
    """The jitted (train_step, eval_step) with explicit shardings; the train state is donated."""
    train_def, eval_def = models.model_graphdefs(config.model)
    dtype = models.compute_dtype(config.model.dtype)
    step = functools.partial(train_step, graphdef=train_def, tx=tx, learning_rate_fn=learning_rate_fn,
                             dropout_key=jax.random.fold_in(jax.random.key(config.seed), 1), dtype=dtype,
                             flip=config.data.random_flip, lighting_std=float(config.data.lighting_std),
                             label_smoothing=float(optim.get(config.optim, "label_smoothing")),
                             grad_accum_steps=int(optim.get(config.optim, "grad_accum_steps")),
                             batch_sharding=sharding.batch_sharding(mesh),
                             ema_decay=float(optim.get(config.optim, "ema_decay")),
                             crop_key=transforms.device_crop_key(config.seed), crop_size=int(config.data.image_size),
                             augment=config.data.augment)
    step_fn = jax.jit(
        sharding.with_fc_layout(step, mesh, config.model.num_classes),
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0)
    model_shardings = model_shardings_of(state_shardings)
    evaluate_batch = functools.partial(eval_step, graphdef=eval_def, **eval_view_options(config))
    eval_fn = jax.jit(sharding.with_fc_layout(evaluate_batch, mesh, config.model.num_classes),
                      in_shardings=(model_shardings, sharding.batch_sharding(mesh)),
                      out_shardings=sharding.replicated(mesh))
    return step_fn, eval_fn


class Preempted(Exception):
    """Training stopped early on request (Ctrl-C, SIGTERM, a preemption notice) after checkpointing the step."""

    def __init__(self, message: str, signal_name: str | None = None):
        super().__init__(message)
        self.signal_name = signal_name


def save_checkpoint(manager, state: TrainState, config, class_names, eval_metrics=None, bn_stats=None,
                    ema_bn_stats=None) -> bool:
    """Saves unless some value is not finite (the guard should make that impossible; this makes it certain)."""
    if not bool(jax.device_get(stability.all_finite(state))):
        logging.warning("Not checkpointing step %d: the train state holds non-finite values",
                        int(jax.device_get(state.step)))
        return False
    checkpointing.save(manager, state, config, class_names, eval_metrics, bn_stats, ema_bn_stats)
    return True


SOURCES_WITH_CLASS_LISTS = ("imagefolder", "arrayrecord")  # the others make labels up for model.num_classes


def adopt_class_count(config, train_source) -> None:
    """The model gets one output per class of the training data: a 1000-way head on a 3-class folder would train
    and predict classes that do not exist, and a head too small for the data cannot train at all."""
    found = len(train_source.class_names)
    if config.data.source in SOURCES_WITH_CLASS_LISTS and found != config.model.num_classes:
        logging.warning("model.num_classes=%d but %s has %d classes: training a %d-way classifier",
                        config.model.num_classes, config.data.train_path, found, found)
        config.model.num_classes = found


def _open_sources(config):
    try:
        from_data = config.data.source in SOURCES_WITH_CLASS_LISTS
        train_source = sources.create_source(config.data, "train", None if from_data else config.model.num_classes,
                                             config.seed)
        adopt_class_count(config, train_source)
        eval_source = sources.create_source(config.data, "eval", config.model.num_classes, config.seed)
    except ValueError as error:  # data that contradicts the config (labels, class lists): a config error
        raise config_lib.ConfigError(f"data: {error}") from None
    if problem := pipeline.device_crop_problem(train_source, config.data):
        raise config_lib.ConfigError(problem)
    return train_source, eval_source


def _resave(manager, config, class_names):
    """Rewrites the checkpoint of a restored state with the state's new rollback controls (see stability)."""

    def resave(state):  # keeping its eval metrics, so the best-checkpoint policy still sees them
        checkpointing.resave(manager, state, config, class_names, manager.metrics(int(jax.device_get(state.step))))

    return resave


def _best_eval(manager, best_metric: str) -> tuple[float, int] | None:
    scored = [(metrics[best_metric], step) for step in manager.all_steps()
              if best_metric in (metrics := manager.metrics(step) or {})]
    return max(scored) if scored else None


def _log_done(manager, workdir: str, step: int, best_metric: str) -> None:
    best = _best_eval(manager, best_metric)
    logging.info("Done at step %d. Final checkpoint: %s/%d%s. Classify images with: python -m alexnet_jax.predict "
                 "--workdir=%s IMAGE...", step, checkpointing.checkpoint_dir(workdir), step,
                 f"; best {'EMA ' if 'ema' in best_metric else ''}eval top-1 {best[0]:.4f} at step {best[1]}" if best
                 else "", workdir)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming from the newest checkpoint in workdir), evaluates, checkpoints; returns the last eval.

    Raises stability.TrainingStopped when the stability guard gives up (main exits with code 3), Preempted after
    checkpointing on Ctrl-C, SIGTERM or a preemption notice.
    """
    pipeline.release_orphaned_shared_memory(workdir)
    try:
        mesh = sharding.mesh_for(config)
    except ValueError as error:  # e.g. a TPU topology that has no such grid
        raise config_lib.ConfigError(str(error)) from None
    train_source, eval_source = _open_sources(config)
    if config.data.get("device_crops", False):
        height, width, _ = train_source.uniform_pixels
        logging.info("data.device_crops: the train step %s %d px crops from the stored %dx%d pixels",
                     "resamples the inception" if config.data.augment == "inception" else "cuts the",
                     config.data.image_size, width, height)
    steps_per_epoch = pipeline.steps_per_epoch(len(train_source), config.batch_size)
    total_steps = num_train_steps(config, len(train_source))
    eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
    layer_stats_every = config.stability.layer_stats_every

    learning_rate_fn = optim.create_learning_rate_fn(config.optim, steps_per_epoch, total_steps)
    tx = create_optimizer(config.optim, learning_rate_fn)
    abstract_state = abstract_train_state(config, mesh, tx)
    state_shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
    layer_names = sorted(abstract_state.params)
    class_names = train_source.class_names

    best_metric = config.get("best_metric", checkpointing.BEST_METRIC)
    manager = checkpointing.create_manager(workdir, config.max_checkpoints_to_keep, best_metric=best_metric)
    # From here on Ctrl-C and SIGTERM mean "checkpoint the last finished step, then stop", also while restoring
    # and compiling: the request is honoured after the first step.
    preemption = checkpointing.PreemptionWatch(manager)
    try:
        state, latest = checkpointing.restore_newest_good(manager, abstract_state, config)
    except (checkpointing.IncompatibleCheckpoint, checkpointing.CheckpointUnreadable) as error:
        preemption.close()
        manager.close()
        if isinstance(error, checkpointing.CheckpointUnreadable):
            raise
        raise config_lib.ConfigError(str(error)) from None

    def restore(step):  # the config's clip_norm wins over the checkpoint's: a run may resume with it changed
        restored = checkpointing.restore_train_state(manager, step, abstract_state)
        return stability.set_controls(restored, clip_norm=float(config.optim.clip_norm))

    if latest is None:
        state = create_train_state(config, tx, abstract_state)
    else:
        state = stability.set_controls(state, clip_norm=float(config.optim.clip_norm))
        logging.info("Resumed from %s at step %d", checkpointing.checkpoint_dir(workdir), latest)
    start_step = int(jax.device_get(state.step))
    controls = stability.read_controls(state)
    if controls["rollbacks"]:
        logging.info("Continuing after rollback %d: batch offset %d, learning rate x%g", controls["rollbacks"],
                     controls["batch_offset"], controls["lr_scale"])
    recovery = stability.Recovery(
        config.stability, manager=manager, restore=restore, resave=_resave(manager, config, class_names),
        start_step=start_step, controls=controls, checkpoint_dir=checkpointing.checkpoint_dir(workdir),
        agree=checkpointing.any_process)

    step_fn, eval_fn = compile_steps(config, mesh, tx, learning_rate_fn, state_shardings)

    writer = metrics.MetricsWriter(workdir, enabled=jax.process_index() == 0, resume_step=start_step)
    logging.info("Training %s (width %g, %d classes) for %d steps (%d per epoch), global batch %d on %d devices, "
                 "mesh %s", config.model.variant, config.model.width, config.model.num_classes, total_steps,
                 steps_per_epoch, config.batch_size, jax.device_count(), dict(mesh.shape))

    # Resolved once: a rollback's new stream keeps the run's worker count.
    train_feed = pipeline.feed_options(config.data, purpose="training", images=(total_steps - start_step) *
                                       config.batch_size, global_batch_size=config.batch_size,
                                       process_count=jax.process_count())

    def batches_from(step):  # step s trains on global batch s + batch_offset (moved on only by rollbacks)
        return sharding.DevicePrefetch(pipeline.train_batches(
            train_source, start_step=step + recovery.batch_offset, **train_feed,
            global_batch_size=config.batch_size, seed=config.seed, image_size=config.data.image_size,
            resize_size=config.data.resize_size, augment=config.data.augment,
            device_crops=bool(config.data.get("device_crops", False)),
            process_index=jax.process_index(), process_count=jax.process_count()),
            mesh, int(config.data.get("device_prefetch", 0)))

    eval_passes = pipeline.eval_passes(
        eval_source, global_batch_size=eval_batch_size(config), image_size=config.data.image_size,
        resize_size=config.data.resize_size, eval_crops=config.data.eval_crops,
        process_index=jax.process_index(), process_count=jax.process_count(),
        on_device=pipeline.eval_views_on_device(eval_source, config.data, "eval"),
        **pipeline.feed_options(config.data, purpose="eval", images=len(eval_source),
                                global_batch_size=eval_batch_size(config), process_count=jax.process_count()))
    bn_examples = precise_bn.num_examples(config, len(train_source))
    precise = (precise_bn.PreciseBatchNorm(config, train_source, mesh, model_shardings_of(state_shardings),
                                           bn_examples) if bn_examples else None)
    if precise:
        logging.info("BatchNorm statistics are recomputed at the current weights over %d training examples before "
                     "each eval and save (precise_bn_examples)", bn_examples)
    profile = config_lib.profile_range(config)
    # `pending`: this log window's per-step metrics, still on the device; `ready`: finished windows (step, metrics)
    # not yet reported. Rows are fetched one log step late, when the device is long past them, so the host never
    # waits for the step it has just dispatched; before an eval or a save, which wait for the device anyway, every
    # finished window is reported, so rows and rollback checks are up to date there.
    step, last_log, last_eval, pending, ready = start_step, start_step, {}, [], []
    skipped_total = int(jax.device_get(state.skipped_steps))  # counted on the host from each row's steps
    batches, throughput = batches_from(step), metrics.Throughput(config.batch_size, step, total_steps)
    # A single process may drop an eval half-way when asked to stop; processes of a multi-process run must run
    # the same collectives, so they finish it (and a preemption notice is honoured before an eval anyway).
    abandon_eval = (lambda: preemption.signal_name is not None) if jax.process_count() == 1 else None

    def evaluate_weights(params, bn_stats, running_stats) -> dict | None:
        model_vars = {"params": params, "batch_stats": running_stats if bn_stats is None else bn_stats}
        return evaluate(eval_fn, model_vars, eval_source, config, mesh, batches=eval_passes(), abandon=abandon_eval)

    def evaluate_state(state, bn_stats, ema_bn_stats) -> dict | None:
        """The eval row of the raw weights and, with optim.ema_decay > 0, of their average beside it (eval_ema_*);
        None when a stop request abandoned it."""
        row = evaluate_weights(state.params, bn_stats, state.batch_stats)
        if row is None or state.ema_params is None:
            return row
        ema = evaluate_weights(state.ema_params, ema_bn_stats, state.batch_stats)
        return None if ema is None else {**row, **{key.replace("eval_", "eval_ema_"): value
                                                   for key, value in ema.items() if key != "eval_examples"}}

    def report(window_step, window):
        """Writes and logs the row of the window ending at `window_step`; returns the spike detector's verdict."""
        nonlocal skipped_total
        window = jax.device_get(window)
        row = metrics.summarize_window(window, layer_names)
        row["img_per_s"], eta = throughput.update(window_step)
        row["input_wait_fraction"] = input_wait.pop(window_step, 0.0)
        if flops.per_step and flops.peak:
            row["mfu"] = flops.per_step * row["img_per_s"] / config.batch_size / (flops.peak * 1e12)
        input_bound.check(row["input_wait_fraction"])
        skipped_total += sum(bool(m["skipped"]) for m in window)
        row["skipped_steps"] = skipped_total
        row["rollbacks"] = recovery.rollbacks
        writer.write(window_step, row)
        metrics.log_train(window_step, total_steps, row, eta)
        return recovery.check(window_step, window)

    # The share of each finished log window's time (evals and saves left out) that the loop spent blocked on its
    # next batch with no step left for the device (window's last step -> share), the FLOPs of one step on one device (from the compiled step) and
    # the device's peak: the rows' input_wait_fraction and mfu. The step is compiled ahead of its first call so
    # that its cost analysis is at hand.
    input_wait, waited, set_aside, window_clock, compiled_step = {}, 0.0, 0.0, time.perf_counter(), None
    flops = types.SimpleNamespace(per_step=None, peak=utilization.peak_tflops(jax.devices()[0].device_kind))
    input_bound = metrics.InputBoundWarning(config.data, train_feed["workers"])
    step_metrics = None
    try:
        while step < total_steps:
            if profile and step == profile[0]:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
            asked = time.perf_counter()
            batch = next(batches)
            # Waiting costs only once the device has run out of work: while it still runs a step dispatched
            # earlier (asynchronous dispatch), the host fetching the next batch is the overlap we want. So a wait
            # counts when the last step is done by the time the batch arrives (all of it: when in the wait the
            # device went idle is unknown).
            if step_metrics is None or step_metrics["train_loss"].is_ready():
                waited += time.perf_counter() - asked
            if compiled_step is None:
                with throughput.paused() as compiling:  # kept out of the first row's img/s and ETA
                    compiled_step = step_fn.lower(state, batch).compile()
                set_aside += compiling.seconds  # and out of its input_wait_fraction's time
                logging.info("Compiled the train step in %.1f s (left out of the first row's img/s and ETA)",
                             compiling.seconds)
                flops.per_step = utilization.step_flops(compiled_step)
            state, step_metrics = compiled_step(state, batch)
            step += 1
            if profile and step == profile[1]:
                jax.block_until_ready(state)  # the trace must hold the device work, not just its dispatch
                jax.profiler.stop_trace()
                logging.info("Profile of steps %d-%d in %s (tensorboard --logdir %s)", profile[0] + 1, step,
                             os.path.join(workdir, "profile"), workdir)
            last = step == total_steps
            log_now = step % config.log_every_steps == 0 or last
            if not (log_now and step // layer_stats_every != last_log // layer_stats_every):
                del step_metrics["layer_grad_norms"]  # computed for free, fetched only every layer_stats_every
            pending.append(step_metrics)
            if log_now:
                ready, pending, last_log = [*ready, (step, pending)], [], step
                now = time.perf_counter()
                input_wait[step] = min(1.0, waited / max(now - window_clock - set_aside, 1e-9))
                waited, set_aside, window_clock = 0.0, 0.0, now
            throughput.poll(ready)  # a window is timed when its steps are done, not when its row is fetched
            # A stop request is honoured before an eval, so a preemption notice never waits for one.
            stop_reason = preemption.reason(step, log_now)
            evaluated = not stop_reason and (step % eval_every == 0 or last)
            # Every eval is followed by a checkpoint, so the best-eval_top1 one is kept whatever the cadences.
            saving = bool(stop_reason) or evaluated or step % config.checkpoint_every_steps == 0 or last
            due, ready = (ready, []) if saving else (ready[:-1], ready[-1:])
            verdict = None
            for window_step, window in due:
                verdict = report(window_step, window)
                if verdict is not None:
                    break
            if verdict is not None:
                state = recovery.rollback(state, step, verdict)  # raises TrainingStopped past the limit
                restored_step = int(jax.device_get(state.step))
                skipped_total = int(jax.device_get(state.skipped_steps))
                writer.write(step, {"rollbacks": recovery.rollbacks, "rollback_reason": verdict,
                                    "rolled_back_to": restored_step})
                step = last_log = restored_step  # rows of the replayed steps are written again
                pending, ready, input_wait, waited, set_aside = [], [], {}, 0.0, 0.0
                window_clock = time.perf_counter()
                batches.close()
                batches = batches_from(step)
                throughput = metrics.Throughput(config.batch_size, step, total_steps)
                if not stop_reason:
                    continue
                # Stopping right after a rollback: the restored checkpoint (its controls re-saved) is where a
                # rerun resumes, unless training went on from the spike, which no checkpoint holds yet.
                evaluated, saving = False, step not in manager.all_steps()
            aside_from = time.perf_counter()  # evals and saves are no part of a window's training time
            bn_stats = ema_bn_stats = None
            if precise and (evaluated or saving):
                with throughput.paused():  # what is evaluated and saved must hold statistics of these weights
                    bn_stats = precise(state.params, state.batch_stats)
                    if state.ema_params is not None:
                        ema_bn_stats = precise(state.ema_params, state.batch_stats)
            if evaluated:
                with throughput.paused() as pause:
                    last_eval = evaluate_state(state, bn_stats, ema_bn_stats)
                if last_eval is None:  # stopped half-way: save the step without an eval, then stop
                    logging.info("Eval at step %d abandoned on %s", step, preemption.signal_name)
                    last_eval, evaluated, stop_reason = {}, False, preemption.signal_name
                else:
                    writer.write(step, last_eval)
                    metrics.log_eval(step, last_eval, pause.seconds)
            if saving or stop_reason:
                with throughput.paused():
                    if saving:
                        save_checkpoint(manager, state, config, class_names, last_eval if evaluated else None,
                                        bn_stats, ema_bn_stats)
                    writer.flush()  # the rows up to a checkpoint must outlive a kill (on GCS they are uploaded whole)
            set_aside += time.perf_counter() - aside_from
            if stop_reason:
                checkpointing.wait(manager)
                raise Preempted(f"stopped at step {step} on {stop_reason}: checkpoint saved in "
                                f"{checkpointing.checkpoint_dir(workdir)}; rerun the same command to resume",
                                preemption.signal_name)
        if start_step >= total_steps:
            logging.info("Nothing to do: the checkpoint in %s is already at step %d of %d", workdir, start_step,
                         total_steps)
        checkpointing.wait(manager)  # a failed final save is reported, not announced as the final checkpoint
        _log_done(manager, workdir, step, best_metric)
    finally:
        preemption.close()
        batches.close()
        eval_passes.close()
        if precise:
            precise.close()
        try:
            checkpointing.close(manager)
        finally:
            writer.close()
    return last_eval
