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


def _feed(detector, losses, start=1):
    """Feeds per-step losses; returns the steps at which the detector fired."""
    return [step for step, loss in enumerate(losses, start=start) if detector.update(step, loss) is not None]


def test_spike_detector_fires_on_an_explosion_and_not_on_noise():
    rng = np.random.default_rng(0)
    # A decaying loss with heavy-tailed per-step noise, as batches of a healthy run look: single batches several
    # times the typical loss (a hard batch) are ordinary and must never fire.
    healthy = 2.3 * np.exp(-np.arange(600) / 60) + 0.05
    healthy *= np.exp(0.4 * rng.standard_normal(600))
    healthy[[200, 350, 351, 500]] *= 8
    detector = stability.SpikeDetector()
    assert _feed(detector, healthy) == []
    # An explosion lifts every step after it: caught within `recent` steps, and it never becomes the new normal.
    fired = _feed(detector, [2.3] * 30, start=601)
    assert fired and fired[0] <= 601 + detector.recent and fired[-1] == 630


def test_spike_detector_needs_history_and_a_real_jump():
    detector = stability.SpikeDetector(min_history=50)
    assert _feed(detector, [2.3] * 20 + [5.0] * 20) == []  # too little history to judge: never fires
    detector = stability.SpikeDetector(min_history=20, min_delta=0.5)
    # Tiny late losses tripling is still noise in absolute terms: min_delta keeps it quiet.
    assert _feed(detector, [0.01] * 60 + [0.05] * 30) == []


def test_spike_detector_fires_on_consecutive_skips_whatever_the_cadence():
    detector = stability.SpikeDetector(max_consecutive_skips=5)
    flags = [False, True, True, True, True, True, False]
    fired = [step for step, skipped in enumerate(flags, start=1)
             if detector.update(step, float("nan") if skipped else 2.0, skipped) is not None]
    assert fired == [6]
    detector.forget_after(0)  # what a rollback does
    scattered = [True, False, True, True, False, True]
    assert not any(detector.update(step, 2.0, skipped) for step, skipped in enumerate(scattered, start=1))


def test_spike_detector_forgets_the_steps_a_rollback_discards():
    detector = stability.SpikeDetector(min_history=20, window=100)
    assert _feed(detector, [1.0] * 40) == []
    assert _feed(detector, [3.0] * 12, start=41)  # a spike, judged against steps 1-30
    detector.forget_after(30)  # rolled back to step 30: the steps after it are gone from the baseline
    assert _feed(detector, [1.0] * 10, start=31) == []
    assert _feed(detector, [3.0] * 12, start=41)  # the same spike replayed is caught again


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
    # Warming up to the exploding rate leaves good checkpoints behind (steps 1-4 are sane): a rollback restores
    # one. An explosion before any good checkpoint is no case for going back to initialisation (see below).
    config = tiny_config(**EXPLODING, **{"stability.lr_factor": 1e-3, "stability.max_rollbacks": 2,
                                         "optim.warmup_steps": 8})
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
    # The rollback wrote them into that checkpoint itself: there is no side file.
    [event] = [r for r in rows if "rollback_reason" in r]
    assert os.listdir(workdir / "checkpoints") == [str(event["rolled_back_to"])]
    again = run_cli("alexnet_jax.main", "--config=configs/digits.py", f"--workdir={workdir}", *overrides)
    assert again.returncode == 3, again.stderr[-3000:]
    assert "Continuing after rollback 1" in again.stderr
    assert [r["rollbacks"] for r in _rows(str(workdir)) if "rollback_reason" in r] == [1]


def test_healthy_run_logged_every_step_never_rolls_back(tmp_path):
    """Issue 11.10's run: digits at a constant 0.05 with a row per step rolled back three times in ~450 steps
    on ordinary batch noise (single batches 6x the running median). 500 steps (single losses up to ~28x the
    median after step 100 here): not once."""
    workdir = tmp_path / "run"
    result = run_cli("alexnet_jax.main", "--config=configs/digits.py", f"--workdir={workdir}",
                     "--config.num_train_steps=500", "--config.log_every_steps=1", "--config.optim.schedule=constant",
                     "--config.optim.learning_rate=0.05", "--config.eval_every_steps=500")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(str(workdir))
    train_rows = [r for r in rows if "train_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 501))
    losses = np.array([r["train_loss"] for r in train_rows[100:]])
    assert losses.max() > 5 * np.median(losses)  # the noise that used to fire is there...
    assert not any("rollback_reason" in r for r in rows) and train_rows[-1]["rollbacks"] == 0  # ...and ignored
    assert "Rollback" not in result.stderr


def test_explosion_before_any_good_checkpoint_goes_on_instead_of_restarting(tmp_path):
    """No checkpoint has passed the detector: restarting from initialisation would throw away the run, so the
    guard skips batches and lowers the rate where it is. Here the parameters are past saving, so it stops."""
    workdir = str(tmp_path)
    config = tiny_config(**EXPLODING, **{"stability.max_rollbacks": 1})
    with pytest.raises(stability.TrainingStopped, match="no checkpoint passed the detector"):
        train.train_and_evaluate(config, workdir)
    rows = _rows(workdir)
    [event] = [r for r in rows if "rollback_reason" in r]
    assert event["rolled_back_to"] == event["step"]  # went on from the spike, not back to step 0
    steps = [r["step"] for r in rows if "train_loss" in r]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # nothing replayed from the start
