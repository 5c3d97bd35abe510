"""BatchNorm statistics recomputed at the current weights (precise_bn.py): what they are, where they are used,
and that computing them changes nothing about training."""

import functools
import json
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from alexnet_jax import checkpointing, models, precise_bn, sharding, train
from alexnet_jax.data import pipeline, sources, transforms
from conftest import REPO, random_model_vars, run_cli, tiny_config


def test_first_layer_statistics_are_the_population_moments_of_its_input():
    """bn1's input depends on conv1 alone, so its population moments can be computed directly from every image
    of the set at once; the pooled per-batch moments must equal them (not, e.g., the mean of batch variances)."""
    config = tiny_config(source="digits", variant="bn", batch_size=16, precise_bn_examples=48)
    source = sources.create_source(config.data, "train", 10, config.seed)
    mesh = sharding.create_mesh(1)
    model_vars = jax.device_put(random_model_vars(config.model), sharding.replicated(mesh))
    count = precise_bn.num_examples(config, len(source))
    assert count == 48
    compute = precise_bn.PreciseBatchNorm(config, source, mesh, jax.tree.map(lambda _: sharding.replicated(mesh),
                                                                             model_vars), count)
    try:
        stats = compute(model_vars["params"], model_vars["batch_stats"])
        again = compute(model_vars["params"], model_vars["batch_stats"])  # the next pass: the same set again
    finally:
        compute.close()
    jax.tree.map(np.testing.assert_array_equal, again, stats)

    ds = pipeline.stats_dataset(source, num_examples=count, global_batch_size=16, seed=config.seed,
                                image_size=64, resize_size=64)
    images = np.concatenate([ds[i]["image"] for i in range(len(ds))])
    assert images.shape == (48, 64, 64, 3)
    model = nnx.merge(models.model_graphdefs(config.model)[1], model_vars["params"], model_vars["batch_stats"])
    x = np.asarray(model.conv1(transforms.normalize(jnp.asarray(images), jnp.float32)), np.float64)
    want_mean, want_var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(stats["bn1"]["mean"], want_mean, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(stats["bn1"]["var"], want_var, rtol=2e-5, atol=1e-6)
    # The mean of the batches' variances misses the spread of their means: here by ~2e-4, ten times the tolerance.
    batch_vars = x.reshape(3, 16, *x.shape[1:]).var(axis=(1, 2, 3)).mean(axis=0)
    assert np.max(np.abs(batch_vars - want_var) / want_var) > 1e-4
    # Same weights, same set: the same statistics again; and every layer's are finite and shaped as the running.
    for name, layer in stats.items():
        assert layer["var"].shape == model_vars["batch_stats"][name]["var"].shape
        assert np.all(np.isfinite(layer["var"])) and np.all(np.asarray(layer["var"]) >= 0)


def test_models_without_batchnorm_and_zero_examples_compute_nothing():
    assert precise_bn.num_examples(tiny_config(variant="owt"), 1000) == 0
    assert precise_bn.num_examples(tiny_config(variant="bn", precise_bn_examples=0), 1000) == 0
    # At most the training set, in whole global batches.
    assert precise_bn.num_examples(tiny_config(variant="bn", batch_size=16, precise_bn_examples=4096), 100) == 96


def _checkpoint_model_vars(workdir, step):
    """(running averages, recomputed statistics) of the checkpoint at `step`, with its params."""
    manager = checkpointing.create_manager(str(workdir), read_only=True)
    try:
        config = ml_collections.ConfigDict(checkpointing.restore_meta(manager, step)["config"])
        replicated = sharding.replicated(sharding.create_mesh(1))
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                              models.abstract_model_vars(config.model))
        running = manager.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(target))).model
        precise = checkpointing.restore_precise_bn(manager, step, target["batch_stats"])
    finally:
        manager.close()
    return config, running, precise


def _batch_mode_eval(config, model_vars):
    """eval_top1 and eval_loss with every eval batch normalised by its own statistics (BatchNorm as in training,
    dropout off): what the weights can do, free of any population statistics."""
    train_def, _ = models.model_graphdefs(config.model)

    def step(mv, batch):
        model = nnx.merge(train_def, mv["params"], mv["batch_stats"])
        model.set_attributes(deterministic=True)
        log_probs = jax.nn.log_softmax(model(transforms.normalize(batch["image"], jnp.float32)))
        mask = batch["mask"]
        return {"loss": -jnp.sum(jnp.take_along_axis(log_probs, batch["label"][:, None], -1)[:, 0] * mask),
                "top1": jnp.sum((log_probs.argmax(-1) == batch["label"]) * mask), "top5": jnp.sum(mask),
                "count": jnp.sum(mask)}

    source = sources.create_source(config.data, "eval", config.model.num_classes, config.seed)
    return train.evaluate(jax.jit(step), model_vars, source, config, sharding.create_mesh(1))


def _eval_rows(workdir):
    return [row for line in open(workdir / "metrics.jsonl") if "eval_top1" in (row := json.loads(line))]


def test_a_run_whose_running_averages_lag_is_evaluated_at_its_real_accuracy(tmp_path):
    """A high constant rate moves the weights faster than BatchNorm's ~10-step running averages follow: the
    running statistics evaluate at chance with a huge loss, while the recomputed ones give what the weights
    achieve with batch statistics. evaluate reads the same statistics back from the checkpoint."""
    workdir = tmp_path / "run"
    args = [f"--workdir={workdir}", "--config=configs/digits.py", "--config.num_train_steps=60",
            "--config.eval_every_steps=60", "--config.optim.schedule=constant", "--config.optim.learning_rate=0.3",
            "--config.optim.warmup_steps=0"]
    result = run_cli("alexnet_jax.main", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "recomputed at the current weights over 512 training examples" in result.stderr
    trained = _eval_rows(workdir)[-1]

    config, running, precise = _checkpoint_model_vars(workdir, 60)
    assert precise is not None
    batch_mode = _batch_mode_eval(config, running)
    from_running = train.evaluate(
        jax.jit(functools.partial(train.eval_step, graphdef=models.model_graphdefs(config.model)[1],
                                  **train.eval_view_options(config))),
        running, sources.create_source(config.data, "eval", 10, config.seed), config, sharding.create_mesh(1))
    assert trained["eval_top1"] == pytest.approx(batch_mode["eval_top1"], abs=0.05), (trained, batch_mode)
    assert trained["eval_loss"] == pytest.approx(batch_mode["eval_loss"], rel=0.1), (trained, batch_mode)
    # The lag it fixes: how far the running averages trail depends on the trajectory, which float32 rounding of
    # this chaotic run changes with the CPU's vector width (143 against 1.88 with AVX-512, 2.58 against 2.10 with
    # XLA held to AVX2); they never do better than statistics of the weights themselves.
    assert from_running["eval_loss"] > trained["eval_loss"], (from_running, trained)

    evaluated = run_cli("alexnet_jax.evaluate", f"--workdir={workdir}", "--config=configs/digits.py", "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert again["eval_top1"] == pytest.approx(trained["eval_top1"], abs=1e-6)
    assert again["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-5)


ARGS = ["--config=configs/digits.py", "--config.model.width=0.0625", "--config.batch_size=16",
        "--config.log_every_steps=1", "--config.eval_every_steps=1000", "--config.num_train_steps=30",
        "--config.model.dropout_rate=0.0"]


def _losses(workdir):
    losses = {}
    for line in open(workdir / "metrics.jsonl"):
        row = json.loads(line)
        if "train_loss" in row:
            losses[row["step"]] = row["train_loss"]
    return losses


def test_training_does_not_depend_on_where_statistics_were_computed(tmp_path):
    """Statistics computed at a SIGTERM stop-save, then again after the resume, leave the trajectory exactly as
    one computed only at the end: their reader is not the training stream."""
    straight = tmp_path / "straight"
    assert run_cli("alexnet_jax.main", f"--workdir={straight}", *ARGS,
                   "--config.checkpoint_every_steps=1000").returncode == 0
    want = _losses(straight)
    assert sorted(want) == list(range(1, 31))

    stopped = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "alexnet_jax.main", f"--workdir={stopped}", *ARGS,
                             "--config.checkpoint_every_steps=1000"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = stopped / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 4):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 143, output[-3000:]
    stop_step = max(int(p.name) for p in (stopped / "checkpoints").iterdir() if p.name.isdigit())
    assert checkpointing.has_precise_bn(checkpointing.create_manager(str(stopped), read_only=True), stop_step)
    resumed = run_cli("alexnet_jax.main", f"--workdir={stopped}", *ARGS, "--config.checkpoint_every_steps=1000")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = _losses(stopped)
    assert sorted(got) == list(range(1, 31))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    # The final statistics are those of the same final weights: equal whichever way the run got there.
    _, _, a = _checkpoint_model_vars(straight, 30)
    _, _, b = _checkpoint_model_vars(stopped, 30)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a, b)


def test_checkpoints_without_recomputed_statistics_load_with_the_running_averages(tmp_path):
    """precise_bn_examples=0 (or a checkpoint written before they existed): no `bn` item, and inference uses
    the running averages the model item holds."""
    workdir = tmp_path / "run"
    config = tiny_config(source="digits", variant="bn", precise_bn_examples=0, num_train_steps=2)
    train.train_and_evaluate(config, str(workdir))
    _, running, precise = _checkpoint_model_vars(workdir, 2)
    assert precise is None
    _, _, loaded, _ = checkpointing.load_for_inference(str(workdir))
    jax.tree.map(np.testing.assert_array_equal, loaded["batch_stats"], running["batch_stats"])


def test_a_rollback_resave_keeps_the_statistics_of_both_weights(tmp_path):
    """A rollback rewrites the checkpoint it restores with new controls; its weights are unchanged, so the
    statistics recomputed for them (and for their average) must survive the rewrite, not fall back to the
    running averages."""
    from alexnet_jax import optim, stability

    config = tiny_config(variant="bn", **{"optim.ema_decay": 0.9})
    tx = train.create_optimizer(config.optim, optim.create_learning_rate_fn(config.optim, 1, 10))
    abstract = train.abstract_train_state(config, sharding.create_mesh(), tx)
    state = train.create_train_state(config, tx, abstract)
    state = state.replace(step=jnp.asarray(2, jnp.int32))
    marked = lambda value: jax.tree.map(lambda x: jnp.full_like(x, value), state.batch_stats)
    manager = checkpointing.create_manager(str(tmp_path))
    names = [str(i) for i in range(10)]
    checkpointing.save(manager, state, config, names, {"eval_top1": 0.5}, marked(3.0), marked(5.0))
    checkpointing.wait(manager)
    train._resave(manager, config, names)(stability.set_controls(state, lr_scale=0.5, rollbacks=1))
    manager.close()
    for weights, value in (("raw", 3.0), ("ema", 5.0)):
        _, _, loaded, _ = checkpointing.load_for_inference(str(tmp_path), 2, weights=weights)
        assert all(np.all(np.asarray(leaf) == value) for leaf in jax.tree.leaves(loaded["batch_stats"])), weights
