"""Two real JAX processes over loopback train the same model as one process with two devices."""

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import REPO

ARGS = ["--config=configs/digits.py", "--config.model.width=0.0625", "--config.batch_size=16",
        "--config.num_train_steps=3", "--config.log_every_steps=1", "--config.eval_every_steps=3",
        "--config.model.dropout_rate=0.0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(workdir):
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return [r["train_loss"] for r in rows if "train_loss" in r], [r for r in rows if "eval_top1" in r][-1]


def test_two_processes_match_one_process_with_two_devices(tmp_path):
    env_one_device = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    port = _free_port()
    multi = tmp_path / "multi"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "alexnet_jax.main", f"--workdir={multi}", *ARGS,
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        cwd=REPO, env={**os.environ, **env_one_device}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]

    single = tmp_path / "single"
    result = subprocess.run(
        [sys.executable, "-m", "alexnet_jax.main", f"--workdir={single}", *ARGS], cwd=REPO,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    multi_losses, multi_eval = _losses(multi)
    single_losses, single_eval = _losses(single)
    assert multi_losses == pytest.approx(single_losses, rel=1e-4)
    assert multi_eval["eval_examples"] == single_eval["eval_examples"] == 359
    assert multi_eval["eval_top1"] == pytest.approx(single_eval["eval_top1"], abs=1e-6)
