"""One row per step in metrics.jsonl and TensorBoard after a resume: rows an interrupted run logged past its last
checkpoint are dropped, since the resumed run logs those steps again."""

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time

from conftest import REPO, run_cli

from alexnet_jax import metrics

ARGS = ["--config=configs/digits.py", "--config.model.width=0.0625", "--config.batch_size=16",
        "--config.log_every_steps=1", "--config.eval_every_steps=100000", "--config.optim.schedule=constant",
        "--config.optim.warmup_steps=0", "--config.checkpoint_every_steps=4"]


def _train_steps(workdir) -> list[int]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [row["step"] for row in map(json.loads, f) if "train_loss" in row]


def _checkpoints(workdir) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


def _events(path) -> list:
    """The Event protos of one TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    events, data = [], open(path, "rb").read()
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        event = event_pb2.Event()
        event.ParseFromString(data[offset + 12:offset + 12 + length])
        events.append(event)
        offset += 12 + length + 4
    return events


def test_writer_drops_rows_past_the_resume_step_and_purges_tensorboard(tmp_path):
    writer = metrics.MetricsWriter(str(tmp_path))
    for step in range(1, 11):
        writer.write(step, {"train_loss": 1.0 / step})
    writer.write(10, {"eval_top1": 0.5})
    writer.write(9, {"rollbacks": 1, "rollback_reason": "spike", "rolled_back_to": 4})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "train_lo')  # a line cut short by a kill

    writer = metrics.MetricsWriter(str(tmp_path), resume_step=6)
    for step in range(7, 9):
        writer.write(step, {"train_loss": 2.0 / step})
    writer.close()
    assert _train_steps(tmp_path) == list(range(1, 9))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[6]["rollback_reason"] == "spike"  # a rollback record stays: the rollback still holds
    assert rows[7] == {"step": 7, "train_loss": 2.0 / 7}  # the resumed run's values, not the old ones
    newest = max((p for p in os.listdir(tmp_path) if "tfevents" in p), key=lambda p: os.path.getmtime(tmp_path / p))
    starts = [e.step for e in _events(tmp_path / newest) if e.HasField("session_log")]
    assert starts == [7]  # TensorBoard hides the older files' events at steps >= 7


def test_sigkilled_run_resumed_has_one_train_row_per_step(tmp_path):
    """SIGKILL after a checkpoint at step S with rows already logged past S, then resume: the rows past S are
    replaced by the resumed run's, never duplicated. (Constant learning rate, so the rerun may stop earlier.)"""
    workdir, log = str(tmp_path / "run"), tmp_path / "killed.log"
    with open(log, "w") as output:  # a file, not a pipe nobody reads: the run must never block on its log
        proc = subprocess.Popen([sys.executable, "-m", "alexnet_jax.main", f"--workdir={workdir}", *ARGS,
                                 "--config.num_train_steps=100000"], cwd=REPO, stdout=output, stderr=output)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            saved = _checkpoints(workdir)
            if saved and os.path.exists(os.path.join(workdir, "metrics.jsonl")) and \
                    max(_train_steps(workdir)) > saved[-1]:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    resume_step = _checkpoints(workdir)[-1]
    assert max(_train_steps(workdir)) > resume_step  # the situation under test: rows past the checkpoint

    total = resume_step + 3
    result = run_cli("alexnet_jax.main", f"--workdir={workdir}", *ARGS, f"--config.num_train_steps={total}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {resume_step}" in result.stderr
    assert _train_steps(workdir) == list(range(1, total + 1))


def test_resume_skips_bad_metrics_lines_and_keeps_the_rest(tmp_path, caplog):
    good = [{"step": 1, "train_loss": 2.0}, {"step": 2, "train_loss": 1.5}, {"step": 3, "train_loss": 1.0}]
    lines = [json.dumps(good[0]).encode(),
             b'{"step": 2, "note": "\xff"}',  # a byte that is not UTF-8
             json.dumps(good[1]).encode(),
             b'{"step": 1e400, "train_loss": 0.1}',  # a step no integer can hold
             b'{"step": "2"}', b"[2]", b"not json",
             json.dumps(good[2]).encode(),
             b'{"step": 3, "train_lo']  # cut short by a kill
    (tmp_path / "metrics.jsonl").write_bytes(b"\n".join(lines))
    with caplog.at_level(logging.WARNING):
        metrics.MetricsWriter(str(tmp_path), resume_step=3).close()
    assert [json.loads(line) for line in open(tmp_path / "metrics.jsonl", encoding="utf-8")] == good
    warnings = [r.getMessage() for r in caplog.records if "metrics.jsonl" in r.getMessage()]
    assert len(warnings) == 1 and "skipped 6 unreadable line(s)" in warnings[0], warnings


def _loop_rates(step_seconds: float, steps=20, log_every=5, caught_up=(10, 20), poll=True) -> dict:
    """img_per_s of each row of a loop shaped like train.py's: rows fetched one log step late, all of them before
    an eval; every step's metrics are a finished jax array at once, as when the host keeps pace with the device
    (multi-process runs). Each step takes `step_seconds`; a batch is 10 images."""
    import jax.numpy as jnp

    throughput, ready, rates = metrics.Throughput(10, 0, steps), [], {}
    for step in range(1, steps + 1):
        time.sleep(step_seconds)
        window = [{"train_loss": jnp.float32(step) * 2}]
        if step % log_every == 0:
            ready.append((step, window))
        if poll:
            throughput.poll(ready)
        due, ready = (ready, []) if step in caught_up else (ready[:-1], ready[-1:])
        for window_step, _ in due:
            rates[window_step] = throughput.update(window_step)[0]
        if step in caught_up:
            with throughput.paused():
                time.sleep(5 * step_seconds)  # the eval: left out of the rate
    return rates


def test_rows_caught_up_before_an_eval_get_the_rate_of_their_own_steps():
    """The row before an eval (and the last) once reported 30,000 img/s in 2-process runs making 100-200: it was
    fetched right after the row before it, and timed at its fetch."""
    rates = _loop_rates(0.02)
    assert sorted(rates) == [5, 10, 15, 20]
    # 10 images per 0.02 s: 500 img/s; a loaded machine only makes the steps slower.
    assert all(50 < rate < 600 for rate in rates.values()), rates
