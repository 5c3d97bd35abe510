"""Checkpoints that cannot be read are not damage; damage anywhere in a checkpoint is handled the same way;
a rollback's re-save never leaves its step nowhere. Faults are real: chmod without CAP_DAC_OVERRIDE, garbage
bytes, truncated files, SIGKILL."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import REPO, run_cli, tiny_config

ARGS = ["--config=configs/digits.py", "--config.model.width=0.0625", "--config.batch_size=16",
        "--config.log_every_steps=1", "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2",
        "--config.num_train_steps=6"]
# Root ignores file permissions through CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH: without them in the bounding set
# the child (still uid 0, so it may write the root-owned workdir) is refused like any other user.
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 6-step run with checkpoints 2, 4, 6, each with an eval (so each has Orbax's metrics file)."""
    workdir = tmp_path_factory.mktemp("damage") / "run"
    result = run_cli("alexnet_jax.main", f"--workdir={workdir}", *ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(os.path.exists(workdir / "checkpoints" / s / "metrics" / "metrics") for s in "246")
    return workdir


@pytest.fixture
def run(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def _entries(workdir):
    return sorted(os.listdir(workdir / "checkpoints"))


def _errors(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _no_dac_works(path) -> bool:
    return shutil.which("setpriv") is not None and subprocess.run(
        [*NO_DAC, "cat", str(path)], capture_output=True).returncode != 0


def test_late_read_completions_printed_from_other_threads_are_dropped_and_nothing_else():
    """Reads in flight when a restore fails complete into Orbax's closed event loop, and TensorStore's C++ threads
    print each "Event loop is closed" through CPython's PyErr_Print (sys.excepthook). The same C path, taken here
    through ctypes, from another thread is dropped; any other error, or that one on the main thread, is printed."""
    script = textwrap.dedent("""
        import ctypes, threading
        from alexnet_jax import metrics

        metrics.quiet_library_logs()

        def print_as_c_does(message):  # PyRun_SimpleString reports its error with PyErr_Print
            ctypes.pythonapi.PyRun_SimpleString(f"raise RuntimeError({message!r})".encode())

        for message in ("Event loop is closed", "a real failure"):
            thread = threading.Thread(target=print_as_c_does, args=(message,))
            thread.start()
            thread.join()
        print_as_c_does("Event loop is closed")  # the main thread's own
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    printed = [line for line in result.stderr.splitlines() if line.startswith("RuntimeError")]
    assert printed == ["RuntimeError: a real failure", "RuntimeError: Event loop is closed"], result.stderr


@pytest.mark.parametrize("which", ["every file of the newest", "its array data only", "every checkpoint"])
def test_unreadable_checkpoint_stops_with_one_line_and_moves_nothing(run, which):
    checkpoints = run / "checkpoints"
    top = checkpoints if which == "every checkpoint" else checkpoints / "6"
    locked = [os.path.join(root, name) for root, _, files in os.walk(top) for name in files
              if which != "its array data only" or os.sep + "d" in root]
    for path in locked:
        os.chmod(path, 0)
    if not _no_dac_works(locked[0]):
        pytest.skip("cannot drop CAP_DAC_OVERRIDE here (setpriv missing or not permitted)")
    before, history = _entries(run), (run / "metrics.jsonl").read_bytes()
    result = subprocess.run([*NO_DAC, sys.executable, "-m", "alexnet_jax.main", f"--workdir={run}", *ARGS,
                             "--config.num_train_steps=8"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    [error] = _errors(result.stderr)
    assert "Permission denied" in error and "nothing was moved" in error, error
    assert any(f"{path}: Permission denied" in error for path in locked), error  # the very file
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert _entries(run) == before  # nothing moved aside, nothing trained
    assert (run / "metrics.jsonl").read_bytes() == history


def test_garbage_in_metrics_and_meta_files_is_damage(run):
    (run / "checkpoints" / "6" / "metrics" / "metrics").write_bytes(b"\x00garbage{")
    (run / "checkpoints" / "4" / "meta" / "metadata").write_bytes(b'{"config": ')
    result = run_cli("alexnet_jax.main", f"--workdir={run}", *ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "cannot be restored" in line]
    assert len(warnings) == 2, result.stderr[-3000:]
    assert "6/metrics/metrics: UnicodeDecodeError" in warnings[0]
    assert "4/meta/metadata" in warnings[1] and "JSONDecodeError" in warnings[1]
    assert "Resumed from" in result.stderr and "at step 2" in result.stderr
    names = _entries(run)
    assert {"2", "4", "6"} <= set(names)  # 4 and 6 trained again
    assert any(n.startswith("6.corrupt-") for n in names) and any(n.startswith("4.corrupt-") for n in names)


def test_meta_that_parses_but_holds_no_config_is_damage(run):
    (run / "checkpoints" / "6" / "meta" / "metadata").write_text("[1, 2]")
    result = run_cli("alexnet_jax.main", f"--workdir={run}", *ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cannot be restored" in result.stderr and "6/meta/metadata" in result.stderr
    assert "at step 4" in result.stderr


def test_all_checkpoints_damaged_stops_unless_asked_to_start_over(run):
    for step in "246":
        (run / "checkpoints" / step / "meta" / "metadata").write_bytes(b"\xff\xfe")
    before, history = _entries(run), (run / "metrics.jsonl").read_bytes()
    result = run_cli("alexnet_jax.main", f"--workdir={run}", *ARGS)
    assert result.returncode == 2, result.stderr[-3000:]
    [error] = _errors(result.stderr)
    assert "no checkpoint" in error and "restart_if_checkpoints_unusable" in error
    assert all(f"step {s}" in error for s in "246"), error
    assert _entries(run) == before and (run / "metrics.jsonl").read_bytes() == history

    again = run_cli("alexnet_jax.main", f"--workdir={run}", *ARGS, "--config.restart_if_checkpoints_unusable=True")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Resumed" not in again.stderr and again.stderr.count("starting over") == 3
    assert sorted(n.split(".")[0] for n in _entries(run) if ".corrupt-" in n) == ["2", "4", "6"]


def _truncate_model(checkpoint):
    for root, _, files in os.walk(checkpoint / "model"):
        for name in files:
            path = os.path.join(root, name)
            os.truncate(path, os.path.getsize(path) // 3)


def _image(tmp_path):
    from PIL import Image
    import numpy as np

    path = tmp_path / "digit.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_predict_on_a_damaged_newest_checkpoint_falls_back_in_one_line(run, tmp_path):
    _truncate_model(run / "checkpoints" / "6")
    image = _image(tmp_path)
    result = run_cli("alexnet_jax.predict", f"--workdir={run}", "--json", str(image))
    assert result.returncode == 0, result.stderr[-3000:]
    said = [line for line in result.stderr.splitlines() if "damaged" in line]
    assert len(said) == 1 and "checkpoints/6" in said[0] and "using checkpoint 4" in said[0], result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["checkpoint_step"] == 4

    picked = run_cli("alexnet_jax.predict", f"--workdir={run}", "--checkpoint=6", str(image))
    assert picked.returncode == 2, picked.stderr[-3000:]
    assert [line for line in picked.stderr.splitlines() if not line.startswith("I")] == _errors(picked.stderr)
    [error] = _errors(picked.stderr)
    assert "checkpoint 6" in error and "damaged" in error and "--checkpoint=STEP" in error and "[2, 4]" in error


def test_load_for_inference_skips_a_checkpoint_with_garbage_metrics(run):
    from alexnet_jax import checkpointing

    (run / "checkpoints" / "6" / "metrics" / "metrics").write_bytes(b"not json")
    *_, step = checkpointing.load_for_inference(str(run))
    assert step == 4
    assert "6" in _entries(run)  # inference never moves anything


def _state_and_manager(workdir):
    from alexnet_jax import checkpointing, optim, sharding, train

    config = tiny_config()
    tx = train.create_optimizer(config.optim, optim.create_learning_rate_fn(config.optim, 1, 10))
    abstract = train.abstract_train_state(config, sharding.create_mesh(), tx)
    state = train.create_train_state(config, tx, abstract)
    manager = checkpointing.create_manager(str(workdir))
    return config, abstract, state, manager


def test_rollback_resave_keeps_the_step_on_disk_throughout(tmp_path):
    """After a rollback the restored checkpoint is re-saved with new controls. The old order (delete, then
    save) left the step on disk nowhere for the whole save: a kill then lost it. A listing taken at any moment
    must show it, as <step> or as the swapped-out <step>.replaced that the next run restores."""
    import jax

    from alexnet_jax import checkpointing, stability, train

    config, abstract, state, manager = _state_and_manager(tmp_path)
    state = state.replace(step=jax.numpy.asarray(2, jax.numpy.int32))
    checkpointing.save(manager, state, config, [str(i) for i in range(10)], {"eval_top1": 0.25})
    manager.wait_until_finished()
    snapshots, missing, done = [0], [], threading.Event()

    def watch():
        while not done.is_set():
            names = os.listdir(tmp_path / "checkpoints")  # one listing: a consistent view of the renames
            snapshots[0] += 1
            if "2" not in names and "2.replaced" not in names:
                missing.append(names)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        train._resave(manager, config, [str(i) for i in range(10)])(
            stability.set_controls(state, lr_scale=0.5, rollbacks=1, batch_offset=7))
    finally:
        done.set()
        watcher.join()
    assert snapshots[0] > 20 and not missing, (snapshots, missing[:3])
    assert _entries(tmp_path) == ["2"]  # the old copy and the staging folder are gone
    assert manager.metrics(2) == {"eval_top1": 0.25}  # still ranked for the best-checkpoint policy
    restored = checkpointing.restore_train_state(manager, 2, abstract)
    assert stability.read_controls(restored) == {**stability.read_controls(restored), "lr_scale": 0.5,
                                                 "rollbacks": 1, "batch_offset": 7}
    manager.close()


RESAVE_FOREVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, "tests")
    import jax
    from test_checkpoint_damage import _state_and_manager
    from alexnet_jax import checkpointing, stability, train
    config, abstract, state, manager = _state_and_manager(sys.argv[1])
    state = state.replace(step=jax.numpy.asarray(2, jax.numpy.int32))
    names = [str(i) for i in range(10)]
    checkpointing.save(manager, state, config, names)
    manager.wait_until_finished()
    resave = train._resave(manager, config, names)
    print("saved", flush=True)
    for i in range(10 ** 6):
        resave(stability.set_controls(state, rollbacks=i % 7))
""")


@pytest.mark.parametrize("delay", [0.15, 0.6])
def test_a_kill_during_a_rollback_resave_loses_nothing(tmp_path, delay):
    """SIGKILL while a process re-saves a checkpoint over and over: the next manager lists the step and it
    restores."""
    from alexnet_jax import checkpointing

    proc = subprocess.Popen([sys.executable, "-c", RESAVE_FOREVER, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "saved", proc.stderr.read()[-3000:] if proc.poll() else ""
        time.sleep(delay)  # inside some re-save, at a moment that differs between the two cases
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    _, abstract, _, manager = _state_and_manager(tmp_path)
    try:
        assert 2 in manager.all_steps(), _entries(tmp_path)
        checkpointing.restore_train_state(manager, 2, abstract)
        assert _entries(tmp_path) == ["2"]
    finally:
        manager.close()


@pytest.mark.parametrize("error, is_damage, says", [
    (OSError(5, "Input/output error", "/c/6/model/d/1f"), False, "/c/6/model/d/1f: Input/output error"),
    (TimeoutError(110, "Connection timed out"), False, "/c/6: Connection timed out"),
    (ConnectionResetError(104, "Connection reset by peer"), False, "Connection reset by peer"),
    (ValueError('UNAVAILABLE: Error reading "x" in OCDBT database at "gs://b/c/6/model/": Connection reset'), False,
     "gs://b/c/6/model/: Connection reset"),
    (ValueError('UNKNOWN: Error reading local file "/c/6/model/d/1f": Input/output error [tensorstore_spec=...]'),
     False, "/c/6/model/d/1f: Input/output error"),
    (ValueError('DATA_LOSS: Error reading local file "/c/6/model/d/1f": Error decoding'), True, "/c/6/model/d/1f"),
    (FileNotFoundError(2, "No such file or directory", "/c/6/model/_METADATA"), True, "/c/6/model/_METADATA"),
    (RuntimeError("something nobody anticipated"), False, "RuntimeError: something nobody anticipated"),
], ids=["EIO", "timeout", "connection", "tensorstore-unavailable", "tensorstore-eio", "tensorstore-data-loss",
        "missing", "unrecognised"])
def test_only_evidence_of_damage_counts_as_damage(error, is_damage, says):
    """The errors no fault here can produce for real (an EIO, a dropped connection) as Python and TensorStore
    raise them: none of them is damage, and neither is an error nobody anticipated."""
    from alexnet_jax import checkpointing

    judged, why = checkpointing.judge(error, "/c/6")
    assert judged is is_damage and says in why, why
