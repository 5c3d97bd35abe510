"""Training and evaluation: a pure, jitted train step and the loop that feeds it.

A batch's path: grain yields this process's uint8 slice (data/pipeline.py) -> `sharding.host_to_global` makes
it one global array sharded over 'data' -> `train_step` normalises/flips it on the device, runs the model, and
applies the optax update. Metrics stay on the device until a log step, so the host never waits on the step.
The step refuses non-finite updates on the device; at log steps `stability.Recovery` judges the row and may roll
back to a good checkpoint (see stability.py).
"""

import functools
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx

from alexnet_jax import checkpointing, metrics, models, optim, sharding, stability
from alexnet_jax import config as config_lib
from alexnet_jax.data import pipeline, sources, transforms


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    skipped_steps: jax.Array  # steps whose loss or gradient was not finite and were not applied


def train_step(state: TrainState, batch: dict, *, graphdef, tx, learning_rate_fn, dropout_key, dtype,
               flip: bool, lighting_std: float):
    """One SGD step. Pure: (state, global batch) -> (new state, metrics); randomness is fold_in(key, step).

    `tx` comes from `create_optimizer`: clip threshold and learning-rate factor are scalars in its state."""
    flip_key, lighting_key, drop_key = jax.random.split(jax.random.fold_in(dropout_key, state.step), 3)
    images = transforms.random_flip(batch["image"], flip_key) if flip else batch["image"]
    if lighting_std > 0:
        images = transforms.pca_lighting(images, lighting_key, lighting_std)
    images = transforms.normalize(images, dtype)

    def loss_fn(params):
        model = nnx.merge(graphdef, params, state.batch_stats)
        logits = model(images, rngs=nnx.Rngs(dropout=drop_key))
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, (logits, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    stats = stability.step_stats(grads, updates, state.params, state.opt_state)  # grad norms are pre-clip
    # A non-finite loss, gradient or update would poison params and momentum for good; keep the old ones instead.
    finite = jnp.isfinite(loss) & jnp.isfinite(stats["grad_norm"]) & jnp.isfinite(stats.pop("update_norm"))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(optax.apply_updates(state.params, updates), state.params),
        batch_stats=keep(batch_stats, state.batch_stats),
        opt_state=keep(opt_state, state.opt_state),
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
    )
    step_metrics = {
        "train_loss": loss,
        "train_top1": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
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


def eval_step(model_vars: dict, batch: dict, *, graphdef, **view_options):
    """Sums (not means) over the real rows of a padded batch, so the totals are exact over the whole split."""
    log_probs = eval_log_probs(model_vars, batch["image"], graphdef=graphdef, **view_options)
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
    return {"dtype": jnp.dtype(config.model.dtype), "eval_crops": int(config.data.eval_crops),
            "image_size": int(config.data.image_size)}


def model_graphdefs(model_config):
    """(train, eval) graph definitions; the train/eval switch is static structure, so each compiles once."""
    model = nnx.eval_shape(lambda: models.create_model(model_config, rngs=nnx.Rngs(0)))
    model.train()
    train_def = nnx.graphdef(model)
    model.eval()
    return train_def, nnx.graphdef(model)


def abstract_model_vars(model_config) -> dict:
    """Shapes and dtypes of {"params", "batch_stats"}, without allocating or initialising anything."""
    model = nnx.eval_shape(lambda: models.create_model(model_config, rngs=nnx.Rngs(0)))
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(batch_stats)}


def _init_fn(model_config, tx):
    def init(key) -> TrainState:
        model = models.create_model(model_config, rngs=nnx.Rngs(params=key))
        _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        params, batch_stats = nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                          opt_state=tx.init(params), skipped_steps=jnp.zeros((), jnp.int32))

    return init


def abstract_train_state(config, mesh, tx) -> TrainState:
    """The train state as ShapeDtypeStructs carrying their mesh shardings: the target layout for both a fresh
    initialisation and a checkpoint restore, computed without allocating anything."""
    abstract = jax.eval_shape(_init_fn(config.model, tx), jax.random.key(config.seed))
    shardings = sharding.tree_shardings(abstract, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def train_state_initializer(config, tx, abstract_state: TrainState) -> Callable[[], TrainState]:
    """() -> a fresh TrainState, initialised directly into the mesh layout (no device ever holds a full replica
    it should not); compiled on the first call only, so a rollback to initialisation costs no recompile."""
    shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
    key = jax.random.key(config.seed)
    compiled = []

    def init():
        if not compiled:
            # Initialisation runs once, so XLA:CPU's optimisation passes only cost time there: ~20 s for the
            # random initialisers alone, ~2 s without them. Accelerators compile it quickly as it is.
            fast = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
            lowered = jax.jit(_init_fn(config.model, tx), out_shardings=shardings).lower(key)
            compiled.append(lowered.compile(compiler_options=fast))
        return compiled[0](key)

    return init


def create_train_state(config, tx, abstract_state: TrainState) -> TrainState:
    return train_state_initializer(config, tx, abstract_state)()


def num_train_steps(config, train_examples: int) -> int:
    if config.num_train_steps > 0:
        return config.num_train_steps
    return config.num_epochs * pipeline.steps_per_epoch(train_examples, config.batch_size)


def eval_batch_size(config) -> int:
    return config.eval_batch_size if config.eval_batch_size > 0 else config.batch_size


def evaluate(eval_fn, model_vars, eval_source, config, mesh) -> dict:
    """Exact eval_loss / eval_top1 / eval_top5 over every example of the split, each counted once."""
    totals = None
    for local_batch in pipeline.eval_batches(
            eval_source, global_batch_size=eval_batch_size(config), image_size=config.data.image_size,
            resize_size=config.data.resize_size, eval_crops=config.data.eval_crops,
            process_index=jax.process_index(), process_count=jax.process_count(), workers=config.data.workers):
        sums = eval_fn(model_vars, sharding.host_to_global(local_batch, mesh))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {"eval_loss": float(totals["loss"]) / count, "eval_top1": float(totals["top1"]) / count,
            "eval_top5": float(totals["top5"]) / count, "eval_examples": int(count)}


def create_optimizer(optim_config, learning_rate_fn) -> optax.GradientTransformation:
    """optim.py's chain with its clipping moved into `stability.controlled`, where the threshold and a
    learning-rate factor are runtime scalars in opt_state (saved with it) instead of compiled-in constants."""
    unclipped = dict(optim_config.items(), clip_norm=0.0)
    return stability.controlled(optim.create_optimizer(unclipped, learning_rate_fn),
                                clip_norm=float(optim_config.get("clip_norm", 0.0)))


def compile_steps(config, mesh, tx, learning_rate_fn, state_shardings):
    """The jitted (train_step, eval_step) with explicit shardings; the train state is donated."""
    train_def, eval_def = model_graphdefs(config.model)
    dtype = jnp.dtype(config.model.dtype)
    step_fn = jax.jit(
        functools.partial(train_step, graphdef=train_def, tx=tx, learning_rate_fn=learning_rate_fn,
                          dropout_key=jax.random.fold_in(jax.random.key(config.seed), 1), dtype=dtype,
                          flip=config.data.random_flip, lighting_std=float(config.data.lighting_std)),
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0)
    model_shardings = {"params": state_shardings.params, "batch_stats": state_shardings.batch_stats}
    eval_fn = jax.jit(functools.partial(eval_step, graphdef=eval_def, **eval_view_options(config)),
                      in_shardings=(model_shardings, sharding.batch_sharding(mesh)),
                      out_shardings=sharding.replicated(mesh))
    return step_fn, eval_fn


class Preempted(Exception):
    """Training stopped early on request (SIGTERM, a preemption notice) after checkpointing the current step."""


def save_checkpoint(manager, state: TrainState, config, class_names, eval_metrics=None) -> bool:
    """Saves unless some value is not finite (the guard should make that impossible; this makes it certain)."""
    if not bool(jax.device_get(stability.all_finite(state))):
        logging.warning("Not checkpointing step %d: the train state holds non-finite values",
                        int(jax.device_get(state.step)))
        return False
    checkpointing.save(manager, state, config, class_names, eval_metrics)
    return True


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming from the newest checkpoint in workdir), evaluates, checkpoints; returns the last eval.

    Raises stability.TrainingStopped when the stability guard gives up (main exits with code 3).
    """
    mesh = sharding.create_mesh(config.mesh.model)
    try:
        train_source = sources.create_source(config.data, "train", config.model.num_classes, config.seed)
        eval_source = sources.create_source(config.data, "eval", config.model.num_classes, config.seed)
    except ValueError as error:  # data that contradicts the config (class count, labels): a config error
        raise config_lib.ConfigError(f"data: {error}") from None
    steps_per_epoch = pipeline.steps_per_epoch(len(train_source), config.batch_size)
    total_steps = num_train_steps(config, len(train_source))
    eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
    layer_stats_every = config.stability.layer_stats_every

    learning_rate_fn = optim.create_learning_rate_fn(config.optim, steps_per_epoch, total_steps)
    tx = create_optimizer(config.optim, learning_rate_fn)
    abstract_state = abstract_train_state(config, mesh, tx)
    state_shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
    layer_names = sorted(abstract_state.params)

    manager = checkpointing.create_manager(workdir, config.max_checkpoints_to_keep)
    try:
        state, latest = checkpointing.restore_newest_good(manager, abstract_state, config)
    except checkpointing.IncompatibleCheckpoint as error:
        manager.close()
        raise config_lib.ConfigError(str(error)) from None

    def restore(step):  # the config's clip_norm wins over the checkpoint's: a run may resume with it changed
        restored = checkpointing.restore_train_state(manager, step, abstract_state)
        return stability.set_controls(restored, clip_norm=float(config.optim.clip_norm))

    fresh = train_state_initializer(config, tx, abstract_state)
    if latest is None:
        state = fresh()
    else:
        state = stability.set_controls(state, clip_norm=float(config.optim.clip_norm))
        logging.info("Resumed from %s at step %d", checkpointing.checkpoint_dir(workdir), latest)
    after_rollback = stability.read_resume_controls(checkpointing.checkpoint_dir(workdir), latest or 0)
    if after_rollback:  # killed after a rollback and before the next save: keep what the rollback chose
        state = stability.set_controls(state, **after_rollback)
        logging.info("Continuing after rollback %d: batch offset %d, learning rate x%g",
                     after_rollback["rollbacks"], after_rollback["batch_offset"], after_rollback["lr_scale"])
    start_step = int(jax.device_get(state.step))
    recovery = stability.Recovery(
        config.stability, manager=manager, restore=restore, fresh=fresh, start_step=start_step,
        controls=stability.read_controls(state), checkpoint_dir=checkpointing.checkpoint_dir(workdir))

    step_fn, eval_fn = compile_steps(config, mesh, tx, learning_rate_fn, state_shardings)

    writer = metrics.MetricsWriter(workdir, enabled=jax.process_index() == 0, resume_step=start_step)
    class_names = train_source.class_names
    logging.info("Training %s (width %g) for %d steps (%d per epoch), global batch %d on %d devices, mesh %s",
                 config.model.variant, config.model.width, total_steps, steps_per_epoch, config.batch_size,
                 jax.device_count(), dict(mesh.shape))

    def batches_from(step):  # step s trains on global batch s + batch_offset (moved on only by rollbacks)
        return pipeline.train_batches(
            train_source, start_step=step + recovery.batch_offset, workers=config.data.workers,
            global_batch_size=config.batch_size, seed=config.seed, image_size=config.data.image_size,
            resize_size=config.data.resize_size, augment=config.data.augment,
            process_index=jax.process_index(), process_count=jax.process_count())

    step, last_log, last_eval, evaluated_at, pending = start_step, start_step, {}, -1, []
    batches, throughput = batches_from(step), metrics.Throughput(config.batch_size, step, total_steps)
    preemption = checkpointing.PreemptionWatch(manager)
    try:
        while step < total_steps:
            state, step_metrics = step_fn(state, sharding.host_to_global(next(batches), mesh))
            step += 1
            last = step == total_steps
            log_now = step % config.log_every_steps == 0 or last
            if not (log_now and step // layer_stats_every != last_log // layer_stats_every):
                del step_metrics["layer_grad_norms"]  # computed for free, fetched only every layer_stats_every
            pending.append(step_metrics)
            if log_now:
                window, pending, last_log = jax.device_get(pending), [], step  # the only sync between logs
                row = metrics.summarize_window(window, layer_names)
                row["img_per_s"], eta = throughput.update(step)
                row["skipped_steps"] = int(jax.device_get(state.skipped_steps))
                row["rollbacks"] = recovery.rollbacks
                writer.write(step, row)
                metrics.log_train(step, total_steps, row, eta)
                reason = recovery.check(step, row, window)
                if reason is not None:
                    state = recovery.rollback(state, step, reason)  # raises TrainingStopped past the limit
                    restored_step = int(jax.device_get(state.step))
                    writer.write(step, {"rollbacks": recovery.rollbacks, "rollback_reason": reason,
                                        "rolled_back_to": restored_step})
                    step = last_log = restored_step  # rows of the replayed steps are written again
                    batches = batches_from(step)
                    throughput = metrics.Throughput(config.batch_size, step, total_steps)
                    continue
            if step % eval_every == 0 or last:
                last_eval = evaluate(eval_fn, {"params": state.params, "batch_stats": state.batch_stats},
                                     eval_source, config, mesh)
                writer.write(step, last_eval)
                metrics.log_eval(step, last_eval)
                evaluated_at = step
            stop_reason = preemption.reason(step)
            if step % config.checkpoint_every_steps == 0 or last or stop_reason:
                save_checkpoint(manager, state, config, class_names, last_eval if evaluated_at == step else None)
                writer.flush()  # the rows up to a checkpoint must outlive a kill (on GCS they are uploaded whole)
            if stop_reason:
                manager.wait_until_finished()
                raise Preempted(f"stopped at step {step} on {stop_reason}: checkpoint saved in "
                                f"{checkpointing.checkpoint_dir(workdir)}; rerun the same command to resume")
        if start_step >= total_steps:
            logging.info("Nothing to do: the checkpoint in %s is already at step %d of %d", workdir, start_step,
                         total_steps)
    finally:
        preemption.close()
        manager.wait_until_finished()
        manager.close()
        writer.close()
    return last_eval
