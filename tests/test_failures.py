"""Failures that must be one `error:` line with a documented exit code, not a page of tracebacks: a checkpoint
that cannot be written (exit 4), a workdir or output that cannot be written and an unreachable bucket (exit 2).
Faults are real: a small tmpfs that fills, a read-only mount, a network namespace with nothing but loopback."""

import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO, loopback_namespace_unavailable

TINY = ["--config=configs/digits.py", "--config.model.width=0.0625", "--config.batch_size=16",
        "--config.log_every_steps=1", "--config.eval_every_steps=1000"]


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _one_line(result, rc: int) -> str:
    """The single error line of a command that must fail with `rc`, no traceback, nothing else on stderr but
    absl's INFO/WARNING lines."""
    assert result.returncode == rc, result.stderr[-3000:]
    errors = _error_lines(result.stderr)
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr[-3000:]
    others = [line for line in result.stderr.splitlines() if not line.startswith(("error:", "I", "W"))]
    assert not others, result.stderr[-3000:]
    return errors[0]


def _mount_namespace_unavailable() -> str | None:
    if not shutil.which("unshare"):
        return "needs unshare (util-linux) for a private tmpfs"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a private mount namespace (needs root): {probe.stderr.strip()}"
    return None


def _on_tmpfs(mountpoint, options: str, command: list[str], after: str = "", timeout=300):
    """Runs `command` from the repo root in a private mount namespace where `mountpoint` is a fresh tmpfs
    mounted with `options`; then `after` (shell), while the tmpfs still exists."""
    reason = _mount_namespace_unavailable()
    if reason:
        pytest.skip(reason)
    os.makedirs(mountpoint, exist_ok=True)
    script = (f"mount -t tmpfs -o {options} tmpfs {shlex.quote(str(mountpoint))} || exit 99\n"
              f"{shlex.join(command)}\nrc=$?\n{after}\nexit $rc\n")
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _published_steps(checkpoints) -> list[int]:
    return sorted(int(name) for name in os.listdir(checkpoints) if name.isdigit())


def test_full_disk_names_the_failed_step_of_an_async_save_and_keeps_the_earlier_ones(tmp_path):
    """Each checkpoint of this model is ~1.9 MB: a 5 MB workdir holds two, and the third save fails. Saves are
    asynchronous, so the failure surfaces at the next save: it must still be reported as the third's."""
    mnt, kept = tmp_path / "mnt", tmp_path / "kept"
    workdir = mnt / "run"
    result = _on_tmpfs(mnt, "size=5m", [
        sys.executable, "-m", "alexnet_jax.main", f"--workdir={workdir}", *TINY,
        "--config.num_train_steps=8", "--config.checkpoint_every_steps=1"], after=f"cp -a {workdir} {kept}")
    error = _one_line(result, 4)
    assert error.startswith(f"error: the checkpoint of step 3 could not be written to {workdir}/checkpoints: "
                            "No space left on device"), error
    assert "Final checkpoint" not in result.stderr
    assert _published_steps(kept / "checkpoints") == [1, 2]
    # The earlier checkpoints are intact: the newest one restores.
    from alexnet_jax import checkpointing

    _, _, model_vars, step = checkpointing.load_for_inference(str(kept))
    assert step == 2 and model_vars["params"]


def test_a_failed_final_save_is_exit_4_and_not_announced_as_the_final_checkpoint(tmp_path):
    mnt = tmp_path / "mnt"
    workdir = mnt / "run"
    result = _on_tmpfs(mnt, "size=1m", [sys.executable, "-m", "alexnet_jax.main", f"--workdir={workdir}", *TINY,
                                         "--config.num_train_steps=3", "--config.checkpoint_every_steps=100"],
                       after=f"ls {workdir}/checkpoints > {tmp_path / 'left'}")
    error = _one_line(result, 4)
    assert "the checkpoint of step 3 could not be written" in error and "No space left on device" in error
    assert "Final checkpoint" not in result.stderr and "Done at step" not in result.stderr
    assert not [name for name in (tmp_path / "left").read_text().split() if name.isdigit()]


@pytest.mark.parametrize("module, flag", [("alexnet_jax.main", "--workdir"), ("alexnet_jax.export", "--out"),
                                          ("alexnet_jax.data.convert", "--dst")])
def test_a_path_under_a_file_is_one_line_exit_2(tmp_path, module, flag):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory\n")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", module, *_args(module, tmp_path), f"{flag}={blocker}/runs"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    error = _one_line(result, 2)
    assert error == f"error: {flag}: {blocker} is not a directory (for {blocker}/runs)"
    assert time.monotonic() - start < 30  # refused before anything is compiled


@pytest.mark.parametrize("module, flag", [("alexnet_jax.main", "--workdir"), ("alexnet_jax.export", "--out"),
                                          ("alexnet_jax.data.convert", "--dst")])
def test_a_read_only_mount_is_one_line_exit_2(tmp_path, module, flag):
    mnt = tmp_path / "ro"
    result = _on_tmpfs(mnt, "ro,size=1m", [sys.executable, "-m", module, *_args(module, tmp_path),
                                            f"{flag}={mnt}/run/out"])
    error = _one_line(result, 2)
    assert error == f"error: {flag}: cannot write in {mnt} (for {mnt}/run/out): Read-only file system"


def _args(module, tmp_path) -> list[str]:
    """The other arguments each command needs to get as far as writing its output."""
    if module == "alexnet_jax.main":
        return TINY
    if module == "alexnet_jax.export":
        return [f"--workdir={tmp_path / 'no-run'}"]
    src = tmp_path / "src" / "class_a"
    src.mkdir(parents=True, exist_ok=True)
    return [f"--src={src.parent}", "--shards=1"]


NO_AUTH_PROBES = {  # as tests/gcs_scenarios.py: no client may look for credentials or a metadata server
    "FSSPEC_GCS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
    "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9", "GCE_METADATA_ROOT": "127.0.0.1:9",
    "NO_GCE_CHECK": "true"}


@pytest.mark.parametrize("endpoint", ["emulator", "public"])
@pytest.mark.parametrize("module", ["alexnet_jax.main", "alexnet_jax.predict", "alexnet_jax.evaluate"])
def test_an_unreachable_bucket_is_one_line_within_15_s(tmp_path, module, endpoint):
    """In a network namespace with nothing but loopback: an emulator address where nothing listens (connection
    refused), or the public endpoint (its name cannot be resolved)."""
    reason = loopback_namespace_unavailable("gcsfs")
    if reason:
        pytest.skip(reason)
    env = {key: value for key, value in os.environ.items()
           if key not in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "CLOUD_STORAGE_EMULATOR_ENDPOINT")}
    env.update(NO_AUTH_PROBES)
    if endpoint == "emulator":
        env.update(STORAGE_EMULATOR_HOST="http://127.0.0.1:9", TENSORSTORE_GCS_HTTP_URL="http://127.0.0.1:9")
    args = {"alexnet_jax.main": TINY, "alexnet_jax.predict": [os.path.join(REPO, "README.md")],
            "alexnet_jax.evaluate": ["--config=configs/digits.py"]}[module]
    command = shlex.join([sys.executable, "-m", module, "--workdir=gs://no-such-bucket/run", *args])
    start = time.monotonic()
    result = subprocess.run(["unshare", "-n", "sh", "-c", f"ip link set lo up && {command}"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    error = _one_line(result, 2)
    where = "http://127.0.0.1:9" if endpoint == "emulator" else "https://storage.googleapis.com"
    assert f"cannot reach gs://no-such-bucket (for gs://no-such-bucket/run) at {where}: " in error, error
    assert took <= 15, took


REFUSED_AT_EVERY_MOMENT = """
import os, subprocess, sys, time
sys.path.insert(0, "tests")
import jax
from test_checkpoint_damage import _state_and_manager
from alexnet_jax import checkpointing

def at(step):
    return state.replace(step=jax.numpy.asarray(step, jax.numpy.int32))

root, names = sys.argv[1], [str(k) for k in range(10)]
config, _, state, manager = _state_and_manager(os.path.join(root, "timing"))
start = time.monotonic()
checkpointing.save(manager, at(1), config, names)
checkpointing.wait(manager)
took = time.monotonic() - start
checkpointing.close(manager)
for case in range(24):  # the mount lands at 24 moments spread over one save, from its start to past its end
    work = os.path.join(root, str(case))
    _, _, _, manager = _state_and_manager(work)
    checkpointing.save(manager, at(1), config, names)
    checkpointing.wait(manager)
    checkpointing.save(manager, at(2), config, names)
    time.sleep(took * case / 20)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", os.path.join(work, "checkpoints")], check=True)
    try:
        checkpointing.wait(manager)
        outcome = "written"
    except checkpointing.CheckpointWriteFailed as error:
        outcome = str(error)
    checkpointing.close(manager)  # must not raise the reported failure again from another of Orbax's waits
    print("outcome:", outcome, flush=True)
os._exit(0)  # Orbax's writer threads of the refused saves wait forever for the phases that failed
"""


def test_a_save_refused_at_any_moment_is_reported_once_and_closes_quietly(tmp_path):
    """The mount that refuses writes lands at moments spread over one asynchronous save. Each refused save is
    reported as one CheckpointWriteFailed naming the storage's refusal, and closing the manager afterwards raises
    nothing: a second error from another of Orbax's waits (its metadata store's, its writer thread's) had escaped
    as a traceback, bypassing exit 4, and Python's exit then waited forever on Orbax's stranded threads."""
    reason = _mount_namespace_unavailable()
    if reason:
        pytest.skip(reason)
    result = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c",
                             REFUSED_AT_EVERY_MOMENT, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = [line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("outcome: ")]
    assert len(outcomes) == 24, result.stdout
    refused = [outcome for outcome in outcomes if outcome != "written"]
    assert refused, outcomes  # the first moments are inside the save
    for outcome in refused:
        assert outcome.startswith("the checkpoint of step 2 could not be written"), outcome
        assert "Read-only file system" in outcome or "No such file or directory" in outcome, outcome


def test_a_write_refused_by_storage_mid_run_is_exit_4_naming_the_step(tmp_path):
    """The storage starts refusing writes while the trainer runs (here: a read-only filesystem mounted over its
    checkpoints folder after the first save): one line naming the step whose save was refused, exit 4, no
    traceback and no hang. Orbax's later write phases then wait for a signal from the phase that failed, in
    threads that Python's exit would join for many minutes: the trainer exits without them."""
    reason = _mount_namespace_unavailable()
    if reason:
        pytest.skip(reason)
    workdir, every = tmp_path / "run", 3
    command = shlex.join([sys.executable, "-m", "alexnet_jax.main", f"--workdir={workdir}", *TINY,
                          "--config.num_train_steps=300", f"--config.checkpoint_every_steps={every}"])
    checkpoints = shlex.quote(str(workdir / "checkpoints"))
    script = (f"{command} 2>{tmp_path / 'stderr'} & pid=$!\n"
              f"while [ ! -d {checkpoints}/{every} ] && kill -0 $pid 2>/dev/null; do sleep 0.05; done\n"
              f"mount -t tmpfs -o ro tmpfs {checkpoints} || exit 99\n"
              "wait $pid\n")
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], cwd=REPO,
                            capture_output=True, text=True, timeout=240)
    result.stderr = (tmp_path / "stderr").read_text()
    error = _one_line(result, 4)
    step = int(error.split("the checkpoint of step ")[1].split()[0])
    # A save already under way when the mount lands had made its temporary folder on the disk beneath, which
    # the mount hides: its next write finds no folder rather than a read-only one. Either is the storage's refusal.
    refusal = "Read-only file system" in error or "No such file or directory" in error
    assert step > every and "could not be written" in error and refusal, error
    assert "Final checkpoint" not in result.stderr
    # On the disk beneath: every save that finished before the mount (step 3, and 6 if it was that quick), none after.
    assert _published_steps(workdir / "checkpoints") == list(range(every, step, every))
