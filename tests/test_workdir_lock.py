"""One trainer per workdir (alexnet_jax/workdir_lock.py): real trainer processes, real signals, lock records left
as a holder on another host would leave them."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO, run_cli

ARGS = ["--config=configs/digits.py", "--config.model.width=0.0625", "--config.batch_size=16",
        "--config.log_every_steps=1", "--config.eval_every_steps=100000", "--config.checkpoint_every_steps=100000"]


def _start(workdir, *args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "alexnet_jax.main", f"--workdir={workdir}", *ARGS, *args],
                            cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(condition, proc=None, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        if proc is not None:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)


def _training(workdir):
    """True once the run has written a train row (it holds the lock by then)."""
    metrics = workdir / "metrics.jsonl"
    return metrics.exists() and metrics.read_text().count("\n") >= 1


def _record(workdir) -> dict:
    return json.loads((workdir / "LOCK").read_text())


def _write_record(workdir, host="other-host", pid=4242, age=0.0):
    os.makedirs(workdir, exist_ok=True)
    now = time.time()
    (workdir / "LOCK").write_text(json.dumps({"host": host, "pid": pid, "since": now - age - 60,
                                              "heartbeat": now - age, "token": "theirs"}))


def _error_lines(text):
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_a_second_trainer_is_refused_and_the_first_finishes_intact(tmp_path):
    workdir = tmp_path / "run"
    # Long enough that the first is still training when the second, which needs seconds to start, is judged.
    first = _start(workdir, "--config.num_train_steps=400")
    _wait_for(lambda: _training(workdir), first)
    holder = _record(workdir)
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
    second = run_cli("alexnet_jax.main", f"--workdir={workdir}", *ARGS, "--config.num_train_steps=30",
                     "--config.optim.learning_rate=0.2")
    assert first.poll() is None, "the first run ended before the second was judged"
    assert second.returncode == 2, second.stderr[-3000:]
    assert _error_lines(second.stderr) == [line for line in second.stderr.splitlines() if line.strip()][-1:]
    [line] = _error_lines(second.stderr)
    assert f"pid {first.pid} on host {socket.gethostname()} since" in line and "in use" in line
    assert "Traceback" not in second.stderr
    out = first.communicate(timeout=600)[0]
    assert first.returncode == 0, out[-3000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == list(range(1, 401))  # one run's rows, once each
    assert sorted(os.listdir(workdir / "checkpoints")) == ["400"]
    assert not (workdir / "LOCK").exists()  # released at the end


def test_sigterm_releases_the_lock_and_a_sigkilled_holder_is_taken_over(tmp_path):
    workdir = tmp_path / "run"
    steps = ["--config.num_train_steps=100000"]
    stopped = _start(workdir, *steps)
    _wait_for(lambda: _training(workdir), stopped)
    stopped.send_signal(signal.SIGTERM)
    out = stopped.communicate(timeout=120)[0]
    assert stopped.returncode == 143, out[-3000:]
    assert not (workdir / "LOCK").exists()

    killed = _start(workdir, *steps)
    _wait_for(lambda: (workdir / "LOCK").exists() and _record(workdir)["pid"] == killed.pid, killed)
    killed.kill()
    killed.wait()
    assert _record(workdir)["pid"] == killed.pid  # left behind, naming a dead pid
    resumed = run_cli("alexnet_jax.main", f"--workdir={workdir}", *ARGS, "--config.num_train_steps=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    [warning] = [line for line in resumed.stderr.splitlines() if "Taking over" in line]
    assert f"pid {killed.pid} on host {socket.gethostname()}" in warning and "is gone" in warning
    assert not (workdir / "LOCK").exists()


def test_a_stale_lock_of_another_host_is_taken_over(tmp_path):
    workdir = tmp_path / "run"
    _write_record(workdir, age=3600)
    result = run_cli("alexnet_jax.main", f"--workdir={workdir}", *ARGS, "--config.num_train_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    [warning] = [line for line in result.stderr.splitlines() if "Taking over" in line]
    assert "pid 4242 on host other-host" in warning and "has not refreshed its heartbeat for over 300 s" in warning
    assert not any("waiting up to" in line for line in result.stderr.splitlines())
    assert (workdir / "checkpoints" / "2").is_dir() and not (workdir / "LOCK").exists()


def test_a_recent_heartbeat_of_another_host_is_waited_for_until_it_goes_stale(tmp_path):
    """A job restarted after a hard kill on another host: the old record's heartbeat is fresh but never moves."""
    workdir = tmp_path / "run"
    _write_record(workdir, age=0)
    started = time.time()
    result = run_cli("alexnet_jax.main", f"--workdir={workdir}", *ARGS, "--config.num_train_steps=2",
                     "--config.workdir_lock_timeout_s=6")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    [waiting] = [line for line in lines if "waiting up to" in line]
    assert "pid 4242 on host other-host" in waiting and "for its heartbeat to go stale" in waiting
    assert any("Taking over" in line and "other-host" in line for line in lines)
    assert lines.index(waiting) < next(i for i, line in enumerate(lines) if "Training" in line)
    assert time.time() - started >= 5  # it did wait for the heartbeat's age to reach the timeout
    assert (workdir / "checkpoints" / "2").is_dir()


HEARTBEATING_HOLDER = textwrap.dedent("""
    import json, sys, time
    path = sys.argv[1]
    since = time.time()
    while True:
        with open(path + ".tmp", "w") as f:
            json.dump({"host": "other-host", "pid": 4242, "since": since, "heartbeat": time.time(),
                       "token": "theirs"}, f)
        import os; os.replace(path + ".tmp", path)
        time.sleep(0.5)
""")


def test_a_moving_heartbeat_of_another_host_is_a_live_holder(tmp_path):
    """A live trainer on another host sharing the filesystem (without shared file locks): its heartbeat moves
    while we watch, so the second trainer exits 2 instead of waiting the timeout out."""
    workdir = tmp_path / "run"
    _write_record(workdir)
    holder = subprocess.Popen([sys.executable, "-c", HEARTBEATING_HOLDER, str(workdir / "LOCK")])
    try:
        started = time.time()
        result = run_cli("alexnet_jax.main", f"--workdir={workdir}", *ARGS, "--config.num_train_steps=2",
                         "--config.workdir_lock_timeout_s=60")
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = _error_lines(result.stderr)
    assert "pid 4242 on host other-host" in line and "in use" in line
    assert time.time() - started < 50
    assert not (workdir / "checkpoints").exists()


HOLDER = textwrap.dedent("""
    import sys, time
    from alexnet_jax import workdir_lock
    with workdir_lock.hold(sys.argv[1]):
        print("holding", flush=True)
        time.sleep(600)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_both_processes_of_a_two_process_run_exit_2_on_a_held_workdir(tmp_path):
    workdir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": REPO})
    try:
        assert holder.stdout.readline().strip() == "holding"
        port = _free_port()
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
        procs = [subprocess.Popen(
            [sys.executable, "-m", "alexnet_jax.main", f"--workdir={workdir}", *ARGS, "--config.num_train_steps=2",
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
        try:
            outputs = [p.communicate(timeout=240)[0] for p in procs]
        finally:
            for p in procs:
                p.kill()
        for p, out in zip(procs, outputs):
            assert p.returncode == 2, out[-3000:]
            [line] = _error_lines(out)
            assert f"pid {holder.pid} on host {socket.gethostname()}" in line, out[-3000:]
            assert "Traceback" not in out
        assert _record(workdir)["pid"] == holder.pid  # the holder's lock is untouched
        assert sorted(os.listdir(workdir)) == ["LOCK"]
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_released_when_the_block_raises(tmp_path):
    from alexnet_jax import workdir_lock

    workdir = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with workdir_lock.hold(str(workdir)):
            assert (workdir / "LOCK").exists()
            raise RuntimeError("boom")
    assert not workdir.exists()  # nothing else was written: the workdir it made is gone too
    with workdir_lock.hold(str(workdir)):  # and it can be taken again
        pass

