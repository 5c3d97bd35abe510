"""A trainer killed with SIGKILL (or by the OOM killer) leaves no grain worker running and, after the next run in
its workdir, no shared memory behind.

The trainers run in a private /dev/shm (a mount namespace of their own with a tmpfs there), so every segment in it
is theirs and nothing else on the machine is touched."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

# Runs inside the namespace. Two kills in one workdir, then one more run there:
# 1. SIGKILL to the trainer alone: its children (grain workers, multiprocessing's resource tracker) must be gone
#    within 10 s;
# 2. SIGKILL to the trainer's whole process group (the OOM killer of a container takes every process of it):
#    nobody is left to free the segments, so they stay -- until the next run in that workdir.
DRIVER = textwrap.dedent("""
    import json, os, signal, subprocess, sys, time

    workdir, args = sys.argv[1], sys.argv[2:]
    SHM = "/dev/shm"

    def children(pid):
        found = []
        for entry in os.listdir("/proc"):
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if entry.isdigit() and int(fields[1]) == pid:
                found.append((int(entry), fields[19]))  # (pid, start time): a reused pid is another process
        return found

    def alive(pid, start):
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            return False
        return fields[19] == start and fields[0] != "Z"

    def start(*extra):
        log = open(os.path.join(workdir, f"log{time.monotonic_ns()}.txt"), "w")
        return subprocess.Popen([sys.executable, "-m", "alexnet_jax.main", f"--workdir={workdir}", *args, *extra],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def run_until_segments():
        proc = start("--config.num_train_steps=100000", "--config.data.workers=2")
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            kids = children(proc.pid)
            blocks = [name for name in os.listdir(SHM) if not name.startswith("sem.")]
            if len(kids) >= 3 and len(blocks) >= 2:  # 2 workers + resource tracker; batches in flight
                time.sleep(1)
                return proc, children(proc.pid)
            time.sleep(0.2)
        raise SystemExit(f"trainer never fed from its workers (exit {proc.poll()})")

    report = {}
    proc, kids = run_until_segments()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = time.time()
    while time.time() < killed + 10 and any(alive(*kid) for kid in kids):
        time.sleep(0.1)
    report["children"] = len(kids)
    report["alive_after_10s"] = [pid for pid, start_time in kids if alive(pid, start_time)]
    for pid, start_time in kids:  # a failed check must not leave them running
        if alive(pid, start_time):
            os.kill(pid, signal.SIGKILL)

    proc, kids = run_until_segments()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    while any(alive(*kid) for kid in kids):
        time.sleep(0.1)
    report["left_by_group_kill"] = sorted(os.listdir(SHM))

    nxt = start("--config.num_train_steps=1", "--config.data.workers=0")
    report["next_exit"] = nxt.wait(timeout=300)
    report["after_next_run"] = sorted(os.listdir(SHM))
    print("REPORT " + json.dumps(report))
""")

ARGS = ["--config=configs/digits.py", "--config.model.width=0.0625", "--config.batch_size=16",
        "--config.log_every_steps=1", "--config.eval_every_steps=100000", "--config.checkpoint_every_steps=100000"]


def _private_shm_available() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
                           capture_output=True, text=True)
    if probe.returncode:
        return f"cannot mount a private /dev/shm: {probe.stderr.strip()}"
    return None


def test_sigkill_leaves_no_workers_and_the_next_run_frees_the_shared_memory(tmp_path):
    reason = _private_shm_available()
    if reason:
        pytest.skip(reason)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    workdir = tmp_path / "run"
    workdir.mkdir()
    command = (f"mount -t tmpfs -o size=256m tmpfs /dev/shm && exec {sys.executable} {driver} {workdir} "
               + " ".join(ARGS))
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", command], cwd=REPO,
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": REPO})
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    logs = "".join(open(path).read()[-3000:] for path in sorted(workdir.glob("log*.txt")))
    assert lines, f"driver failed ({result.returncode}): {result.stdout[-2000:]}{result.stderr[-3000:]}\n{logs}"
    report = json.loads(lines[0][len("REPORT "):])
    assert report["children"] >= 3, report
    assert report["alive_after_10s"] == [], report
    assert report["left_by_group_kill"], "the group kill freed everything: the last check tests nothing"
    assert report["next_exit"] == 0, logs
    assert report["after_next_run"] == [], report


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm (not Linux)")
def test_release_frees_only_dead_runs_of_its_workdir(tmp_path):
    from alexnet_jax.data import pipeline

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    me = os.getpid()
    mine, other = (f"ajx.{pipeline._workdir_key(str(tmp_path / name))}." for name in ("run", "other"))
    names = {"dead": f"{mine}{dead_pid}.123.abcd", "dead_semaphore": f"sem.{mine}{dead_pid}.123.sabcd",
             "reused_pid": f"{mine}{me}.1.abcd",  # this pid, but not the process that made it
             "live": f"{mine}{me}.{pipeline._process_start(me)}.abcd",
             "other_workdir": f"{other}{dead_pid}.123.abcd", "not_ours": f"psm_{tmp_path.name[-8:]}"}
    try:
        for name in names.values():
            open(os.path.join("/dev/shm", name), "w").close()
        pipeline.release_orphaned_shared_memory(str(tmp_path / "run"))
        left = {key for key, name in names.items() if os.path.exists(os.path.join("/dev/shm", name))}
        assert left == {"live", "other_workdir", "not_ours"}
    finally:
        for name in names.values():
            if os.path.exists(os.path.join("/dev/shm", name)):
                os.unlink(os.path.join("/dev/shm", name))
