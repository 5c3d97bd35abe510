"""Weight EMA (optim.ema_decay): the average the train step keeps, its checkpoints, its evals and its loading."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from alexnet_jax import checkpointing, inference
from conftest import REPO, run_cli, tiny_config
from test_train import _fixed_batch, _setup


def test_the_average_after_k_steps_is_the_closed_form():
    """ema_k = d_k ema_{k-1} + (1 - d_k) p_k with d_k = min(decay, (1 + k) / (10 + k)) (k from 0), ema_0 = p_0,
    computed here from the params after every step of the real compiled, donated step."""
    config = tiny_config(**{"optim.ema_decay": 0.5, "model.dropout_rate": 0.0})
    mesh, state, step_fn, _ = _setup(config)
    batch = _fixed_batch(config, mesh)
    want = jax.device_get(state.params)
    np.testing.assert_array_equal(jax.tree.leaves(jax.device_get(state.ema_params))[0], jax.tree.leaves(want)[0])
    for k in range(5):
        state, _ = step_fn(state, batch)
        decay = min(0.5, (1 + k) / (10 + k))
        want = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, want, jax.device_get(state.params))
    jax.tree.map(lambda got, expected: np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7),
                 jax.device_get(state.ema_params), want)
    # Five updates at these weights moved the average away from the params: the test could tell them apart.
    assert not np.allclose(jax.tree.leaves(jax.device_get(state.ema_params))[0],
                           jax.tree.leaves(jax.device_get(state.params))[0])


def test_without_ema_the_state_holds_no_average():
    config = tiny_config()
    _, state, step_fn, _ = _setup(config)
    assert state.ema_params is None


ARGS = ["--config=configs/digits.py", "--config.model.width=0.0625", "--config.batch_size=16",
        "--config.log_every_steps=1", "--config.eval_every_steps=1000", "--config.optim.ema_decay=0.9"]


def _ema(workdir, step):
    _, _, model_vars, _ = checkpointing.load_for_inference(str(workdir), step, weights="ema")
    return jax.device_get(model_vars)


def test_resume_after_sigkill_gives_the_same_average(tmp_path):
    steps = ["--config.num_train_steps=20", "--config.checkpoint_every_steps=5"]
    straight = tmp_path / "straight"
    assert run_cli("alexnet_jax.main", f"--workdir={straight}", *ARGS, *steps).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "alexnet_jax.main", f"--workdir={killed}", *ARGS, *steps],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (
            (killed / "checkpoints").is_dir() and any(p.name.isdigit() for p in (killed / "checkpoints").iterdir())):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be killed")
    resumed = run_cli("alexnet_jax.main", f"--workdir={killed}", *ARGS, *steps)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed" in resumed.stderr
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), _ema(killed, 20),
                 _ema(straight, 20))


def test_a_digits_run_reports_its_average_and_can_rank_checkpoints_by_it(tmp_path):
    workdir = tmp_path / "run"
    result = run_cli("alexnet_jax.main", f"--workdir={workdir}", "--config=configs/digits.py",
                     "--config.num_train_steps=60", "--config.eval_every_steps=30", "--config.optim.ema_decay=0.9",
                     "--config.best_metric=eval_ema_top1")
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [row for line in open(workdir / "metrics.jsonl") if "eval_top1" in (row := json.loads(line))]
    assert [row["step"] for row in evals] == [30, 60]
    for row in evals:
        assert 0 <= row["eval_ema_top1"] <= row["eval_ema_top5"] <= 1 and np.isfinite(row["eval_ema_loss"])
    assert evals[-1]["eval_ema_top1"] > 0.8, evals  # chance is 0.1; the raw weights reach ~0.97 here
    assert "best EMA eval top-1" in result.stderr

    # best_metric=eval_ema_top1: loading defaults to the average; --weights picks either.
    default = inference.load(workdir)
    ema = inference.load(workdir, weights="ema")
    raw = inference.load(workdir, weights="raw")
    leaf = lambda c: np.asarray(jax.tree.leaves(c.model_vars["params"])[0])
    np.testing.assert_array_equal(leaf(default), leaf(ema))
    assert not np.array_equal(leaf(ema), leaf(raw))
    evaluated = run_cli("alexnet_jax.evaluate", f"--workdir={workdir}", "--config=configs/digits.py", "--json",
                        "--weights=raw")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert report["weights"] == "raw"
    assert report["eval_top1"] == pytest.approx(evals[-1]["eval_top1"], abs=1e-6)


def test_a_checkpoint_without_an_average_resumes_with_one_started_from_its_params(tmp_path):
    workdir = tmp_path / "run"
    first = run_cli("alexnet_jax.main", f"--workdir={workdir}", *ARGS[:-1], "--config.num_train_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    missing = run_cli("alexnet_jax.predict", f"--workdir={workdir}", "--weights=ema", os.path.join(REPO, "README.md"))
    assert missing.returncode == 2 and "holds no weight average" in missing.stderr
    resumed = run_cli("alexnet_jax.main", f"--workdir={workdir}", *ARGS, "--config.num_train_steps=5")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "has no weight average: starting it from its params" in resumed.stderr
    assert checkpointing.has_item(checkpointing.create_manager(str(workdir), read_only=True), 5, "ema")


@pytest.mark.parametrize("best_metric, kept", [("eval_top1", [1, 3]), ("eval_ema_top1", [2, 3])])
def test_best_metric_picks_the_checkpoint_kept_beside_the_newest(tmp_path, best_metric, kept):
    import jax.numpy as jnp

    from alexnet_jax import optim, sharding, train

    config = tiny_config(**{"optim.ema_decay": 0.9, "best_metric": best_metric})
    tx = train.create_optimizer(config.optim, optim.create_learning_rate_fn(config.optim, 1, 10))
    state = train.create_train_state(config, tx, train.abstract_train_state(config, sharding.create_mesh(), tx))
    manager = checkpointing.create_manager(str(tmp_path), max_to_keep=1, best_metric=best_metric)
    # The raw weights were best at step 1, their average at step 2; step 3 is the newest.
    for step, raw, ema in ((1, 0.9, 0.1), (2, 0.1, 0.8), (3, 0.2, 0.3)):
        checkpointing.save(manager, state.replace(step=jnp.asarray(step, jnp.int32)), config, [str(i) for i in range(10)],
                           {"eval_top1": raw, "eval_ema_top1": ema})
        checkpointing.wait(manager)
    assert sorted(manager.all_steps()) == kept
    manager.close()
