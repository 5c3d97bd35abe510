"""The train step, the loop, checkpoints and resume, on real (tiny) models and real data."""

import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alexnet_jax import checkpointing, optim, sharding, train
from alexnet_jax.data import pipeline, sources
from conftest import tiny_config


def _setup(config):
    mesh = sharding.create_mesh(config.mesh.model)
    lr_fn = optim.create_learning_rate_fn(config.optim, steps_per_epoch=4, num_train_steps=config.num_train_steps)
    tx = train.create_optimizer(config.optim, lr_fn)
    abstract = train.abstract_train_state(config, mesh, tx)
    state = train.create_train_state(config, tx, abstract)
    step_fn, eval_fn = train.compile_steps(config, mesh, tx, lr_fn, jax.tree.map(lambda x: x.sharding, abstract))
    return mesh, state, step_fn, eval_fn


def _fixed_batch(config, mesh):
    src = sources.SyntheticSource(config.batch_size, config.data.image_size, config.model.num_classes, seed=3)
    local = next(pipeline.train_batches(src, global_batch_size=config.batch_size, seed=0,
                                        image_size=config.data.image_size, resize_size=config.data.resize_size))
    return sharding.host_to_global(local, mesh)


def read_rows(workdir, key):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r for r in rows if key in r}


def test_steps_lower_the_loss_on_a_fixed_batch():
    config = tiny_config(**{"model.dropout_rate": 0.0, "optim.learning_rate": 0.02})
    mesh, state, step_fn, _ = _setup(config)
    batch = _fixed_batch(config, mesh)
    losses = []
    for _ in range(8):
        state, m = step_fn(state, batch)
        losses.append(float(m["train_loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
    assert int(state.step) == 8 and int(state.skipped_steps) == 0


def test_step_reports_pre_clip_grad_norm_and_learning_rate():
    config = tiny_config(**{"optim.clip_norm": 1e-3, "optim.learning_rate": 0.05, "optim.momentum": 0.0,
                            "optim.weight_decay": 0.0, "model.dropout_rate": 0.0})
    mesh, state, step_fn, _ = _setup(config)
    before = jax.device_get(state.params)
    new_state, m = step_fn(state, _fixed_batch(config, mesh))
    update_norm = float(optim.global_norm(jax.tree.map(jnp.subtract, new_state.params, before)))
    # The gradient is far above the 1e-3 threshold, so the applied update is lr * clip_norm, while the reported
    # grad_norm is the larger pre-clip one.
    assert float(m["grad_norm"]) > 1e-2
    assert update_norm == pytest.approx(0.05 * 1e-3, rel=1e-3)
    assert float(m["learning_rate"]) == pytest.approx(0.05)


def test_non_finite_batch_is_skipped_with_params_unchanged():
    config = tiny_config()
    mesh, state, step_fn, _ = _setup(config)
    before = jax.device_get(state.params)
    batch = _fixed_batch(config, mesh)
    bad = dict(batch, label=jnp.full_like(batch["label"], 10**6))  # out-of-range label -> NaN cross-entropy
    state, m = step_fn(state, bad)
    assert not np.isfinite(float(m["train_loss"]))
    assert int(state.skipped_steps) == 1 and int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)


@pytest.mark.parametrize("variant", ["owt", "bn"])
def test_step_updates_the_donated_state_in_place_without_copying_it_first(variant):
    # Every read of the old params must come before their in-place update, or XLA copies all of them at the start
    # of each step (it did while the update/param ratio's read of them fed only the metrics: 6% of a CPU step).
    config = tiny_config(variant=variant)
    mesh, state, step_fn, _ = _setup(config)
    hlo = step_fn.lower(state, _fixed_batch(config, mesh)).compile().as_text()
    entry = hlo[hlo.index("\nENTRY "):]
    arrays = set(re.findall(r"%([\w.\-]+) = \w+\[\d[\d,]*\]\S* parameter\(", entry))  # non-scalar inputs
    copied = [name for name in re.findall(r" copy\(%([\w.\-]+)\)", entry) if name in arrays]
    assert len(arrays) >= len(jax.tree.leaves(state.params)), sorted(arrays)
    assert copied == [], copied


def test_eval_counts_every_example_once():
    config = tiny_config(**{"data.synthetic_examples": 76, "eval_batch_size": 8})  # eval split: 19 examples
    mesh, state, _, eval_fn = _setup(config)
    eval_source = sources.create_source(config.data, "eval", 10, config.seed)
    result = train.evaluate(eval_fn, {"params": state.params, "batch_stats": state.batch_stats}, eval_source,
                            config, mesh)
    assert result["eval_examples"] == len(eval_source) == 19
    assert 0 <= result["eval_top1"] <= result["eval_top5"] <= 1


def test_resume_continues_the_step_count_and_the_same_losses(tmp_path):
    config = tiny_config(**{"num_train_steps": 6, "checkpoint_every_steps": 3, "optim.schedule": "step",
                            "optim.decay_epochs": 1})
    straight = str(tmp_path / "straight")
    train.train_and_evaluate(config, straight)

    resumed = str(tmp_path / "resumed")
    config.num_train_steps = 3
    train.train_and_evaluate(config, resumed)
    assert checkpointing.create_manager(resumed).latest_step() == 3
    config.num_train_steps = 6
    train.train_and_evaluate(config, resumed)

    a, b = read_rows(straight, "train_loss"), read_rows(resumed, "train_loss")
    assert sorted(b) == [1, 2, 3, 4, 5, 6]  # resumed at 4, did not redo 1..3
    for step in range(1, 7):
        assert b[step]["train_loss"] == pytest.approx(a[step]["train_loss"], abs=1e-5), step
        assert b[step]["learning_rate"] == pytest.approx(a[step]["learning_rate"])
    assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["3", "6"]


def test_short_digits_run_learns(tmp_path):
    # Cosine, as the digits demo uses (the eval reads BatchNorm statistics recomputed at the final weights, so a
    # constant rate would be evaluated fairly too; see test_precise_bn).
    config = tiny_config(source="digits", variant="bn", **{
        "model.width": 0.125, "batch_size": 32, "num_train_steps": 60, "log_every_steps": 20,
        "eval_every_steps": 60, "data.random_flip": False, "optim.learning_rate": 0.05,
        "optim.schedule": "cosine"})
    result = train.train_and_evaluate(config, str(tmp_path))
    assert result["eval_examples"] == 359
    assert result["eval_top1"] > 0.6, result  # chance is 0.1; the full demo reaches >= 0.97
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))


def _run_steps(config, steps=3, batch=None):
    """(per-step (loss, top1, grad_norm), final state) of `steps` steps on one fixed batch."""
    mesh, state, step_fn, _ = _setup(config)
    batch = _fixed_batch(config, mesh) if batch is None else batch
    history = []
    for _ in range(steps):
        state, m = step_fn(state, batch)
        history.append([float(m["train_loss"]), float(m["train_top1"]), float(m["grad_norm"])])
    return np.array(history), state


def test_gradient_accumulation_matches_the_whole_batch_without_dropout_or_batchnorm():
    no_noise = {"model.dropout_rate": 0.0, "optim.learning_rate": 0.05}
    whole, whole_state = _run_steps(tiny_config(**no_noise))
    for k in (2, 4):
        accumulated, state = _run_steps(tiny_config(**no_noise, **{"optim.grad_accum_steps": k}))
        np.testing.assert_allclose(accumulated, whole, rtol=2e-5, atol=1e-6, err_msg=f"k={k}")
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     jax.device_get(state.params), jax.device_get(whole_state.params))
        # One optimizer step, one schedule step and one logged step per global batch, whatever k is.
        assert int(state.step) == 3 and int(optax.tree_utils.tree_get(state.opt_state, "count")) == 3
    assert whole[-1][0] < whole[0][0]  # the steps did train


def test_gradient_accumulation_normalises_batchnorm_per_micro_batch():
    # No dropout, flips or colour noise: they draw per batch, and this compares a split batch with its halves.
    bn = {"model.dropout_rate": 0.0, "optim.learning_rate": 0.05, "data.random_flip": False,
          "data.lighting_std": 0.0}
    config = tiny_config(variant="bn", **bn, **{"optim.grad_accum_steps": 2})
    mesh = sharding.create_mesh(1)
    batch = _fixed_batch(config, mesh)
    accumulated, _ = _run_steps(config, steps=1, batch=batch)
    # The first step's loss is the mean of each micro-batch's loss under its own BatchNorm statistics: the
    # same as a one-micro-batch step on rows 0, 2, 4, ... and on rows 1, 3, 5, ... from the same initialisation.
    half = tiny_config(variant="bn", **bn, batch_size=8)
    halves = [_run_steps(half, steps=1, batch=jax.tree.map(lambda x: x[j::2], batch))[0][0] for j in (0, 1)]
    assert accumulated[0][0] == pytest.approx((halves[0][0] + halves[1][0]) / 2, rel=1e-5)
    whole, _ = _run_steps(tiny_config(variant="bn", **bn), steps=1, batch=batch)
    assert abs(whole[0][0] - accumulated[0][0]) > 1e-4  # whole-batch statistics give another loss


def test_device_prefetch_keeps_batches_ahead_and_in_order():
    mesh = sharding.create_mesh(1)
    pulled = []

    class Local:
        def __init__(self):
            self.closed = False

        def __next__(self):
            i = len(pulled)
            if i == 5:
                raise StopIteration
            pulled.append(i)
            return {"image": np.full((2, 4, 4, 3), i, np.uint8), "label": np.full((2,), i, np.int32)}

        def close(self):
            self.closed = True

    local = Local()
    feed = sharding.DevicePrefetch(local, mesh, size=2)
    first = next(feed)
    assert int(first["label"][0]) == 0 and pulled == [0, 1, 2]  # two more already handed to the devices
    assert isinstance(first["image"], jax.Array)
    assert [int(b["label"][0]) for b in feed] == [1, 2, 3, 4]
    feed.close()
    assert local.closed


def test_training_sees_the_same_batches_whatever_the_device_prefetch(tmp_path):
    rows = {}
    for prefetch in (0, 3):
        workdir = str(tmp_path / str(prefetch))
        train.train_and_evaluate(tiny_config(**{"data.device_prefetch": prefetch}), workdir)
        rows[prefetch] = [r["train_loss"] for _, r in sorted(read_rows(workdir, "train_loss").items())]
    assert len(rows[0]) == 4 and rows[0] == rows[3]


class _SlowSource(sources.SyntheticSource):
    """Synthetic pixels read at a disk's pace: every example waits `delay` seconds (sleep: wall time, so the
    input stays the bottleneck however fast or loaded the machine)."""

    delay = 0.02

    def __getitem__(self, index):
        time.sleep(self.delay)
        return super().__getitem__(index)


@pytest.mark.parametrize("slow", [True, False])
def test_rows_report_the_share_of_time_spent_waiting_for_input(tmp_path, monkeypatch, caplog, slow):
    config = tiny_config(**{"num_train_steps": 12, "log_every_steps": 3, "data.device_prefetch": 0,
                            "model.width": 1.0 if not slow else 0.0625})
    kind = _SlowSource if slow else sources.SyntheticSource
    monkeypatch.setattr(train, "_open_sources", lambda c: (kind(64, 64, 10, 0), sources.SyntheticSource(16, 64, 10)))
    with caplog.at_level("WARNING"):
        train.train_and_evaluate(config, str(tmp_path))
    waits = [row["input_wait_fraction"] for _, row in sorted(read_rows(str(tmp_path), "train_loss").items())]
    assert len(waits) == 4 and all(0 <= w <= 1 for w in waits)
    later = waits[1:]  # the first row also holds the workers' start and the compilation
    warned = "Input-bound" in caplog.text
    if slow:  # 16 sleeps of 20 ms per batch against a step of milliseconds
        assert min(later) > 0.8 and warned, waits
    else:  # cached pixels, read ahead by grain's threads while the device still runs the steps before
        assert max(later) < 0.5 and not warned, waits


def test_first_row_leaves_out_compilation_and_auto_workers_say_why_once(tmp_path, caplog):
    """The first row once showed `1 img/s ETA 7:36`: its rate included compiling the step. And data.workers=-1
    resolves for each pipeline (training, eval, the BatchNorm statistics) in one info line each."""
    config = tiny_config(variant="bn", **{"num_train_steps": 8, "data.workers": -1, "data.device_prefetch": 0})
    with caplog.at_level("INFO", logger="absl"):
        train.train_and_evaluate(config, str(tmp_path))
    messages = [r.getMessage() for r in caplog.records]
    auto = sorted(m for m in messages if m.startswith("data.workers=-1 (auto)"))
    assert [m.split(": ")[1] for m in auto] == ["0 worker process(es) for eval", "0 worker process(es) for the "
                                                "BatchNorm statistics", "0 worker process(es) for training"], auto
    assert "128 images to decode" in auto[-1]  # 8 steps of 16
    compiled = [float(re.search(r"in ([\d.]+) s", m).group(1)) for m in messages if "Compiled the train step" in m]
    assert len(compiled) == 1, messages
    seconds = [config.batch_size / r["img_per_s"] for _, r in sorted(read_rows(str(tmp_path), "train_loss").items())]
    assert len(seconds) == 8
    # Compiling takes seconds, a step of this model milliseconds: a first row that still held the compilation
    # would take at least the compile time; without it, it is a step (plus the first batch) like the others.
    assert seconds[0] < max(compiled[0] / 2, 4 * float(np.median(seconds[1:]))), (compiled, seconds)
