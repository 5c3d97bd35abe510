"""Real JAX processes over loopback: any split of the same devices into processes trains the same model, and a
checkpoint resumes on a different number of processes and devices (same global batch) with the same losses.

Every run uses mesh.model=2, so in the 2 processes x 1 device run the model axis spans both processes.

Tolerance: the layouts differ only in the order XLA sums, i.e. in float rounding. On the flat digit images
max-pool windows hold exact ties, and once weights differ at rounding level a tie can break the other way,
which changes a gradient by more than rounding; so later steps may drift apart legitimately, and only the
first STEPS steps are compared (to 1e-5 relative).
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from alexnet_jax import checkpointing
from conftest import REPO

STEPS = 8
ARGS = ["--config=configs/digits.py", "--config.model.width=0.0625", "--config.batch_size=16",
        f"--config.num_train_steps={STEPS}", "--config.log_every_steps=1", f"--config.eval_every_steps={STEPS}",
        "--config.checkpoint_every_steps=4", "--config.model.dropout_rate=0.0", "--config.mesh.model=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir, processes: int, devices: int, *extra_args) -> list[subprocess.Popen]:
    """`processes` trainer processes with `devices` CPU devices each, over loopback when more than one."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    command = [sys.executable, "-m", "alexnet_jax.main", f"--workdir={workdir}", *ARGS, *extra_args]
    if processes > 1:
        port = _free_port()
        cluster = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}"]
        return [subprocess.Popen([*command, *cluster, f"--process_id={i}"], cwd=REPO, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for i in range(processes)]
    return [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)]


def _finish(procs: list[subprocess.Popen]) -> None:
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]


def _rows(workdir):
    """{step: loss} (the last row of each step wins: a resumed run rewrites the steps after its checkpoint),
    the final eval row, and the BatchNorm statistics recomputed for the final checkpoint (what inference uses)."""
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    losses = {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}
    _, _, model_vars, _ = checkpointing.load_for_inference(str(workdir), STEPS)
    return ([losses[s] for s in range(1, STEPS + 1)], [r for r in rows if "eval_top1" in r][-1],
            jax.device_get(model_vars["batch_stats"]))


def _assert_same_statistics(a, b):
    """Equal up to float32 rounding: the topologies' weights already differ at rounding level (their losses
    agree to 1e-5), and each layer's moments carry that through every layer below it, so each vector is compared
    at a tolerance relative to its own scale (seen: 3.5e-6 on a mean of 0.048 in a vector reaching 5.9)."""
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5 * float(np.max(np.abs(y)))),
                 a, b)


def _resume_from_step_4(source, target):
    """A copy of a finished run's workdir holding only its step-4 checkpoint."""
    shutil.copytree(source, target)
    shutil.rmtree(target / "checkpoints" / str(STEPS))
    return target


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Four topologies of the same 4-step-checkpointed run, then two resumes across process counts."""
    base = tmp_path_factory.mktemp("multiprocess")
    workdirs = {}

    def run_together(*runs):
        # At most one multi-process run at a time: gloo gives a peer only seconds to connect, and on a loaded
        # machine two of them compiling side by side can drift further apart than that.
        started = []
        for name, workdir, *how in runs:
            workdirs[name] = workdir
            started.append(_start(workdir, *how))
        for procs in started:
            _finish(procs)

    # The 2x2 run also treats each process as a slice over DCN (create_hybrid_device_mesh): same device order.
    run_together(("1x4", base / "1x4", 1, 4), ("2x2", base / "2x2", 2, 2, "--config.mesh.num_slices=2"))
    run_together(("1x2", base / "1x2", 1, 2), ("2x1", base / "2x1", 2, 1))
    # Written by 2 processes, resumed by 1; and the other way.
    run_together(("2x2->1x2", _resume_from_step_4(base / "2x2", base / "2x2-1x2"), 1, 2),
                 ("1x2->2x2", _resume_from_step_4(base / "1x2", base / "1x2-2x2"), 2, 2))
    return {name: _rows(workdir) for name, workdir in workdirs.items()}


@pytest.mark.parametrize("multi, single", [("2x1", "1x2"), ("2x2", "1x4")])
def test_processes_train_like_one_process_with_the_same_devices(runs, multi, single):
    multi_losses, multi_eval, multi_stats = runs[multi]
    single_losses, single_eval, single_stats = runs[single]
    assert multi_losses == pytest.approx(single_losses, rel=1e-5)
    assert multi_eval["eval_examples"] == single_eval["eval_examples"] == 359
    assert multi_eval["eval_top1"] == pytest.approx(single_eval["eval_top1"], abs=1e-6)
    _assert_same_statistics(multi_stats, single_stats)  # each process read its part of the same set


def test_device_count_does_not_change_the_losses(runs):
    assert runs["1x2"][0] == pytest.approx(runs["1x4"][0], rel=1e-5)


@pytest.mark.parametrize("resumed, uninterrupted", [("2x2->1x2", "2x2"), ("1x2->2x2", "1x2")])
def test_a_checkpoint_resumes_on_another_process_count(runs, resumed, uninterrupted):
    resumed_losses, resumed_eval, resumed_stats = runs[resumed]
    losses, last_eval, stats = runs[uninterrupted]
    # Steps 5-8 were trained again after restoring step 4 onto the other topology.
    assert resumed_losses == pytest.approx(losses, rel=1e-5)
    assert resumed_eval["eval_examples"] == 359
    assert resumed_eval["eval_top1"] == pytest.approx(last_eval["eval_top1"], abs=1e-6)
    _assert_same_statistics(resumed_stats, stats)


def test_a_checkpoint_one_process_cannot_read_is_given_up_by_all(tmp_path):
    """Damage that only one process sees: each process reads only its own shards, so a bad file can fail the
    restore on one host alone. Here each process resumes from its own copy of a finished 2-process run and only
    process 1's copy of the newest checkpoint is truncated. Both must agree to give it up, and both resume from
    the one before; without that agreement process 0 waits in Orbax's restore barrier while process 1 votes,
    and the job hangs."""
    _finish(_start(tmp_path / "run", 2, 1))
    views = [tmp_path / "view0", tmp_path / "view1"]
    for view in views:
        shutil.copytree(tmp_path / "run", view)
    for root, _, files in os.walk(views[1] / "checkpoints" / str(STEPS)):
        for name in files:
            if os.sep + "d" in root:  # the array data files, not the metadata
                path = os.path.join(root, name)
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 3)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "alexnet_jax.main", f"--workdir={view}", *ARGS, "--config.num_train_steps=4",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i, view in enumerate(views)]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for view, p, out in zip(views, procs, outputs):
        assert p.returncode == 0, out[-3000:]
        assert f"Resumed from {view}/checkpoints at step 4" in out, out[-3000:]
    assert "cannot be restored (another process could not read its part)" in outputs[0], outputs[0][-3000:]
    assert "cannot be restored (" in outputs[1] and "another process" not in outputs[1], outputs[1][-3000:]
    # process 0 moves the checkpoint aside (in its view): it is no longer a step anyone resumes from
    assert any(n.startswith(f"{STEPS}.corrupt-") for n in os.listdir(views[0] / "checkpoints"))
