"""Checkpoints under abuse: SIGKILL at a random moment, SIGTERM, a damaged newest checkpoint, best-by-eval."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_cli

ARGS = ["--config=configs/digits.py", "--config.model.width=0.0625", "--config.batch_size=16",
        "--config.log_every_steps=1", "--config.eval_every_steps=1000"]


def _losses(workdir) -> dict:
    """step -> train_loss; a step replayed after a resume keeps its last (replayed) value."""
    losses = {}
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        row = json.loads(line)
        if "train_loss" in row:
            losses[row["step"]] = row["train_loss"]
    return losses


def _start(workdir, *extra):
    return subprocess.Popen([sys.executable, "-m", "alexnet_jax.main", f"--workdir={workdir}", *ARGS, *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(workdir, proc, timeout=300):
    ckpt = os.path.join(workdir, "checkpoints")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(ckpt) and any(name.isdigit() for name in os.listdir(ckpt)):
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint appeared: {proc.communicate()[0][-2000:] if proc.poll() is not None else ''}")


def test_sigkill_then_rerun_gives_the_uninterrupted_losses(tmp_path):
    steps = ["--config.num_train_steps=40", "--config.checkpoint_every_steps=5"]
    straight = tmp_path / "straight"
    assert run_cli("alexnet_jax.main", f"--workdir={straight}", *ARGS, *steps).returncode == 0

    killed = tmp_path / "killed"
    proc = _start(killed, *steps)
    _wait_for_checkpoint(killed, proc)
    time.sleep(0.3)  # somewhere past the first checkpoint, possibly mid-save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be killed")
    result = run_cli("alexnet_jax.main", f"--workdir={killed}", *ARGS, *steps)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed" in result.stderr
    want, got = _losses(straight), _losses(killed)
    assert sorted(got) == sorted(want) == list(range(1, 41))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-5), step


def test_sigterm_checkpoints_the_current_step_and_exits(tmp_path):
    workdir = tmp_path / "run"
    proc = _start(workdir, "--config.num_train_steps=100000", "--config.checkpoint_every_steps=100000",
                  "--config.log_every_steps=1")
    deadline = time.time() + 300
    metrics = workdir / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert time.time() - sent < 60
    assert proc.returncode == 143, output[-3000:]
    assert "Preempted" in output and "rerun the same command" in output
    saved = [int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()]
    assert len(saved) == 1 and saved[0] >= 3  # the step it had reached, not a periodic one
    assert "Traceback" not in output


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    workdir = tmp_path / "run"
    steps = ["--config.num_train_steps=4", "--config.checkpoint_every_steps=2"]
    assert run_cli("alexnet_jax.main", f"--workdir={workdir}", *ARGS, *steps).returncode == 0
    newest = workdir / "checkpoints" / "4"
    for root, _, files in os.walk(newest / "model"):
        for name in files:  # truncate every data file of the newest checkpoint's model
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.truncate(max(0, os.path.getsize(path) // 3))
    result = run_cli("alexnet_jax.main", f"--workdir={workdir}", *ARGS, *steps)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cannot be restored" in result.stderr and str(newest) in result.stderr
    assert "Resumed from" in result.stderr and "at step 2" in result.stderr
    names = os.listdir(workdir / "checkpoints")
    assert "4" in names and any(n.startswith("4.corrupt-") for n in names)  # redone, and the bad one kept aside


def test_keeps_latest_and_best_by_eval(tmp_path):
    import jax

    from alexnet_jax import checkpointing, optim, sharding, train
    from conftest import tiny_config

    config = tiny_config()
    tx = train.create_optimizer(config.optim, optim.create_learning_rate_fn(config.optim, 1, 10))
    state = train.create_train_state(config, tx, train.abstract_train_state(config, sharding.create_mesh(), tx))
    manager = checkpointing.create_manager(str(tmp_path), max_to_keep=2)
    for step, top1 in enumerate([0.5, 0.9, 0.3, 0.4, 0.2], start=1):
        state = state.replace(step=jax.numpy.asarray(step, jax.numpy.int32))
        checkpointing.save(manager, state, config, ["a"] * 10, {"eval_top1": top1})
        manager.wait_until_finished()
    checkpointing.save(manager, state.replace(step=jax.numpy.asarray(6, jax.numpy.int32)), config, ["a"] * 10)
    manager.wait_until_finished()
    # The newest two (5 without an eval, 6) for resuming, plus step 2, the best eval_top1 so far.
    assert sorted(manager.all_steps()) == [2, 5, 6]


@pytest.mark.parametrize("override, now, before", [
    ("--config.model.width=0.125", "model.width=0.125", "0.0625"),
    # Same shapes, so only the check notices: another global batch is another data stream and schedule.
    ("--config.batch_size=32", "batch_size=32", "16"),
])
def test_rerun_with_another_model_or_batch_is_refused_not_treated_as_damage(tmp_path, override, now, before):
    workdir = tmp_path / "run"
    assert run_cli("alexnet_jax.main", f"--workdir={workdir}", *ARGS, "--config.num_train_steps=2").returncode == 0
    result = run_cli("alexnet_jax.main", f"--workdir={workdir}", *ARGS, "--config.num_train_steps=4", override)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and now in errors[0] and f"trained with {before}" in errors[0], errors
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]  # nothing moved aside or overwritten


def test_ctrl_c_checkpoints_the_current_step_and_stops_cleanly(tmp_path):
    """Ctrl-C reaches the whole process group (the trainer and its grain workers): one checkpoint of the step
    reached, exit 130, no traceback from any process, no leaked shared memory; the same command resumes."""
    workdir = tmp_path / "run"
    extra = ["--config.num_train_steps=400", "--config.checkpoint_every_steps=1000", "--config.data.workers=2"]
    proc = subprocess.Popen([sys.executable, "-m", "alexnet_jax.main", f"--workdir={workdir}", *ARGS, *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, as a terminal's foreground job
    metrics_file = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not (
            metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 5):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output and "leaked" not in output, output
    [saved] = [int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()]
    assert f"stopped at step {saved} on SIGINT" in output and 5 <= saved < 400
    # A clean run with grain workers (train and eval pipelines) closes them: no shared memory left behind.
    again = run_cli("alexnet_jax.main", f"--workdir={workdir}", *ARGS, "--config.num_train_steps=" + str(saved + 2),
                    "--config.data.workers=2", "--config.eval_every_steps=1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"at step {saved}" in again.stderr
    assert "leaked" not in again.stderr and "resource_tracker" not in again.stderr, again.stderr[-3000:]


def test_best_eval_checkpoint_is_kept_when_eval_and_checkpoint_cadences_differ(tmp_path):
    """Every eval is followed by a checkpoint, so the best eval_top1 is kept even when no checkpoint_every_steps
    step is an eval step (configs/imagenet.py: evals every 5,004 steps, checkpoints every 2,000)."""
    workdir = tmp_path / "run"
    result = run_cli("alexnet_jax.main", f"--workdir={workdir}", *ARGS, "--config.num_train_steps=12",
                     "--config.eval_every_steps=3", "--config.checkpoint_every_steps=5",
                     "--config.max_checkpoints_to_keep=1", "--config.optim.learning_rate=0.5",
                     "--config.optim.warmup_steps=0", "--config.optim.schedule=constant")
    assert result.returncode == 0, result.stderr[-3000:]
    evals = {r["step"]: r["eval_top1"] for r in map(json.loads, open(workdir / "metrics.jsonl")) if "eval_top1" in r}
    assert sorted(evals) == [3, 6, 9, 12]
    best = max(evals, key=lambda s: (evals[s], s))
    assert best != 12, evals  # the case that matters: the best eval is neither the last nor a checkpoint step
    kept = sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
    assert best in kept and 12 in kept, (evals, kept)
    assert f"best eval top-1 {evals[best]:.4f} at step {best}" in result.stderr


def test_checkpoint_of_another_train_state_layout_is_refused_not_moved_aside(tmp_path):
    """An intact checkpoint whose optimizer state has another tree layout (an older version of the trainer, say)
    is not damage: the run stops with a config error and the checkpoint stays where it is."""
    import optax
    import pytest

    from alexnet_jax import checkpointing, config as config_lib, sharding, stability, train
    from conftest import tiny_config

    config = tiny_config()
    other_tx = stability.controlled(optax.sgd(0.01), clip_norm=0.0)  # one transform where the trainer chains two
    state = train.create_train_state(config, other_tx,
                                     train.abstract_train_state(config, sharding.create_mesh(), other_tx))
    manager = checkpointing.create_manager(str(tmp_path))
    checkpointing.save(manager, state, config, [str(i) for i in range(10)])
    manager.wait_until_finished()
    manager.close()
    with pytest.raises(config_lib.ConfigError, match="holds a train state of another layout"):
        train.train_and_evaluate(config, str(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == ["0"]
