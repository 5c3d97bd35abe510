"""The gradient-explosion guard: clipping, the non-finite-step guard, the spike detector, rollback and stop."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from alexnet_jax import checkpointing, config as config_lib, optim, sharding, stability, train
from alexnet_jax.data import pipeline, sources
from conftest import run_cli, tiny_config

LR = 0.05


@pytest.fixture(scope="module")
def stepper():
    """One compiled step of a tiny owt model (plain SGD: no momentum, no decay, no dropout), its initial state
    and a fixed batch. Clipping and the learning-rate factor are runtime state, so every test shares the one
    compile."""
    config = tiny_config(**{"model.dropout_rate": 0.0, "optim.learning_rate": LR, "optim.momentum": 0.0,
                            "optim.weight_decay": 0.0})
    mesh = sharding.create_mesh(1)
    lr_fn = optim.create_learning_rate_fn(config.optim, steps_per_epoch=4, num_train_steps=4)
    tx = train.create_optimizer(config.optim, lr_fn)
    abstract = train.abstract_train_state(config, mesh, tx)
    initial = train.create_train_state(config, tx, abstract)
    step_fn, _ = train.compile_steps(config, mesh, tx, lr_fn, jax.tree.map(lambda x: x.sharding, abstract))
    src = sources.SyntheticSource(config.batch_size, 64, 10, seed=3)
    local = next(pipeline.train_batches(src, global_batch_size=config.batch_size, seed=0, image_size=64,
                                        resize_size=64))
    batch = sharding.host_to_global(local, mesh)
    fresh = lambda **controls: stability.set_controls(jax.tree.map(jnp.copy, initial), **controls)
    return fresh, step_fn, batch


def _update_norm(new_params, old_params):
    return float(optim.global_norm(jax.tree.map(jnp.subtract, jax.device_get(new_params), old_params)))


def test_clipping_bounds_the_update_norm_at_a_runtime_threshold(stepper):
    fresh, step_fn, batch = stepper
    state = fresh(clip_norm=0.0)
    before = jax.device_get(state.params)
    state, m = step_fn(state, batch)
    grad_norm = float(m["grad_norm"])
    assert _update_norm(state.params, before) == pytest.approx(LR * grad_norm, rel=1e-3)
    assert not bool(m["clipped"])
    assert float(m["update_ratio"]) == pytest.approx(
        LR * grad_norm / float(optim.global_norm(before)), rel=1e-3)

    for clip_norm in (grad_norm / 10, grad_norm / 1000):  # same compiled step, new threshold
        state = fresh(clip_norm=clip_norm)
        state, m = step_fn(state, batch)
        assert bool(m["clipped"]) and float(m["grad_norm"]) == pytest.approx(grad_norm, rel=1e-5)  # pre-clip
        assert _update_norm(state.params, before) == pytest.approx(LR * clip_norm, rel=1e-3)

    state = fresh(clip_norm=grad_norm / 10, lr_scale=0.5)  # a rollback's learning-rate factor
    state, m = step_fn(state, batch)
    assert _update_norm(state.params, before) == pytest.approx(0.5 * LR * grad_norm / 10, rel=1e-3)
    assert float(m["learning_rate"]) == pytest.approx(0.5 * LR)


def test_a_nan_in_one_batch_is_skipped_with_params_unchanged(stepper):
    fresh, step_fn, batch = stepper
    state = fresh()
    before = jax.device_get((state.params, state.opt_state))
    poisoned = dict(batch, image=batch["image"].astype(jnp.float32).at[3, 10, 10, 0].set(jnp.nan))
    state, m = step_fn(state, poisoned)
    assert bool(m["skipped"]) and not np.isfinite(float(m["train_loss"]))
    assert int(state.skipped_steps) == 1 and int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get((state.params, state.opt_state)), before)
    state, m = step_fn(state, batch)  # the next clean batch trains as usual
    assert not bool(m["skipped"]) and int(state.skipped_steps) == 1
    assert _update_norm(state.params, before[0]) > 0


def test_spike_detector_fires_on_a_spike_and_not_on_noise():
    rng = np.random.default_rng(0)
    detector = stability.SpikeDetector(factor=2.0, window=10, min_delta=0.5)
    # A decaying loss with +-10% noise, as log rows of a healthy run look: never fires.
    for i in range(200):
        loss = 2.3 * np.exp(-i / 40) + 0.05
        assert detector.update(loss * (1 + 0.1 * rng.standard_normal())) is None, i
    # Tiny late losses tripling is still noise in absolute terms: min_delta keeps it quiet.
    assert detector.update(0.2) is None
    reason = detector.update(3.0)
    assert reason is not None and "running median" in reason
    assert detector.update(3.0) is not None  # a spike does not become the new normal
    assert detector.update(0.06) is None


def test_spike_detector_fires_on_consecutive_skips_across_rows():
    detector = stability.SpikeDetector(max_consecutive_skips=5)
    assert detector.update(2.0, [False, True, True]) is None
    assert detector.update(float("nan"), [True, True]) is None  # 4 in a row so far
    assert "5 consecutive" in detector.update(2.0, [True, False])
    detector.forget_after(0)  # what a rollback does
    assert detector.update(2.0, [True, False, True, True, False]) is None  # scattered skips never add up


def test_spike_detector_forgets_the_rows_a_rollback_discards():
    detector = stability.SpikeDetector(factor=2.0, window=20, min_delta=0.5)
    for step, loss in enumerate([2.0, 1.9, 1.8, 1.7], start=1):
        assert detector.update(loss, step=step) is None
    for step in (5, 6, 7, 8, 9, 10, 11):  # a slow climb never trips the factor, but it drags the median up
        assert detector.update(3.0, step=step) is None
    assert detector.update(5.0, step=12) is None  # median 3.0: not a spike
    detector.forget_after(4)  # rolled back to step 4: its rows are the history again
    assert detector.update(5.0, step=5) is not None


def test_stability_config_is_validated():
    config = tiny_config(**{"stability.lr_factor": 1.5})
    with pytest.raises(config_lib.ConfigError, match="stability.lr_factor"):
        config_lib.validate(config, 1)
    config = tiny_config(**{"stability.max_rollbacks": -1})
    with pytest.raises(config_lib.ConfigError, match="stability.max_rollbacks"):
        config_lib.validate(config, 1)
    config_lib.validate(tiny_config(), 1)


def test_non_finite_state_is_never_checkpointed(tmp_path, stepper):
    fresh, _, _ = stepper
    state = fresh()
    state = state.replace(params={**state.params, "fc8": {**state.params["fc8"],
                                                          "bias": state.params["fc8"]["bias"].at[0].set(jnp.inf)}})
    manager = checkpointing.create_manager(str(tmp_path))
    assert not train.save_checkpoint(manager, state, tiny_config(), [str(i) for i in range(10)])
    manager.wait_until_finished()
    assert manager.all_steps() == []


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _assert_checkpoints_finite(workdir):
    manager = checkpointing.create_manager(workdir, read_only=True)
    for step in manager.all_steps():
        config = ml_collections.ConfigDict(checkpointing.restore_meta(manager, step)["config"])
        mesh = sharding.create_mesh(1)
        tx = train.create_optimizer(config.optim, optim.create_learning_rate_fn(config.optim, 4, 4))
        state = checkpointing.restore_train_state(manager, step, train.abstract_train_state(config, mesh, tx))
        assert bool(stability.all_finite(state)), step
    manager.close()


EXPLODING = {"optim.learning_rate": 30.0, "optim.clip_norm": 0.0, "num_train_steps": 16, "log_every_steps": 2,
             "checkpoint_every_steps": 4, "eval_every_steps": 16, "stability.max_consecutive_skips": 2,
             "stability.skip_batches": 3, "stability.layer_stats_every": 4, "model.dropout_rate": 0.0}


def test_exploding_learning_rate_rolls_back_and_recovers_at_a_lower_rate(tmp_path):
    workdir = str(tmp_path)
    config = tiny_config(**EXPLODING, **{"stability.lr_factor": 1e-3, "stability.max_rollbacks": 2})
    train.train_and_evaluate(config, workdir)
    rows = _rows(workdir)
    [event] = [r for r in rows if "rollback_reason" in r]
    assert event["rollbacks"] == 1 and event["rolled_back_to"] < event["step"]
    train_rows = [r for r in rows if "train_loss" in r]
    after = [r for r in train_rows if r["rollbacks"] == 1]
    assert after and after[-1]["step"] == 16
    assert after[-1]["learning_rate"] == pytest.approx(30.0 * 1e-3, rel=1e-5)
    assert max(r["skipped_steps"] for r in train_rows) >= 2
    for key in ("clip_fraction", "update_ratio", "max_grad_norm", "grad_norm", "skipped_steps"):
        assert key in train_rows[-1]
    assert any("grad_norm/conv1" in r and "grad_norm/fc8" in r for r in train_rows)
    _assert_checkpoints_finite(workdir)


def test_exploding_learning_rate_stops_with_exit_code_3_and_only_finite_checkpoints(tmp_path):
    workdir = tmp_path / "run"
    # digits' own recipe (bn, warmup, cosine) is what prevents the explosion: switch those off.
    # Checkpoints every 2 steps, so the rollback has one to go back to.
    overrides = [f"--config.{k}={v}" for k, v in {
        **EXPLODING, "stability.max_rollbacks": 1, "checkpoint_every_steps": 2, "model.variant": "owt",
        "model.width": 0.0625, "batch_size": 16, "optim.warmup_steps": 0, "optim.schedule": "constant"}.items()]
    result = run_cli("alexnet_jax.main", "--config=configs/digits.py", f"--workdir={workdir}", *overrides)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "stability.max_rollbacks=1" in error and "is where a rerun resumes" in error
    rows = _rows(str(workdir))
    assert [r["rollbacks"] for r in rows if "rollback_reason" in r] == [1]
    assert any(r.get("skipped_steps") for r in rows)
    assert os.listdir(workdir / "checkpoints")  # the good one is kept; those after it were deleted
    _assert_checkpoints_finite(str(workdir))

    # The rerun resumes from the good checkpoint, which predates the rollback: it must keep the rollback's
    # count (and offset and rate), so it stops at the next spike instead of granting itself another rollback.
    saved = json.loads((workdir / "checkpoints" / "rollback.json").read_text())
    assert saved["rollbacks"] == 1 and str(saved["resume_step"]) in os.listdir(workdir / "checkpoints")
    again = run_cli("alexnet_jax.main", "--config=configs/digits.py", f"--workdir={workdir}", *overrides)
    assert again.returncode == 3, again.stderr[-3000:]
    assert "Continuing after rollback 1" in again.stderr
    assert [r["rollbacks"] for r in _rows(str(workdir)) if "rollback_reason" in r] == [1]
