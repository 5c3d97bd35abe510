"""Gradient-explosion toolkit: runtime optimizer controls, per-step statistics, the spike detector and rollback.

Where each piece runs:

- On the device, inside the one jitted train step:
    `controlled(tx, clip_norm)` wraps optim.py's chain and is the trainer's only gradient clipping. Its state,
    `Controls`, lives in `opt_state`, so Orbax saves it with every checkpoint without any change to the
    checkpoint layout code. It holds four scalars that are data, not Python constants, so changing them never
    recompiles anything:
        clip_norm     global-norm clipping threshold (0 = off), applied to the gradient before decay and momentum
        lr_scale      multiplies every update, i.e. the learning rate; a rollback may shrink it
        batch_offset  step s trains on global batch s + batch_offset; a rollback advances it past the spike
        rollbacks     how many rollbacks this trajectory has been through
    `diagnose` sweeps the learning rate and clipping through one compiled step this way.
    `step_stats`: pre-clip global and per-layer gradient norms, the update/parameter norm ratio, whether the
    step was clipped. Per-layer sums of squares are what the global norm is built from, so having them every
    step costs a handful of scalar ops; the loop only fetches them every `stability.layer_stats_every` steps.
    The guard itself (a non-finite step changes nothing) is three lines of train.train_step.
- On the host, once per log step (the only time the loop waits for the device):
    `SpikeDetector` decides from the row's mean loss and the window's per-step skip flags; `Recovery` rolls back
    to the newest checkpoint the detector had passed, skips batches, scales the learning rate, and raises
    `TrainingStopped` (main exits with code 3) after `stability.max_rollbacks` rollbacks.

Exact resume: the data stream is a pure function of the batch index (data/pipeline.py), and the index of the
batch step s consumes is s + batch_offset, with batch_offset saved in the checkpoint. Rerunning the command
after a crash therefore replays the same trajectory, rollbacks included.
"""

import collections
import dataclasses
import json
import math
import os
import statistics
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging


class TrainingStopped(RuntimeError):
    """The guard gave up after `stability.max_rollbacks` rollbacks; main prints the message and exits with 3."""


# ---------------------------------------------------------------------------------------------------------------
# On the device.


class Controls(NamedTuple):
    inner: optax.OptState  # the wrapped chain's own state (momentum, ...)
    clip_norm: jax.Array  # float32, 0 = no clipping
    lr_scale: jax.Array  # float32
    batch_offset: jax.Array  # int32
    rollbacks: jax.Array  # int32


CONTROL_NAMES = ("clip_norm", "lr_scale", "batch_offset", "rollbacks")


def clip_by_global_norm(tree, clip_norm: jax.Array):
    """optax.clip_by_global_norm's formula, with the threshold a traced value and 0 meaning off."""
    norm = optax.tree.norm(tree)
    clip = (clip_norm > 0) & (norm >= clip_norm)
    return jax.tree.map(lambda t: jnp.where(clip, t / norm.astype(t.dtype) * clip_norm.astype(t.dtype), t), tree)


def controlled(tx: optax.GradientTransformation, clip_norm: float) -> optax.GradientTransformation:
    """clip(clip_norm) -> tx -> scale(lr_scale), the threshold and the scale read from the state.

    Scaling the final update is exactly scaling the learning rate for SGD, whose rate is the last factor
    (after momentum and weight decay). LARS applies its rate before momentum, so there it is exact while the
    factor stays constant; a rollback that changes it also rescales the momentum it restores.
    """

    def init(params):
        return Controls(inner=tx.init(params), clip_norm=jnp.asarray(clip_norm, jnp.float32),
                        lr_scale=jnp.ones((), jnp.float32), batch_offset=jnp.zeros((), jnp.int32),
                        rollbacks=jnp.zeros((), jnp.int32))

    def update(grads, state: Controls, params=None):
        updates, inner = tx.update(clip_by_global_norm(grads, state.clip_norm), state.inner, params)
        updates = jax.tree.map(lambda u: u * state.lr_scale.astype(u.dtype), updates)
        return updates, state._replace(inner=inner)

    return optax.GradientTransformation(init, update)


def _sum_of_squares(tree) -> jax.Array:
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


def step_stats(grads: dict, updates: dict, params: dict, controls: Controls) -> dict:
    """Gradient norms before clipping (global, and per top-level layer in sorted name order), update norm,
    update/param norm ratio and whether clipping engaged, as device scalars."""
    layer_sumsq = jnp.stack([_sum_of_squares(grads[name]) for name in sorted(grads)])
    grad_norm = jnp.sqrt(jnp.sum(layer_sumsq))
    update_norm = jnp.sqrt(_sum_of_squares(updates))
    return {
        "grad_norm": grad_norm,
        "layer_grad_norms": jnp.sqrt(layer_sumsq),
        "update_norm": update_norm,
        "update_ratio": update_norm / jnp.sqrt(_sum_of_squares(params)),
        "clipped": (controls.clip_norm > 0) & (grad_norm >= controls.clip_norm),
    }


@jax.jit
def all_finite(tree) -> jax.Array:
    """True when every floating-point value in `tree` is finite (one fused reduction on the device)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def read_controls(state) -> dict:
    """The control scalars of a TrainState as Python numbers (one small host sync)."""
    values = jax.device_get({name: getattr(state.opt_state, name) for name in CONTROL_NAMES})
    return {name: value.item() for name, value in values.items()}


def set_controls(state, **values):
    """A TrainState with some control scalars replaced, each placed on the sharding of the value it replaces."""
    controls = state.opt_state
    new = {}
    for name, value in values.items():
        old = getattr(controls, name)
        new[name] = jax.device_put(np.asarray(value, old.dtype), old.sharding)
    return state.replace(opt_state=controls._replace(**new))


# ---------------------------------------------------------------------------------------------------------------
# On the host, at log steps.


@dataclasses.dataclass
class SpikeDetector:
    """Fires when a log row's mean loss is above `factor` x the running median of the last `window` rows' losses
    (and at least `min_delta` above it, so tiny late-training losses do not fire on noise), or when
    `max_consecutive_skips` steps in a row were skipped by the guard. 0 disables either rule.

    Spiking rows are kept out of the median, so a run of bad rows cannot raise its own threshold, and a rollback
    forgets the rows of the discarded stretch (`forget_after`).
    """

    factor: float = 2.0
    window: int = 20
    min_delta: float = 0.5
    max_consecutive_skips: int = 10
    min_history: int = 3  # rows needed before the loss rule can fire

    def __post_init__(self):
        self._losses = collections.deque(maxlen=self.window)
        self.skip_streak = 0

    @classmethod
    def from_config(cls, stability_config) -> "SpikeDetector":
        return cls(factor=float(stability_config.spike_factor), window=int(stability_config.spike_window),
                   min_delta=float(stability_config.spike_min_delta),
                   max_consecutive_skips=int(stability_config.max_consecutive_skips))

    def update(self, loss: float, skipped: Sequence[bool] = (), step: int = 0) -> str | None:
        """Feed one log row: its mean loss, the per-step skip flags of its window and its step. Returns why it
        fired, or None."""
        longest = 0
        for flag in skipped:  # the streak carries across rows: N skips may straddle a log step
            self.skip_streak = self.skip_streak + 1 if flag else 0
            longest = max(longest, self.skip_streak)
        if self.max_consecutive_skips and longest >= self.max_consecutive_skips:
            return f"{longest} consecutive steps had a non-finite loss, gradient or update"
        if not math.isfinite(loss):
            return None  # every step of the row was skipped: the streak rule is the one that judges that
        if self.factor > 0 and len(self._losses) >= min(self.min_history, self.window):
            median = statistics.median(value for _, value in self._losses)
            if loss > self.factor * median and loss > median + self.min_delta:
                return f"train loss {loss:.4g} is above {self.factor:g} x its running median {median:.4g}"
        self._losses.append((step, loss))
        return None

    def forget_after(self, step: int) -> None:
        """Drop the rows logged after `step` and the skip streak: training restarts from `step`."""
        self._losses = collections.deque(((s, v) for s, v in self._losses if s <= step), maxlen=self.window)
        self.skip_streak = 0


class Recovery:
    """The host side of the guard: watches every train row; on a spike rolls back, or stops the run.

    A rollback restores the newest good checkpoint, or a fresh initialisation if there is none. A checkpoint is
    good once the detector has passed a row of steps trained *from* it (a checkpoint written at a log step that
    passed may already hold the update that blew up: its own row never saw its parameters), and so is the one
    training last (re)started from. Newer checkpoints hold the spiking stretch and are deleted, so a rerun of the
    command cannot resume from one either. The data stream then resumes `skip_batches` batches past the batch
    at which the spike was detected, so no batch of the discarded stretch is fed again, and the learning rate is
    multiplied by `lr_factor`.

    restore(step) -> TrainState and fresh() -> TrainState build the state; they own everything about layout.
    """

    def __init__(self, stability_config, *, manager, restore: Callable[[int], Any], fresh: Callable[[], Any],
                 start_step: int, controls: dict, checkpoint_dir: str = ""):
        self.config = stability_config
        self.detector = SpikeDetector.from_config(stability_config)
        self.manager, self.restore, self.fresh = manager, restore, fresh
        self.checkpoint_dir = checkpoint_dir
        self.last_good_step = start_step  # the last log step the detector passed
        self.anchor_step = start_step  # where training last (re)started from: a good checkpoint by construction
        self.rollbacks = int(controls["rollbacks"])
        self.lr_scale = float(controls["lr_scale"])
        self.batch_offset = int(controls["batch_offset"])
        self._reported_skip = False

    def check(self, step: int, row: dict, window: Sequence[dict]) -> str | None:
        """Feed the row written at `step` and the per-step metrics behind it; returns why to roll back."""
        skipped = [bool(m["skipped"]) for m in window]
        if any(skipped) and not self._reported_skip:
            self._reported_skip = True
            first = step - len(window) + 1 + skipped.index(True)
            # The loop never waits on the device between log steps, so this is said at the log step after.
            logging.warning("Step %d had a non-finite loss, gradient or update: it was skipped, params and "
                            "optimizer state left unchanged (counted in skipped_steps; reported at log step %d)",
                            first, step)
        reason = self.detector.update(row["train_loss"], skipped, step=step)
        if reason is None:
            self.last_good_step = step
        return reason

    def _last_good_checkpoint(self) -> int | None:
        """The newest good checkpoint; deletes newer ones (they hold the spiking trajectory)."""
        self.manager.wait_until_finished()
        steps = sorted(self.manager.all_steps())
        good = max((s for s in steps if s < self.last_good_step or s == self.anchor_step), default=None)
        for s in steps:
            if good is None or s > good:
                logging.warning("Deleting checkpoint %d: no row trained from it passed the spike detector", s)
                self.manager.delete(s)
        return good

    def rollback(self, state, step: int, reason: str):
        """The state to continue from after a spike detected at log step `step`; raises TrainingStopped."""
        good = self._last_good_checkpoint()
        limit = int(self.config.max_rollbacks)
        if self.rollbacks >= limit:
            where = (f"checkpoint {good} in {self.checkpoint_dir} (the newest the detector passed) is where a rerun "
                     "resumes" if good is not None else "no checkpoint passed the detector, so a rerun starts over")
            raise TrainingStopped(
                f"training stopped by the stability guard at step {step}: {reason}, after {self.rollbacks} "
                f"rollback(s) (stability.max_rollbacks={limit}); {where}. Lower optim.learning_rate, set "
                "optim.clip_norm, or use BatchNorm (model.variant=bn)")
        restored = self.fresh() if good is None else self.restore(good)
        restored_step = 0 if good is None else good
        self.rollbacks += 1
        self.lr_scale *= float(self.config.lr_factor)
        # Batch index step + offset was next; continue skip_batches past it. Restored step restored_step uses it.
        self.batch_offset += step - restored_step + int(self.config.skip_batches)
        self.detector.forget_after(restored_step)
        self.last_good_step = self.anchor_step = restored_step
        logging.warning("Rollback %d of at most %d at step %d: %s. Restarted from %s; the data stream resumes "
                        "%d batches past the spike; learning rate x%g", self.rollbacks, limit, step, reason,
                        f"checkpoint {good}" if good is not None else "initialisation (no good checkpoint)",
                        int(self.config.skip_batches), self.lr_scale)
        # skipped_steps stays cumulative over the whole run: the steps refused before the rollback still happened.
        restored = restored.replace(skipped_steps=state.skipped_steps)
        controls = {"lr_scale": self.lr_scale, "batch_offset": self.batch_offset, "rollbacks": self.rollbacks}
        write_resume_controls(self.checkpoint_dir, restored_step, controls)
        return set_controls(restored, **controls)


RESUME_CONTROLS_FILE = "rollback.json"


def write_resume_controls(checkpoint_dir: str, step: int, controls: dict) -> None:
    """Records the controls a rollback chose for resuming from checkpoint `step`.

    That checkpoint was written before the rollback, so its opt_state holds the old batch offset and LR factor;
    without this file a run killed before its next save would replay the spike at the old rate. The next
    checkpoint carries the controls itself, and this file then no longer matches the newest step.
    """
    if jax.process_index() != 0 or not checkpoint_dir:
        return
    path = os.path.join(checkpoint_dir, RESUME_CONTROLS_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump({"resume_step": int(step), **{k: controls[k] for k in ("lr_scale", "batch_offset", "rollbacks")}},
                  f)
    os.replace(path + ".tmp", path)  # atomic: a kill leaves the old file or the new one, never half of one


def read_resume_controls(checkpoint_dir: str, step: int) -> dict | None:
    """The controls recorded for resuming from checkpoint `step` (0: from initialisation), or None."""
    try:
        with open(os.path.join(checkpoint_dir, RESUME_CONTROLS_FILE)) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    if saved.get("resume_step") != step:
        return None
    return {"lr_scale": float(saved["lr_scale"]), "batch_offset": int(saved["batch_offset"]),
            "rollbacks": int(saved["rollbacks"])}


def validate_stability_config(stability_config) -> list[str]:
    """Every problem with `config.stability`, each naming the full key; empty when all is well."""
    s, problems = stability_config, []

    def check(key, ok, requirement, integer=False):
        value = s.get(key)
        kind_ok = (isinstance(value, int) if integer else isinstance(value, (int, float))) \
            and not isinstance(value, bool)
        if not kind_ok or (not integer and not math.isfinite(value)):
            problems.append(f"stability.{key} must be {'an integer' if integer else 'a finite number'} "
                            f"(got {value!r})")
        elif not ok(value):
            problems.append(f"stability.{key} must be {requirement} (got {value!r})")

    check("layer_stats_every", lambda v: v > 0, "> 0", integer=True)
    check("spike_factor", lambda v: v == 0 or v > 1, "> 1 (0 disables the loss-spike rule)")
    check("spike_window", lambda v: v >= 1, ">= 1", integer=True)
    check("spike_min_delta", lambda v: v >= 0, ">= 0")
    check("max_consecutive_skips", lambda v: v >= 0, ">= 0 (0 disables the skip rule)", integer=True)
    check("skip_batches", lambda v: v >= 0, ">= 0", integer=True)
    check("lr_factor", lambda v: 0 < v <= 1, "in (0, 1]")
    check("max_rollbacks", lambda v: v >= 0, ">= 0", integer=True)
    return problems
