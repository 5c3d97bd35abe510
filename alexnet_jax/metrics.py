"""Where numbers go: one console line per log step, DIR/metrics.jsonl (contract), TensorBoard events in DIR.

Only process 0 writes; the others get a writer that drops everything, so callers never branch on the process.
DIR may be local or gs:// (see MetricsWriter for how metrics.jsonl is kept whole on GCS).
"""

import contextlib
import json
import logging as std_logging
import math
import sys
import threading
import time
import types

import numpy as np
from absl import logging
from etils import epath

from alexnet_jax import storage

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """metrics.jsonl and TensorBoard events in `workdir`, holding exactly one row per logged step.

    `resume_step`: the step training restarts from (its checkpoint's; 0 for a fresh start). Train and eval rows
    past it were written by an interrupted run after its last checkpoint and will be logged again, so they are
    dropped (from metrics.jsonl here, from TensorBoard through the event files' purge marker). Rollback records
    stay: the rollback they report still holds for the resumed run (its count, batch offset and learning rate).

    GCS objects cannot be appended to (an upload replaces the whole object), so for a gs:// workdir the rows are
    kept in memory and the whole file is uploaded again: at most every `flush_secs` (longer when uploads get
    slow), at every `flush()` (the trainer calls it when it saves a checkpoint, so the rows up to a checkpoint
    are never lost) and at `close()`. An upload replaces the object only once it is complete, so the object
    always holds a whole file. A local file is appended to, one line at a time.
    """

    def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0, flush_secs: float = 30.0):
        self._enabled = enabled
        self._remote = storage.is_remote(workdir)
        self._flush_secs = flush_secs
        self._jsonl = None
        self._tb = None
        self._lines: list[str] = []  # gs:// only: the whole file
        self._uploaded_at, self._upload_secs, self._dirty = time.monotonic(), 0.0, False
        if enabled:
            SummaryWriter = _summary_writer_class()  # heavy import, only the writing process pays it

            epath.Path(workdir).mkdir(parents=True, exist_ok=True)
            self._path = storage.join(workdir, METRICS_FILE)
            kept = self._rows_kept(resume_step)
            if self._remote:
                self._lines = kept
                self._upload()
            else:
                storage.write_text(self._path, "".join(kept))
                self._jsonl = open(self._path, "a", buffering=1)
            # Events at steps >= purge_step from earlier runs in this directory are hidden by TensorBoard.
            # tensorboardX writes gs:// event files itself (google-cloud-storage), uploading them whole like above.
            self._tb = SummaryWriter(logdir=workdir, flush_secs=int(flush_secs), purge_step=int(resume_step) + 1)

    def _rows_kept(self, step: int) -> list[str]:
        """The lines of an existing metrics.jsonl at most at `step`, and rollback records.

        Read as bytes, line by line, so that a bad line (cut short by a crash, a stray non-UTF-8 byte, a step that
        is no integer such as 1e400) costs only itself: it is dropped with one warning for them all."""
        path = epath.Path(self._path)
        if not path.exists():
            return []
        kept, bad = [], 0
        for raw in path.read_bytes().split(b"\n"):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
                row = json.loads(line)
                row_step = row["step"]
            except (ValueError, KeyError, TypeError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                bad += 1
                continue
            if not isinstance(row_step, int) or isinstance(row_step, bool):
                bad += 1
            elif row_step <= step or "rollback_reason" in row:
                kept.append(line + "\n")
        if bad:
            logging.warning("%s: skipped %d unreadable line(s) (cut short, not UTF-8 JSON, or no integer step)",
                            self._path, bad)
        return kept

    def write(self, step: int, scalars: dict) -> None:
        if not self._enabled:
            return
        row = {"step": int(step), **{k: plain(v) for k, v in scalars.items()}}
        line = json.dumps(row) + "\n"
        if self._remote:
            self._lines.append(line)
            self._dirty = True
            if time.monotonic() - self._uploaded_at > max(self._flush_secs, 20 * self._upload_secs):
                self._upload()
        else:
            self._jsonl.write(line)
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(key, value, global_step=int(step))

    def _upload(self) -> None:
        started = time.monotonic()
        storage.write_text(self._path, "".join(self._lines))
        self._uploaded_at = time.monotonic()
        self._upload_secs, self._dirty = self._uploaded_at - started, False

    def flush(self) -> None:
        """Makes every row written so far durable (and TensorBoard's events)."""
        if not self._enabled:
            return
        if self._remote and self._dirty:
            self._upload()
        self._tb.flush()

    def close(self) -> None:
        if self._enabled:
            self.flush()
            if self._jsonl is not None:
                self._jsonl.close()
            self._tb.close()


def plain(value):
    """numpy/jax scalars -> Python numbers; NaN and inf become strings so every line stays valid JSON."""
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def summarize_window(window: list[dict], layer_names=()) -> dict:
    """One train row from the per-step metrics of the steps since the last log step (host numpy values).

    Loss, top-1, grad_norm and update_ratio average the applied steps only: a step the guard skipped is counted
    in skipped_steps instead of turning the row into NaN (NaN when every step was skipped). max_grad_norm covers
    every step, a non-finite one as inf. Per-layer norms, when the window carries them, are its last step's.
    """
    applied = [m for m in window if not m["skipped"]]

    def mean(key, rows):
        return float(np.mean([m[key] for m in rows])) if rows else float("nan")

    grad_norms = np.array([m["grad_norm"] for m in window], dtype=np.float64)
    row = {
        "train_loss": mean("train_loss", applied),
        "train_top1": mean("train_top1", applied),
        "learning_rate": mean("learning_rate", window),
        "grad_norm": mean("grad_norm", applied),
        "max_grad_norm": float(np.max(np.where(np.isfinite(grad_norms), grad_norms, np.inf))),
        "clip_fraction": mean("clipped", window),
        "update_ratio": mean("update_ratio", applied),
    }
    if "layer_grad_norms" in window[-1]:
        row.update({f"grad_norm/{name}": float(value)
                    for name, value in zip(layer_names, window[-1]["layer_grad_norms"])})
    return row


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Throughput:
    """Training images per second and ETA between log steps. Time spent in `paused()` blocks (evals, checkpoint
    saves, the train step's compilation) is left out, so neither the rate nor the ETA jumps after one, and the
    first row's ETA is that of the steps, not of compiling them.

    A window is timed to the moment its last step was first seen finished on the device: `poll` looks, without
    waiting, after every dispatched step, and `update` at the latest once the row has been fetched. Timing the
    fetch alone goes wrong where rows are fetched one log step late and then caught up (before an eval or a save,
    and at the end): when the host keeps pace with the device (multi-process runs), the caught-up window was
    finished long before its fetch, which came at once after the previous row's, and got a rate of ~1e5 img/s."""

    def __init__(self, global_batch_size: int, start_step: int, total_steps: int):
        self._batch = global_batch_size
        self._total = total_steps
        self._last = (start_step, time.perf_counter(), 0.0)  # (step, time, paused seconds so far) of the last row
        self._paused = 0.0
        self._finished: dict[int, tuple[float, float]] = {}  # window's last step -> (time, paused) first seen done

    @contextlib.contextmanager
    def paused(self):
        """Times the block (its `.seconds`) and keeps it out of the training rate."""
        timer = types.SimpleNamespace(seconds=0.0)
        start = time.perf_counter()
        try:
            yield timer
        finally:
            timer.seconds = time.perf_counter() - start
            self._paused += timer.seconds

    def poll(self, windows) -> None:
        """`windows`: (last step, its steps' metrics, on the device) of the finished windows not yet reported.
        Notes the time of each whose last step the device has finished; never waits."""
        for step, window in windows:
            if step in self._finished:
                continue
            if not all(value.is_ready() for value in window[-1].values() if hasattr(value, "is_ready")):
                break  # steps finish in order: the later windows are not done either
            self._finished[step] = (time.perf_counter(), self._paused)

    def update(self, step: int) -> tuple[float, float]:
        """(images per second, ETA seconds) for the window ending at `step`, whose metrics have been fetched."""
        now, paused = self._finished.pop(step, None) or (time.perf_counter(), self._paused)
        last_step, last_time, last_paused = self._last
        steps, seconds = step - last_step, max(now - last_time - (paused - last_paused), 1e-9)
        self._last = (step, now, paused)
        steps_per_s = steps / seconds
        eta = (self._total - step) / steps_per_s if steps_per_s else float("inf")
        return self._batch * steps_per_s, eta


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch. tensorboardX imports torch when it is installed
    (guarded by `except ImportError`), only to accept torch tensors, which we never log: 1.3 s and a few hundred
    MB at every trainer start on a machine with torch (e.g. for the PyTorch reference benchmark). While it
    imports, `import torch` is made to fail; a torch already imported by the caller is left as it is."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


def log_train(step: int, total: int, row: dict, eta: float) -> None:
    extra = "".join(f"  {label} {row[key]:{spec}}" for key, label, spec in _OPTIONAL_FIELDS if row.get(key))
    logging.info("step %d/%d  loss %.4f  top1 %.3f  lr %.3g  grad_norm %.3g (max %.3g)  upd/param %.2g  "
                 "%.0f img/s  input wait %.0f%%  ETA %s%s", step, total, row["train_loss"], row["train_top1"],
                 row["learning_rate"], row["grad_norm"], row.get("max_grad_norm", row["grad_norm"]),
                 row.get("update_ratio", 0.0), row["img_per_s"], 100 * row.get("input_wait_fraction", 0.0),
                 format_duration(eta), extra)


# Shown on the console line only when non-zero.
_OPTIONAL_FIELDS = (("mfu", "MFU", ".1%"), ("clip_fraction", "clipped", ".0%"), ("skipped_steps", "skipped", "d"),
                    ("rollbacks", "rollbacks", "d"))


class InputBoundWarning:
    """Says once, naming the fixes, when the input pipeline bounds training: the loop waited for its next batch
    for more than THRESHOLD of ROWS rows in a row. The first row is not judged (it waits for the workers to
    start)."""

    THRESHOLD, ROWS = 0.2, 3

    def __init__(self, data_config, workers: int):
        self._data, self._workers = data_config, workers  # the count in use (data.workers=-1 is resolved)
        self._rows, self._over, self._said = 0, 0, False

    def check(self, wait_fraction: float) -> None:
        self._rows += 1
        if self._said or self._rows == 1:
            return
        self._over = self._over + 1 if wait_fraction > self.THRESHOLD else 0
        if self._over >= self.ROWS:
            self._said = True
            d = self._data
            logging.warning("Input-bound: the last %d rows waited %.0f%% of their time for the next batch. Feed it "
                            "faster with more decode processes (data.workers, now %d) or threads "
                            "(data.worker_threads, now %d), or from raw-pixel records (python -m "
                            "alexnet_jax.data.convert --format=raw; see the README's 'Which record format')",
                            self.ROWS, 100 * wait_fraction, self._workers, d.get("worker_threads", 0))


def log_eval(step: int, row: dict, seconds: float | None = None) -> None:
    took = f" in {format_duration(seconds)}" if seconds is not None else ""
    ema = (f"  ema: loss {row['eval_ema_loss']:.4f}  top1 {row['eval_ema_top1']:.4f}  top5 {row['eval_ema_top5']:.4f}"
           if "eval_ema_top1" in row else "")
    logging.info("eval at step %d  loss %.4f  top1 %.4f  top5 %.4f%s  (%d examples%s)", step, row["eval_loss"],
                 row["eval_top1"], row["eval_top5"], ema, row["eval_examples"], took)


def _orbax_chatter(record) -> bool:
    # Orbax warns on every read-only open (what predict, evaluate and inference.load ask for), and on every save
    # without eval metrics (most of them).
    return "/orbax/" in record.pathname and any(
        quiet in record.getMessage() for quiet in ("Given directory is read only", "did not provide metrics"))


@contextlib.contextmanager
def orbax_chatter_dropped():
    """Drops Orbax's read-only warnings inside the block wherever absl's records go (a plain Python program has
    no absl handler to filter: the record reaches Python's own logging)."""
    quiet = std_logging.Filter()
    quiet.filter = lambda record: not _orbax_chatter(record)
    logger = std_logging.getLogger("absl")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


_library_logs_quiet = False


def quiet_library_logs() -> None:
    """Orbax logs several INFO lines per save (and JAX one per missing backend) through absl: keep their
    warnings, drop the chatter, so our own progress lines stay readable. Orbax also warns on every read-only
    open (predict, evaluate), which is exactly what those commands ask for. A failed save is logged with its
    traceback by each of Orbax's threads it passes through (a dozen, then more as they shut down): the error
    reaches us too and is reported once (checkpointing.CheckpointWriteFailed), so those are dropped.

    Idempotent: cli.run calls it for every command and most commands' main again; the filter and the two hooks
    are installed once per process."""
    global _library_logs_quiet
    if _library_logs_quiet:
        return
    _library_logs_quiet = True
    noisy = ("/orbax/", "/jax/_src/")

    def keep(record) -> bool:
        if "/orbax/" in record.pathname and record.levelno >= std_logging.ERROR and record.exc_info:
            return False
        if _orbax_write_left_unread(record):
            return False
        if _orbax_chatter(record):
            return False
        return record.levelno >= std_logging.WARNING or not any(n in record.pathname for n in noisy)

    logging.get_absl_handler().python_handler.addFilter(keep)
    sys.unraisablehook = _quiet_orbax_leftovers(sys.unraisablehook)
    sys.excepthook = _quiet_late_reads(sys.excepthook)


def _orbax_write_left_unread(record) -> bool:
    """asyncio's 'Task/Future exception was never retrieved' for Orbax's own write tasks: when one write of a save
    fails, Orbax raises the first error (reported once, see checkpointing.CheckpointWriteFailed) and leaves its
    sibling writes' errors unread, which asyncio logs one by one with tracebacks when they are collected."""
    if "/asyncio/" not in record.pathname or "never retrieved" not in str(record.msg):
        return False
    text = record.getMessage()
    return "/orbax/" in text or "OCDBT" in text or "tensorstore" in text.lower()


def _quiet_orbax_leftovers(default):
    """After a failed save, TensorStore completes the writes still in flight into the asyncio loops Orbax has
    closed meanwhile ("Event loop is closed", once per write), and at exit the coroutines of those writes are
    collected unfinished: Python reports each through sys.unraisablehook, a page of tracebacks for a failure we
    report in one line. Everything else still goes to `default`."""

    def hook(unraisable) -> None:
        leftover_callback = unraisable.object is None and _late_completion(unraisable.exc_value)
        code = getattr(unraisable.object, "cr_code", None)
        if leftover_callback or (code is not None and "/orbax/" in code.co_filename):
            return
        default(unraisable)

    return hook


def _late_completion(error) -> bool:
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _quiet_late_reads(default):
    """The same late completions on the read side: when a restore fails (a file it may not read), the reads
    still in flight complete into Orbax's closed loop, and TensorStore's C++ threads print each error through
    PyErr_Print, i.e. sys.excepthook, beside the one line we report. Only that error, raised outside the main
    thread, is dropped: an uncaught error of our own (the main thread's) still reaches `default`."""

    def hook(kind, error, traceback) -> None:
        if _late_completion(error) and threading.current_thread() is not threading.main_thread():
            return
        default(kind, error, traceback)

    return hook
