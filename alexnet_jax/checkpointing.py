"""Orbax checkpoints in DIR/checkpoints/<step>/, split so inference can read the model without the optimizer.

Items of a checkpoint:
  model  params and BatchNorm statistics       (what predict / evaluate / export need)
  train  step, optimizer state, skipped steps  (what resuming also needs)
  meta   JSON: the config used and the class names, so a checkpoint is self-describing
  bn     BatchNorm statistics recomputed at the checkpoint's weights (precise_bn.py), where they were computed;
         inference reads them instead of the running averages in `model` (which resuming keeps using)
  ema    with optim.ema_decay > 0: the moving average of the params, and BatchNorm statistics for it

The dropout key is fold_in(seed, step) and step s reads global batch s + batch_offset (an offset that only a
stability rollback moves, kept in the optimizer state), so (config, checkpoint) pins the RNG state and the input
pipeline's position: nothing else is needed to resume exactly.
"""

import errno
import json
import os
import re
import signal
import time
import weakref

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from alexnet_jax import models, sharding, storage

ITEMS = ("model", "train", "meta", "bn", "ema")
BEST_METRIC = "eval_top1"  # the default of the best_metric config key
EVAL_METRICS_KEPT = ("eval_top1", "eval_ema_top1")  # what each checkpoint's Orbax metrics record


def _score(metrics: dict, best_metric: str) -> float:
    """A checkpoint's rank; one saved before `best_metric` was measured ranks last."""
    return float(metrics.get(best_metric, float("-inf")))


def checkpoint_dir(workdir: str) -> str:
    """DIR/checkpoints, absolute when local; a gs:// workdir is passed to Orbax (tensorstore) unchanged."""
    return storage.join(storage.absolute(workdir), "checkpoints")


class CheckpointUnreadable(Exception):
    """Checkpoints exist but none can be used, and nothing was moved: a file that cannot be read (access, I/O,
    transport: not evidence of damage), or damage everywhere the run could resume from. One line for `error:`."""


# How sure we are that a checkpoint is bad, in the order processes agree on (the worst verdict wins).
_GOOD, _DAMAGED, _UNREADABLE = 0, 1, 2

# TensorStore raises ValueError("<absl status code>: ..."); these codes are what damaged bytes produce (a
# truncated file: OUT_OF_RANGE, garbage: DATA_LOSS or FAILED_PRECONDITION from the decompressor, a missing file:
# NOT_FOUND). PERMISSION_DENIED, UNAVAILABLE, DEADLINE_EXCEEDED, UNKNOWN (an EIO) and the rest say nothing about
# the bytes.
_DAMAGE_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "FAILED_PRECONDITION", "INVALID_ARGUMENT")
# An OS error's text inside a TensorStore message wins over its status code.
_ACCESS_WORDS = ("Permission denied", "Operation not permitted", "Input/output error", "timed out", "Timeout",
                 "Connection refused", "Connection reset", "Network is unreachable", "No route to host",
                 "Stale file handle", "Too many open files", "Cannot allocate memory")


class _BadMeta(ValueError):
    """meta/metadata or metrics/metrics parsed but is not what `save` writes."""


_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


def _chain(error: BaseException):
    seen = []
    while error is not None and error not in seen and len(seen) < 16:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def _tensorstore_file_and_cause(message: str) -> tuple[str | None, str]:
    """The last file a TensorStore message names and what went wrong with it: '... Failed to open: "/x/d/1f":
    Permission denied [tensorstore_spec=...]' -> ("/x/d/1f", "Permission denied")."""
    text = message.split(" [tensorstore_spec")[0]
    files = [f for f in re.findall(r'"([^"]+)"', text) if f.startswith("/") or "://" in f]
    cause = text.rsplit('": ', 1)[-1] if '": ' in text else text.split(":", 1)[0]
    return (files[-1] if files else None), " ".join(cause.split())[:200]


def judge(error: BaseException, where: str) -> tuple[bool, str]:
    """(is_damage, "FILE: cause") for an exception raised while reading the checkpoint at `where`.

    Damage needs evidence: a parse error, or a file of a published (so once complete) checkpoint that is
    truncated, garbled or missing. Access, I/O and transport errors, and anything unrecognised, are not damage:
    moving a checkpoint aside for them would throw away one that is fine."""
    chain = _chain(error)
    for e in chain:
        if isinstance(e, OSError) and not isinstance(e, _MISSING) and e.errno not in (
                errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
            return False, f"{e.filename or where}: {e.strerror or e}"
        message = str(e)
        code = message.split(":", 1)[0]
        if isinstance(e, ValueError) and re.fullmatch(r"[A-Z]+(_[A-Z]+)*", code):
            file, cause = _tensorstore_file_and_cause(message)
            said = message.split(" [tensorstore_spec")[0].lower()  # the spec is JSON settings, not what happened
            access = next((w for w in _ACCESS_WORDS if w.lower() in said), None)
            return code in _DAMAGE_CODES and access is None, f"{file or where}: {access or cause or code}"
    for e in chain:
        if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError, _BadMeta, *_MISSING)):
            file = getattr(e, "filename", None) or where
            return True, f"{file}: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        if isinstance(e, KeyError) and "was not found in the checkpoint" in str(e):  # a whole item missing
            return True, f"{where}: {' '.join(str(e).strip(chr(39)).split())[:200]}"
    return False, f"{where}: {type(error).__name__}: {' '.join(str(error).split())[:200]}"


def _agree(verdict: int) -> int:
    """The worst verdict of all processes, on every process."""
    if jax.process_count() == 1:
        return verdict
    return int(np.max(multihost_utils.process_allgather(np.asarray(verdict, np.int32))))


def _union(steps) -> set[int]:
    """The union of every process's `steps`."""
    if jax.process_count() == 1:
        return set(steps)
    width = int(np.max(multihost_utils.process_allgather(np.asarray(len(steps), np.int32))))
    if width == 0:
        return set()
    padded = np.full(width, -1, np.int32)
    padded[:len(steps)] = sorted(steps)
    return {int(s) for s in np.ravel(multihost_utils.process_allgather(padded)) if s >= 0}


def _metrics_damage(directory: str) -> dict[int, str]:
    """step -> why, for each checkpoint whose metrics file (written by Orbax for best_fn) is damaged.

    Orbax's manager parses them all when it is created and a garbled one stops it with a bare JSONDecodeError,
    so they are read here first. One that cannot be read (not damage) raises CheckpointUnreadable."""
    damaged, unreadable = {}, None
    root = epath.Path(directory)
    try:
        children = list(root.iterdir()) if root.is_dir() else []
    except OSError as error:
        raise CheckpointUnreadable(f"cannot list {directory}: {error.strerror or error}; nothing was moved") from None
    for child in children:
        if not child.name.isdigit():
            continue
        path = child / "metrics" / "metrics"
        try:
            metrics = json.loads(path.read_bytes())
            if not (isinstance(metrics, dict) and isinstance(metrics.get(BEST_METRIC), (int, float))):
                raise _BadMeta(f"holds no {BEST_METRIC} number")  # what `save` writes; Orbax's BestN reads it
        except FileNotFoundError:  # a checkpoint saved without eval metrics
            continue
        except Exception as error:
            is_damage, why = judge(error, os.fspath(path))
            if is_damage:
                damaged[int(child.name)] = why
            else:
                unreadable = unreadable or why
    if _agree(_UNREADABLE if unreadable else _GOOD) == _UNREADABLE:
        raise CheckpointUnreadable(f"cannot read {unreadable or 'a checkpoint metrics file (on another process)'}"
                                   f"; nothing was moved (fix the access)")
    return {step: damaged.get(step, "another process found its metrics damaged") for step in _union(damaged)}


class _HideSteps:
    """Orbax's standard step names, less `hidden` (checkpoints with a damaged metrics file, which would stop the
    manager at its creation); restore_newest_good / load_for_inference still see them in `manager.damaged`."""

    def __init__(self, hidden):
        self._standard, self._hidden = ocp.step.standard_name_format(), set(hidden)

    def __getattr__(self, name):
        return getattr(self._standard, name)

    def find_all(self, base_path):
        return (m for m in self._standard.find_all(base_path) if m.step not in self._hidden)


class Manager(ocp.CheckpointManager):
    """An Orbax CheckpointManager that also knows the steps it hides as damaged: `damaged` is step -> why."""

    damaged: dict[int, str] = {}


def create_manager(workdir: str, max_to_keep: int = 3, read_only: bool = False,
                   best_metric: str = BEST_METRIC) -> Manager:
    directory = checkpoint_dir(workdir)
    if not read_only:
        _finish_resave(directory)
    damaged = _metrics_damage(directory)
    hide = {"step_name_format": _HideSteps(damaged)} if damaged else {}
    if read_only:  # Orbax warns unless saving-related options are off for a read-only manager
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0, **hide)
    else:
        # Keep the newest `max_to_keep` (for resuming) and, beside them, the one with the best `best_metric`.
        score = lambda metrics: _score(metrics, best_metric)
        policy = checkpoint_managers.AnyPreservationPolicy([
            checkpoint_managers.LatestN(n=max_to_keep),
            checkpoint_managers.BestN(get_metric_fn=score, reverse=False, n=1, keep_checkpoints_without_metrics=False),
        ])
        # best_fn makes Orbax write each checkpoint's metrics to disk, so the best one is still known (and kept)
        # after a restart; without it they live in memory only.
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=score, best_mode="max", **hide)
    try:
        manager = Manager(directory, options=options, item_names=ITEMS)
    except Exception as error:  # e.g. a step's _CHECKPOINT_METADATA or metrics that this user may not read
        is_damage, why = judge(error, directory)
        if is_damage:
            raise
        raise CheckpointUnreadable(f"cannot read {why}; nothing was moved (fix the access)") from None
    manager.damaged = damaged
    return manager


class CheckpointWriteFailed(Exception):
    """The checkpoint of `step` could not be written (disk full, a write refused or failed by the storage); main
    exits 4. Earlier checkpoints are intact: Orbax publishes a step only once all of its files are written."""

    def __init__(self, step, directory, cause: str):
        super().__init__(f"the checkpoint of step {step} could not be written to {directory}: {cause}")
        self.step = step


# The step of each manager's save in flight: its failure surfaces only at the next wait (or the next save, which
# waits first), and must be reported as that step's. A manager whose save failed is never waited on again: Orbax
# would re-raise the same error at every wait, close() included.
_in_flight: "weakref.WeakKeyDictionary[ocp.CheckpointManager, int]" = weakref.WeakKeyDictionary()
_failed: "weakref.WeakSet[ocp.CheckpointManager]" = weakref.WeakSet()


def _write_error(error: BaseException) -> str:
    """'No space left on device (writing FILE)' from the exceptions Orbax/TensorStore raise for a failed write,
    which carry the OS error as text; otherwise their first line."""
    text = " ".join(str(error).split())
    code = re.search(r"os_error_code='?(\d+)", text)
    file = re.search(r'(?:Failed writing|Error writing local file):? "([^"]+)"', text)
    # Orbax's own check that a folder it made is still there: the storage lost it (e.g. a mount now hides it)
    vanished = re.search(r"Checkpoint directory does not exist: (\S+?)\.?$", text)
    if isinstance(error, OSError) and error.strerror:
        cause, where = error.strerror, error.filename
    elif vanished:
        cause, where = os.strerror(errno.ENOENT), vanished.group(1)
    elif code:
        cause, where = os.strerror(int(code.group(1))), file and file.group(1)
    else:
        cause, where = f"{type(error).__name__}: {text[:300]}", None
    return f"{cause} (writing {where})" if where else cause


def _failure(manager, step, error) -> CheckpointWriteFailed:
    _failed.add(manager)
    return CheckpointWriteFailed(step, manager.directory, _write_error(error))


def wait(manager: ocp.CheckpointManager) -> None:
    """Waits for the save in flight; raises CheckpointWriteFailed naming its step if it could not be written."""
    if manager in _failed:
        return
    step = _in_flight.pop(manager, None)
    try:
        manager.wait_until_finished()
    except Exception as error:  # TensorStore and Orbax raise ValueError, RuntimeError, OSError, ... for this
        raise _failure(manager, step, error) from None


def close(manager: ocp.CheckpointManager) -> None:
    """manager.close(), reporting a save in flight that fails as `wait` does. After a reported failure, what
    close() raises is that failure again, from another of Orbax's waits (the async writer's, the metadata
    store's): it is logged, not raised, so the caller's handling of the reported error (exit 4) is not replaced
    by a traceback."""
    wait(manager)
    if manager not in _failed:
        manager.close()
        return
    manager.wait_until_finished = lambda: None  # close() begins with the wait that raised the reported error
    try:
        manager.close()
    except Exception as error:  # the same failure, or its aftermath in a folder the storage refused
        logging.info("Closing the checkpoint manager after the failed save: %s", _write_error(error))


def save(manager: ocp.CheckpointManager, state, config: ml_collections.ConfigDict, class_names,
         eval_metrics: dict | None = None, bn_stats: dict | None = None, ema_bn_stats: dict | None = None) -> None:
    """Starts an asynchronous save of `state` (a TrainState); training goes on while it is written. Every
    process must call it (each writes its own shards). `eval_metrics` from the same step rank it for BestN;
    `bn_stats`, BatchNorm statistics recomputed at these weights, go in the `bn` item, and `ema_bn_stats`
    (those of the EMA weights) beside the EMA in the `ema` item (the running averages where there are none).
    Raises CheckpointWriteFailed if the previous save, or the start of this one, failed."""
    step = int(jax.device_get(state.step))
    wait(manager)  # the previous save's failure is that step's, not this one's
    kept = {key: float(eval_metrics[key]) for key in EVAL_METRICS_KEPT if key in (eval_metrics or {})}
    metrics = kept or None
    items = {
        "model": ocp.args.StandardSave({"params": state.params, "batch_stats": state.batch_stats}),
        "train": ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state,
                                        "skipped_steps": state.skipped_steps}),
        "meta": ocp.args.JsonSave({"config": config.to_dict(), "class_names": list(class_names), "step": step}),
    }
    if bn_stats is not None:
        items["bn"] = ocp.args.StandardSave({"batch_stats": bn_stats})
    if state.ema_params is not None:
        items["ema"] = ocp.args.StandardSave({"params": state.ema_params, "batch_stats": state.batch_stats
                                              if ema_bn_stats is None else ema_bn_stats})
    try:
        manager.save(step, metrics=metrics, args=ocp.args.Composite(**items))
    except Exception as error:
        raise _failure(manager, step, error) from None
    _in_flight[manager] = step


def _restore_in_step(manager: ocp.CheckpointManager, step: int, args):
    """manager.restore(step, args), keeping a process whose read fails in step with the others.

    Each process reads only the shards its devices hold, so a damaged file can fail the restore on one process
    alone. Orbax's restore ends in a barrier (a collective, "Checkpointer:restore") that the processes whose read
    succeeded are waiting in; a failed process that went on to the next collective (the vote in any_process)
    would be paired with the wrong one and hang or crash the job. So it first meets them at that barrier, then
    raises. The barrier's name and process set are Orbax's internals (orbax-checkpoint 0.11-0.12's
    Checkpointer.restore); the defaults used where they are missing are Orbax's own."""
    try:
        return manager.restore(step, args=args)
    except Exception:
        if jax.process_count() > 1:
            checkpointer = getattr(manager, "_checkpointer", None)
            prefix = getattr(checkpointer, "_barrier_sync_key_prefix", None)
            ocp.multihost.sync_global_processes(ocp.multihost.unique_barrier_key("Checkpointer:restore", prefix=prefix),
                                                processes=getattr(checkpointer, "_active_processes", None))
        raise


def restore_train_state(manager: ocp.CheckpointManager, step: int, target_state):
    """The full TrainState at `step`, read straight onto the shardings of `target_state` (ShapeDtypeStructs)."""
    restored = _restore_in_step(manager, step, ocp.args.Composite(
        model=ocp.args.StandardRestore({"params": target_state.params, "batch_stats": target_state.batch_stats}),
        train=ocp.args.StandardRestore({"step": target_state.step, "opt_state": target_state.opt_state,
                                        "skipped_steps": target_state.skipped_steps}),
    ))
    model, train = restored.model, restored.train
    ema_params = None
    if target_state.ema_params is not None:
        if has_item(manager, step, "ema"):
            ema_params = _restore_in_step(manager, step, ocp.args.Composite(ema=ocp.args.StandardRestore(
                {"params": target_state.ema_params, "batch_stats": target_state.batch_stats}))).ema["params"]
        else:  # written with optim.ema_decay = 0, or before the average existed
            logging.info("The checkpoint at step %d has no weight average: starting it from its params", step)
            ema_params = jax.tree.map(jnp.copy, model["params"])
    return target_state.replace(step=train["step"], params=model["params"], batch_stats=model["batch_stats"],
                                opt_state=train["opt_state"], skipped_steps=train["skipped_steps"],
                                ema_params=ema_params)


def resave(manager: ocp.CheckpointManager, state, config: ml_collections.ConfigDict, class_names,
           eval_metrics: dict | None = None) -> None:
    """Replaces the checkpoint at state.step with `state`, so that no moment exists where neither copy does.

    The new one is written beside it (<step>.resave/<step>, published by Orbax only when complete), then swapped
    in by two renames: <step> -> <step>.replaced, the new one -> <step>; the old copy is deleted last. A kill at
    any point leaves the old or the new checkpoint, which `_finish_resave` puts back in place when the next
    run opens the directory. Every process must call it."""
    step = int(jax.device_get(state.step))
    root = epath.Path(manager.directory)
    wait(manager)
    # The weights are the checkpoint's own: so are the BatchNorm statistics recomputed for them.
    bn_stats, ema_bn_stats = _inference_stats(manager, step, state)
    staging = ocp.CheckpointManager(root / f"{step}.resave", item_names=ITEMS, options=ocp.CheckpointManagerOptions(
        best_fn=lambda m: _score(m, BEST_METRIC), best_mode="max"))  # best_fn: so that it writes the metrics file
    try:
        save(staging, state, config, class_names, eval_metrics, bn_stats, ema_bn_stats)
        wait(staging)
    finally:
        staging.close()
    multihost_utils.sync_global_devices(f"checkpoint {step} rewritten")
    if jax.process_index() == 0:
        (root / str(step)).rename(root / f"{step}.replaced")
        (root / f"{step}.resave" / str(step)).rename(root / str(step))
        _remove_leftovers(root, step)
    multihost_utils.sync_global_devices(f"checkpoint {step} swapped")
    manager.reload()


def _remove_leftovers(root: epath.Path, step: int) -> None:
    for leftover in (root / f"{step}.replaced", root / f"{step}.resave"):
        if leftover.exists():
            leftover.rmtree()


def _finish_resave(directory: str) -> None:
    """Completes a `resave` that a kill interrupted: the old copy goes back to <step> if the swap had begun
    without finishing, and whatever is left beside it is removed. Process 0 acts; the others wait for it."""
    root = epath.Path(directory)
    if jax.process_index() == 0 and root.is_dir():
        for child in list(root.iterdir()):
            name, _, kind = child.name.partition(".")
            if name.isdigit() and kind in ("replaced", "resave"):
                if kind == "replaced" and not (root / name).exists():
                    logging.warning("Restoring %s from %s: a re-save after a rollback was cut short", root / name,
                                    child)
                    child.rename(root / name)
                _remove_leftovers(root, int(name))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("interrupted re-saves finished")


class IncompatibleCheckpoint(ValueError):
    """The checkpoint is fine but was written by a different model or optimizer than the config asks for."""


# Settings that change the shapes or tree structure of the train state: resuming across them cannot work.
_STATE_DEFINING_KEYS = (("model", "variant"), ("model", "num_classes"), ("model", "width"), ("optim", "optimizer"))


def check_compatible(meta: dict, config: ml_collections.ConfigDict, directory: str) -> None:
    if meta.get("inference_only"):
        raise IncompatibleCheckpoint(f"{directory} holds an inference-only checkpoint (no optimizer state, e.g. "
                                     "from import_torchvision): train in another --workdir")
    saved = meta.get("config", {})
    for section, key in _STATE_DEFINING_KEYS:
        before, now = saved.get(section, {}).get(key), config[section][key]
        if before is not None and before != now:
            raise IncompatibleCheckpoint(
                f"{section}.{key}={now!r} but the checkpoints in {directory} were trained with {before!r}: "
                "use the same setting or another --workdir")
    before = saved.get("batch_size")
    if before is not None and before != config.batch_size:  # same shapes, so nothing else would notice
        raise IncompatibleCheckpoint(
            f"batch_size={config.batch_size} but the checkpoints in {directory} were trained with {before}: the "
            "global batch decides which examples form each step and where the schedule is, so a resume keeps it "
            "(devices, processes and the mesh may change); use the same batch_size or another --workdir")


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any: one decision for all hosts before any of them acts on
    it (a damaged checkpoint seen by one, a stop request that reached one)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def _check_meta(meta) -> dict:
    if not (isinstance(meta, dict) and isinstance(meta.get("config"), dict)
            and isinstance(meta.get("class_names"), list)):
        raise _BadMeta("meta/metadata holds no config and class names")
    return meta


def _read(manager, step: int, read, item: str = "") -> tuple[int, object, str | None]:
    """(agreed verdict, read(), why) for one read of checkpoint `step` (of its `item` file, if one) that every
    process makes."""
    try:
        value = read()
    except IncompatibleCheckpoint:
        raise
    except Exception as error:
        if "tree structures do not match" in str(error):  # intact, from another layout: not damage
            raise IncompatibleCheckpoint(
                f"the checkpoint at step {step} in {manager.directory} holds a train state of another layout "
                f"(another optimizer or an older version of this trainer): use another --workdir. "
                f"{' '.join(str(error).split())[:300]}") from None
        is_damage, why = judge(error, storage.join(manager.directory, str(step), item))
        return _agree(_DAMAGED if is_damage else _UNREADABLE), None, why
    return _agree(_GOOD), value, None


def _unreadable(manager, step: int, why: str | None) -> CheckpointUnreadable:
    return CheckpointUnreadable(
        f"cannot read checkpoint {step} in {manager.directory}: {why or 'another process could not read its part'}"
        "; nothing was moved (fix the access, or move that step aside to resume from an older one)")


def _set_aside(manager: ocp.CheckpointManager, damaged: dict[int, str], resuming_from: int | None) -> None:
    """Moves each damaged step to <step>.corrupt-<time> (nothing is deleted), with a warning saying why: it no
    longer blocks a later save of the same step number, and is no longer a step anyone resumes from."""
    if not damaged:
        return
    multihost_utils.sync_global_devices("checkpoints judged")  # every process has read what it needs
    stamp = time.strftime("%Y%m%d-%H%M%S")  # after the barrier: the same names in every process's warnings
    for step, why in sorted(damaged.items(), reverse=True):
        directory = storage.join(manager.directory, str(step))
        aside = f"{directory}.corrupt-{stamp}"
        logging.warning("Checkpoint %s cannot be restored (%s); moved it to %s and %s", directory, why, aside,
                        f"resuming from step {resuming_from}" if resuming_from is not None else "starting over "
                        "(restart_if_checkpoints_unusable=True)")
        if jax.process_index() == 0:
            epath.Path(directory).rename(aside)  # on GCS a copy then delete: Orbax no longer lists it
    # Every process must agree on what is left before any of them saves or restores again.
    multihost_utils.sync_global_devices("checkpoints moved aside")
    manager.reload()


def restore_newest_good(manager: ocp.CheckpointManager, target_state, config: ml_collections.ConfigDict):
    """(state, step) from the newest checkpoint that restores, or (None, None) if there is none.

    Orbax only publishes a checkpoint by renaming its finished temporary folder, so a save cut short by SIGKILL
    never appears as a step. A published one can still be damaged afterwards (a truncated copy, a bad disk):
    evidence of that (see `judge`) in its arrays, its meta/metadata or its metrics file makes it unusable, and
    once an older one has restored, the damaged newer ones are moved aside as <step>.corrupt-<time>, each with a
    warning saying why. Nothing is deleted, and nothing moves when the run cannot go on:
    - a file that cannot be read (access, I/O, transport errors) raises CheckpointUnreadable: the checkpoint may
      well be fine;
    - checkpoints exist but all are damaged: CheckpointUnreadable too, unless
      config.restart_if_checkpoints_unusable, which moves them aside and returns (None, None).
    A readable checkpoint from another model or optimizer is not damage: IncompatibleCheckpoint stops the run.
    Each process reads only its own shards, so damage may show on one process alone: every read is followed by
    a vote (see _restore_in_step), so all processes take the same decision about each step and restore the same.
    """
    damaged = dict(getattr(manager, "damaged", {}))
    for step in sorted(set(manager.all_steps()) - set(damaged), reverse=True):
        verdict, meta, why = _read(manager, step, lambda: _check_meta(restore_meta(manager, step)), "meta/metadata")
        if verdict == _GOOD:
            check_compatible(meta, config, str(manager.directory))
            verdict, state, why = _read(manager, step, lambda: restore_train_state(manager, step, target_state))
        if verdict == _UNREADABLE:
            raise _unreadable(manager, step, why)
        if verdict == _GOOD:
            _set_aside(manager, damaged, step)
            return state, step
        damaged[step] = why or "another process could not read its part"
    if damaged and not config.get("restart_if_checkpoints_unusable", False):
        raise CheckpointUnreadable(
            f"no checkpoint in {manager.directory} can be restored: "
            + "; ".join(f"step {s}: {w}" for s, w in sorted(damaged.items(), reverse=True))
            + "; nothing was moved (rerun with --config.restart_if_checkpoints_unusable=True to move them aside "
            "and train from step 0)")
    _set_aside(manager, damaged, None)
    return None, None


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    return _restore_in_step(manager, step, ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def has_item(manager: ocp.CheckpointManager, step: int, item: str) -> bool:
    return epath.Path(storage.join(manager.directory, str(step), item)).is_dir()


def has_precise_bn(manager: ocp.CheckpointManager, step: int) -> bool:
    """Whether the checkpoint at `step` holds recomputed BatchNorm statistics (written since they exist, for a
    BatchNorm model with precise_bn_examples > 0, and finite when computed)."""
    return has_item(manager, step, "bn")


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _inference_stats(manager: ocp.CheckpointManager, step: int, state) -> tuple[dict | None, dict | None]:
    """The BatchNorm statistics the checkpoint at `step` keeps for inference beside its state: those recomputed
    for its params (or None) and those of its weight average (or None), laid out like `state.batch_stats`."""
    bn_stats = restore_precise_bn(manager, step, _abstract(state.batch_stats))
    if state.ema_params is None or not has_item(manager, step, "ema"):
        return bn_stats, None
    ema = _restore_in_step(manager, step, ocp.args.Composite(ema=ocp.args.StandardRestore(
        _abstract({"params": state.ema_params, "batch_stats": state.batch_stats})))).ema
    return bn_stats, ema["batch_stats"]


def restore_precise_bn(manager: ocp.CheckpointManager, step: int, abstract_batch_stats: dict) -> dict | None:
    """The checkpoint's recomputed BatchNorm statistics (shaped and sharded like `abstract_batch_stats`), or None
    where it has none."""
    if not has_precise_bn(manager, step):
        return None
    restored = _restore_in_step(manager, step, ocp.args.Composite(
        bn=ocp.args.StandardRestore({"batch_stats": abstract_batch_stats})))
    return restored.bn["batch_stats"]


class CheckpointNotFound(FileNotFoundError):
    pass


WEIGHTS = ("raw", "ema")  # which weights of a checkpoint inference loads (--weights)


def default_weights(config) -> str:
    """The weights best_metric ranks checkpoints by: what predict/evaluate/export load unless told."""
    return "ema" if config.get("best_metric", BEST_METRIC) == "eval_ema_top1" else "raw"


def restore_model(manager: ocp.CheckpointManager, step: int, abstract_model: dict, weights: str = "raw") -> dict:
    """Params and the BatchNorm statistics inference should use, onto the shardings in `abstract_model` (no
    optimizer state). weights="raw": the trained params, with the statistics recomputed at them where the
    checkpoint has them, the running averages otherwise; "ema": the weight average and its statistics."""
    if weights == "ema":
        return _restore_in_step(manager, step, ocp.args.Composite(ema=ocp.args.StandardRestore(abstract_model))).ema
    model = _restore_in_step(manager, step, ocp.args.Composite(model=ocp.args.StandardRestore(abstract_model))).model
    precise = restore_precise_bn(manager, step, abstract_model["batch_stats"])
    return model if precise is None else {"params": model["params"], "batch_stats": precise}


def load_for_inference(workdir: str, step: int | None = None, mesh=None, weights: str | None = None):
    """(config, class_names, model_vars, step) from DIR/checkpoints: params and BatchNorm statistics only;
    `weights` "raw" or "ema" (see restore_model), by default the ones the run's best_metric ranks.

    Params land replicated on this machine's devices (or `mesh`), whatever topology trained them: Orbax reads
    each array onto the explicit target sharding we pass, so a checkpoint written by 4 devices with fc6/fc7 split
    over 'model', or by a pod slice, loads on one CPU. The optimizer state (the `train` item) is never read, so a
    checkpoint that has none (see `save_for_inference`) loads the same way. `config` is the checkpoint's own: it
    describes the model that was trained.

    By default the newest checkpoint that loads: damaged newer ones are skipped with one warning (nothing is
    moved). CheckpointUnreadable for a file that cannot be read, a damaged `step`, or when all are damaged.
    """
    unreachable = storage.unreachable(workdir)
    if unreachable:  # else a minute of retries, then "no checkpoints"
        raise CheckpointNotFound(unreachable)
    if not epath.Path(checkpoint_dir(workdir)).is_dir():
        raise CheckpointNotFound(f"no checkpoints in {checkpoint_dir(workdir)}")
    manager = create_manager(workdir, read_only=True)
    try:
        steps = sorted(set(manager.all_steps()) | set(manager.damaged))
        if step is not None and step not in steps:
            raise CheckpointNotFound(f"no checkpoint at step {step} in {checkpoint_dir(workdir)} (have: {steps})")
        mesh = sharding.create_mesh(1) if mesh is None else mesh
        damaged = {}
        for candidate in [step] if step is not None else steps[::-1]:
            loaded, why = _load_model(manager, candidate, mesh, weights)
            if loaded is not None:
                if damaged:  # one line: what was skipped, and what is used instead
                    logging.warning("Checkpoint %s is damaged (%s)%s; using checkpoint %d instead (pick one with "
                                    "--checkpoint=STEP)", storage.join(manager.directory, str(max(damaged))),
                                    damaged[max(damaged)], f", and so are {sorted(damaged)[:-1]}" if len(damaged) > 1
                                    else "", candidate)
                return (*loaded, candidate)
            damaged[candidate] = why
        others = [s for s in steps if s not in damaged]
        raise CheckpointUnreadable(
            f"checkpoint {step} in {manager.directory} is damaged ({why}); pick another with --checkpoint=STEP "
            f"(have: {others})" if step is not None else
            f"no checkpoint in {manager.directory} can be loaded, all are damaged: "
            + "; ".join(f"step {s}: {w}" for s, w in sorted(damaged.items(), reverse=True)))
    finally:
        manager.close()


def _load_model(manager: ocp.CheckpointManager, step: int, mesh, weights: str | None = None):
    """((config, class_names, model_vars), None) for checkpoint `step`, or (None, why) if it is damaged.
    Raises CheckpointUnreadable for a file that cannot be read."""
    if step in manager.damaged:
        return None, manager.damaged[step]
    verdict, meta, why = _read(manager, step, lambda: _check_meta(restore_meta(manager, step)), "meta/metadata")
    if verdict == _GOOD:
        config = ml_collections.ConfigDict(meta["config"])
        replicated = sharding.replicated(mesh)
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                              models.abstract_model_vars(config.model))
        chosen = weights or default_weights(config)
        if chosen == "ema" and not has_item(manager, step, "ema"):  # not damage: the run kept no average
            raise CheckpointNotFound(f"the checkpoint at step {step} in {manager.directory} holds no weight average "
                                     "(trained with optim.ema_decay=0): use --weights=raw")
        verdict, model_vars, why = _read(manager, step, lambda: restore_model(manager, step, target, chosen))
    if verdict == _UNREADABLE:
        raise _unreadable(manager, step, why)
    return (None, why or "another process could not read its part") if verdict else (
        (config, meta["class_names"], model_vars), None)


def save_for_inference(workdir: str, model_vars: dict, config: ml_collections.ConfigDict, class_names, *,
                       step: int = 0, extra_meta: dict | None = None) -> str:
    """Writes DIR/checkpoints/<step>/ with only the `model` and `meta` items, for weights made elsewhere.

    Imported weights (import_torchvision) have no optimizer state worth storing: an invented one would bind the
    checkpoint to one optimizer config and double its size. Such a checkpoint is read by `load_for_inference`
    (predict, evaluate, export); meta["inference_only"] marks it, so a training run can tell it is not resumable.
    Refuses to overwrite an existing step. Returns the checkpoint directory.
    """
    manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(create=True),
                                    item_names=ITEMS)
    try:
        if step in manager.all_steps():
            raise FileExistsError(f"{checkpoint_dir(workdir)}/{step} already exists; not overwriting it")
        meta = {"config": config.to_dict(), "class_names": list(class_names), "step": int(step),
                "inference_only": True, **(extra_meta or {})}
        manager.save(step, args=ocp.args.Composite(
            model=ocp.args.StandardSave({"params": model_vars["params"], "batch_stats": model_vars["batch_stats"]}),
            meta=ocp.args.JsonSave(meta),
        ))
        manager.wait_until_finished()
    finally:
        manager.close()
    return storage.join(checkpoint_dir(workdir), str(step))


class PreemptionWatch:
    """Asks the loop to checkpoint and stop, at the same step on every process.

    - Ctrl-C (SIGINT): the first one asks for a checkpoint and a clean stop; a second aborts at once.
    - SIGTERM (schedulers, `kill`): in a single-process run, the same as a first Ctrl-C. In a multi-process run
      JAX's distributed runtime owns SIGTERM and shares a preemption notice (also TPU maintenance events) with
      every process, with a sync point that makes them all stop at one step.
    - A Ctrl-C that reached some processes only (multi-process): the processes compare notes at log steps.
    """

    def __init__(self, manager: ocp.CheckpointManager):
        self._manager = manager
        self.signal_name = None
        self._previous = {signal.SIGINT: signal.signal(signal.SIGINT, self._on_signal)}
        if jax.process_count() == 1:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        if signum == signal.SIGINT:
            if self.signal_name == "SIGINT":
                raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait for the save
            # Plain write: logging from a signal handler can deadlock on the handler lock the loop holds.
            os.write(2, b"\nInterrupted: checkpointing the current step, then stopping (Ctrl-C again aborts "
                        b"without saving)\n")
        self.signal_name = signal.Signals(signum).name

    def reason(self, step: int, compare_notes: bool = True) -> str | None:
        """Why to stop after `step`, or None. `compare_notes` (a collective) only at steps all processes share."""
        if jax.process_count() == 1:
            return self.signal_name
        if self._manager.reached_preemption(step):
            return "preemption notice"
        if compare_notes and any_process(self.signal_name is not None):
            return self.signal_name or "a signal to another process"
        return None

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
