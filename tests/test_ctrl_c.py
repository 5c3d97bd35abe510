"""Ctrl-C typed into a real terminal (a pseudo-terminal: the trainer and its grain workers form its foreground
process group, so all of them get SIGINT) at moments other than a train step: inside an eval, while its worker
processes are still starting. The interrupted eval is abandoned, the last finished step is checkpointed, and
the run exits 130 with no traceback from any process."""

import os
import pty
import select
import sys
import time

from conftest import REPO, run_cli

ARGS = ["--config=configs/digits.py", "--config.model.width=0.0625", "--config.batch_size=16",
        "--config.log_every_steps=1", "--config.data.workers=2", "--config.precise_bn_examples=0"]


def _read_until(fd, pattern: bytes, output: bytearray, timeout: float) -> bool:
    """Reads the terminal into `output` until `pattern` shows or `timeout` passes (False) or it closes."""
    deadline = time.time() + timeout
    while pattern not in output and time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: every process holding the terminal has exited
                return False
            if not chunk:
                return False
            output += chunk
    return pattern in output


def _run_in_terminal(args, interrupt_after: bytes, delay: float):
    """Runs the trainer on a pseudo-terminal, types Ctrl-C `delay` s after `interrupt_after` appears, and
    returns (exit code, everything the terminal showed)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: session leader with the terminal as its controlling tty, as a shell's job
        os.chdir(REPO)
        os.execv(sys.executable, [sys.executable, "-m", "alexnet_jax.main", *args])
    output = bytearray()
    try:
        assert _read_until(fd, interrupt_after, output, timeout=300), output.decode(errors="replace")[-3000:]
        time.sleep(delay)
        os.write(fd, b"\x03")  # what the Ctrl-C key sends; the terminal turns it into SIGINT for the group
        _read_until(fd, b"\0never\0", output, timeout=300)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def test_ctrl_c_inside_an_eval_abandons_it_and_checkpoints_the_last_step(tmp_path):
    workdir = tmp_path / "run"
    args = [f"--workdir={workdir}", *ARGS, "--config.num_train_steps=40", "--config.eval_every_steps=10",
            "--config.checkpoint_every_steps=1000"]
    # The row of step 10 is printed right before its eval starts: its grain workers are starting 1 s later.
    code, output = _run_in_terminal(args, b"step 10/40", delay=1.0)
    assert code == 130, output[-3000:]
    for noise in ("Traceback", "KeyboardInterrupt", "terminate called", "Exception ignored", "leaked"):
        assert noise not in output, output[-3000:]
    assert "Eval at step 10 abandoned on SIGINT" in output, output[-3000:]
    assert "Interrupted: stopped at step 10 on SIGINT" in output and "Preempted" not in output, output[-3000:]
    assert sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()) == [10]
    assert "eval_top1" not in (workdir / "metrics.jsonl").read_text()  # no half-finished eval was reported

    resumed = run_cli("alexnet_jax.main", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 10" in resumed.stderr


def test_ctrl_c_while_compiling_checkpoints_after_the_first_step(tmp_path):
    """Before the first step finishes (restoring, compiling) there is nothing new to save: the request is
    honoured right after that step, not lost and not a traceback."""
    workdir = tmp_path / "run"
    args = [f"--workdir={workdir}", *ARGS, "--config.num_train_steps=40", "--config.checkpoint_every_steps=1000",
            "--config.data.workers=0", "--config.compilation_cache_dir="]
    code, output = _run_in_terminal(args, b"Training bn", delay=0.5)
    assert code == 130, output[-3000:]
    for noise in ("Traceback", "KeyboardInterrupt", "Exception ignored"):
        assert noise not in output, output[-3000:]
    saved = [int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()]
    assert len(saved) == 1 and f"stopped at step {saved[0]} on SIGINT" in output and saved[0] < 40
