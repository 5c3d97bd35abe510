"""Training and evaluation: a pure, jitted train step and the loop that feeds it.

A batch's path: grain yields this process's uint8 slice (data/pipeline.py) -> `sharding.host_to_global` makes
it one global array sharded over 'data' -> `train_step` normalises/flips it on the device, runs the model, and
applies the optax update. Metrics stay on the device until a log step, so the host never waits on the step.
"""

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx

from alexnet_jax import checkpointing, metrics, models, optim, sharding
from alexnet_jax.data import pipeline, sources, transforms


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    skipped_steps: jax.Array  # steps whose loss or gradient was not finite and were not applied


def train_step(state: TrainState, batch: dict, *, graphdef, tx, learning_rate_fn, dropout_key, dtype,
               flip: bool):
    """One SGD step. Pure: (state, global batch) -> (new state, metrics); randomness is fold_in(key, step)."""
    flip_key, drop_key = jax.random.split(jax.random.fold_in(dropout_key, state.step))
    images = transforms.random_flip(batch["image"], flip_key) if flip else batch["image"]
    images = transforms.normalize(images, dtype)

    def loss_fn(params):
        model = nnx.merge(graphdef, params, state.batch_stats)
        logits = model(images, rngs=nnx.Rngs(dropout=drop_key))
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, (logits, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    grad_norm = optax.tree.norm(grads)  # before clipping: the number that shows an explosion coming
    # A non-finite loss or gradient would poison params and momentum for good; keep the old ones instead.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
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
        "grad_norm": grad_norm,
        "learning_rate": learning_rate_fn(state.step),
    }
    return new_state, step_metrics


def eval_step(model_vars: dict, batch: dict, *, graphdef, dtype):
    """Sums (not means) over the real rows of a padded batch, so the totals are exact over the whole split."""
    model = nnx.merge(graphdef, model_vars["params"], model_vars["batch_stats"])
    logits = model(transforms.normalize(batch["image"], dtype))
    labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    return {
        "loss": jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels) * mask),
        "top1": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
        "top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
        "count": jnp.sum(mask),
    }


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


def create_train_state(config, tx, abstract_state: TrainState) -> TrainState:
    """Initialise directly into the mesh layout: no device ever holds a full replica it should not."""
    shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
    return jax.jit(_init_fn(config.model, tx), out_shardings=shardings)(jax.random.key(config.seed))


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
            resize_size=config.data.resize_size, process_index=jax.process_index(),
            process_count=jax.process_count(), workers=config.data.workers):
        sums = eval_fn(model_vars, sharding.host_to_global(local_batch, mesh))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {"eval_loss": float(totals["loss"]) / count, "eval_top1": float(totals["top1"]) / count,
            "eval_top5": float(totals["top5"]) / count, "eval_examples": int(count)}


def _mean_metrics(pending: list[dict]) -> dict:
    stacked = jax.device_get(pending)  # the only host sync between log steps
    return {k: float(sum(m[k] for m in stacked) / len(stacked)) for k in stacked[0]}


def compile_steps(config, mesh, tx, learning_rate_fn, state_shardings):
    """The jitted (train_step, eval_step) with explicit shardings; the train state is donated."""
    train_def, eval_def = model_graphdefs(config.model)
    dtype = jnp.dtype(config.model.dtype)
    step_fn = jax.jit(
        functools.partial(train_step, graphdef=train_def, tx=tx, learning_rate_fn=learning_rate_fn,
                          dropout_key=jax.random.fold_in(jax.random.key(config.seed), 1), dtype=dtype,
                          flip=config.data.random_flip),
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0)
    model_shardings = {"params": state_shardings.params, "batch_stats": state_shardings.batch_stats}
    eval_fn = jax.jit(functools.partial(eval_step, graphdef=eval_def, dtype=dtype),
                      in_shardings=(model_shardings, sharding.batch_sharding(mesh)),
                      out_shardings=sharding.replicated(mesh))
    return step_fn, eval_fn


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming from the newest checkpoint in workdir), evaluates, checkpoints; returns the last eval."""
    mesh = sharding.create_mesh(config.mesh.model)
    train_source = sources.create_source(config.data, "train", config.model.num_classes, config.seed)
    eval_source = sources.create_source(config.data, "eval", config.model.num_classes, config.seed)
    steps_per_epoch = pipeline.steps_per_epoch(len(train_source), config.batch_size)
    total_steps = num_train_steps(config, len(train_source))
    eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch

    learning_rate_fn = optim.create_learning_rate_fn(config.optim, steps_per_epoch, total_steps)
    tx = optim.create_optimizer(config.optim, learning_rate_fn)
    abstract_state = abstract_train_state(config, mesh, tx)
    state_shardings = jax.tree.map(lambda x: x.sharding, abstract_state)

    manager = checkpointing.create_manager(workdir, config.max_checkpoints_to_keep)
    latest = manager.latest_step()
    if latest is None:
        state = create_train_state(config, tx, abstract_state)
    else:
        state = checkpointing.restore_train_state(manager, latest, abstract_state)
        logging.info("Resumed from %s at step %d", checkpointing.checkpoint_dir(workdir), latest)
    start_step = int(jax.device_get(state.step))

    step_fn, eval_fn = compile_steps(config, mesh, tx, learning_rate_fn, state_shardings)

    writer = metrics.MetricsWriter(workdir, enabled=jax.process_index() == 0)
    class_names = train_source.class_names
    logging.info("Training %s (width %g) for %d steps (%d per epoch), global batch %d on %d devices, mesh %s",
                 config.model.variant, config.model.width, total_steps, steps_per_epoch, config.batch_size,
                 jax.device_count(), dict(mesh.shape))
    batches = pipeline.train_batches(
        train_source, start_step=start_step, workers=config.data.workers, global_batch_size=config.batch_size,
        seed=config.seed, image_size=config.data.image_size, resize_size=config.data.resize_size,
        process_index=jax.process_index(), process_count=jax.process_count())
    throughput = metrics.Throughput(config.batch_size, start_step, total_steps)
    pending, last_eval = [], {}
    for step in range(start_step + 1, total_steps + 1):
        state, step_metrics = step_fn(state, sharding.host_to_global(next(batches), mesh))
        pending.append(step_metrics)
        last = step == total_steps
        if step % config.log_every_steps == 0 or last:
            row = _mean_metrics(pending)
            pending = []
            row["img_per_s"], eta = throughput.update(step)
            row["skipped_steps"] = int(jax.device_get(state.skipped_steps))
            writer.write(step, row)
            metrics.log_train(step, total_steps, row, eta)
        if step % eval_every == 0 or last:
            last_eval = evaluate(eval_fn, {"params": state.params, "batch_stats": state.batch_stats},
                                 eval_source, config, mesh)
            writer.write(step, last_eval)
            metrics.log_eval(step, last_eval)
        if step % config.checkpoint_every_steps == 0 or last:
            checkpointing.save(manager, state, config, class_names)
    if start_step >= total_steps:
        logging.info("Nothing to do: the checkpoint in %s is already at step %d of %d", workdir, start_step,
                     total_steps)
    manager.wait_until_finished()
    manager.close()
    writer.close()
    return last_eval
