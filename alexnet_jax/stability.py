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
    `SpikeDetector` judges each step's loss and skip flag (fetched with the row, so the verdict does not depend
    on the log cadence); `Recovery` rolls back to the newest checkpoint the detector had passed (or, before any,
    goes on past the spike), skips batches, scales the learning rate, and raises `TrainingStopped` (main exits
    with code 3) after `stability.max_rollbacks` rollbacks.

Exact resume: the data stream is a pure function of the batch index (data/pipeline.py), and the index of the
batch step s consumes is s + batch_offset, with batch_offset saved in the checkpoint (a rollback rewrites the
checkpoint it restores with its new controls). Rerunning the command after a crash therefore replays the same
trajectory, rollbacks included.
"""

import collections
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from alexnet_jax import checkpointing


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
    """Gradient norms before clipping (global, and per top-level layer in sorted name order), update and param
    norms, their ratio and whether clipping engaged, as device scalars."""
    layer_sumsq = jnp.stack([_sum_of_squares(grads[name]) for name in sorted(grads)])
    grad_norm = jnp.sqrt(jnp.sum(layer_sumsq))
    update_norm = jnp.sqrt(_sum_of_squares(updates))
    param_norm = jnp.sqrt(_sum_of_squares(params))
    return {
        "grad_norm": grad_norm,
        "layer_grad_norms": jnp.sqrt(layer_sumsq),
        "update_norm": update_norm,
        "param_norm": param_norm,
        "update_ratio": update_norm / param_norm,
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
    """Judges every step's loss, whatever the log cadence: the verdict on a step never depends on how often rows
    are written, because it is made from per-step losses, not from row means.

    A loss spike is the median of the last `recent` steps' losses rising above the baseline (the median of the
    `window` steps before them) by all of: `factor` x the baseline, `min_delta` nats, and `sigmas` robust standard
    deviations (1.4826 x the median absolute deviation of the baseline steps). The median of several steps
    ignores a single hard batch, which is ordinary noise; an explosion lifts every step after it. The baseline
    needs `min_history` steps first, and a spiking step never enters it, so a run of bad steps cannot raise its own
    threshold. Separately, `max_consecutive_skips` steps in a row refused by the device guard (non-finite loss or
    gradient) also fire. 0 disables either rule.
    """

    factor: float = 2.0
    window: int = 200
    min_delta: float = 0.5
    recent: int = 10
    sigmas: float = 6.0
    max_consecutive_skips: int = 10
    min_history: int = 50

    def __post_init__(self):
        self._baseline = collections.deque(maxlen=self.window)  # (step, loss) of steps already past `recent`
        self._recent = collections.deque(maxlen=self.recent)
        self.skip_streak = 0

    @classmethod
    def from_config(cls, stability_config) -> "SpikeDetector":
        s = stability_config
        return cls(factor=float(s.spike_factor), window=int(s.spike_window), min_delta=float(s.spike_min_delta),
                   recent=int(s.spike_recent_steps), sigmas=float(s.spike_sigmas),
                   max_consecutive_skips=int(s.max_consecutive_skips), min_history=min(50, int(s.spike_window)))

    def update(self, step: int, loss: float, skipped: bool = False) -> str | None:
        """Feed one step: its loss and whether the guard refused it. Returns why it fired, or None."""
        self.skip_streak = self.skip_streak + 1 if skipped else 0
        if self.max_consecutive_skips and self.skip_streak >= self.max_consecutive_skips:
            return f"{self.skip_streak} consecutive steps had a non-finite loss, gradient or update"
        if skipped or not math.isfinite(loss):
            return None  # judged by the streak rule alone
        recent = [*(value for _, value in self._recent), loss]
        if self.factor > 0 and len(self._baseline) >= self.min_history and len(recent) >= self.recent:
            baseline = np.array([value for _, value in self._baseline])
            median = float(np.median(baseline))
            spread = 1.4826 * float(np.median(np.abs(baseline - median)))
            level = float(np.median(recent[-self.recent:]))
            threshold = max(self.factor * median, median + self.min_delta, median + self.sigmas * spread)
            if level > threshold:
                return (f"train loss {level:.4g} (median of the last {self.recent} steps) is above {threshold:.4g}, "
                        f"from the median {median:.4g} of the {len(baseline)} steps before")
        if len(self._recent) == self._recent.maxlen:
            self._baseline.append(self._recent[0])
        self._recent.append((step, loss))
        return None

    def forget_after(self, step: int) -> None:
        """Drop the steps after `step`, the recent ones and the skip streak: training restarts from `step` (a
        rollback), or goes on past a spike it could not roll back, whose steps must not judge what follows."""
        self._baseline = collections.deque(((s, v) for s, v in self._baseline if s <= step), maxlen=self.window)
        self._recent.clear()
        self.skip_streak = 0


class Recovery:
    """The host side of the guard: judges every step behind each train row; on a spike rolls back, or stops.

    A rollback restores the newest good checkpoint. A checkpoint is good once the detector has passed the steps
    trained *from* it (a checkpoint written at a step that passed may already hold the update that blew up), and
    so is the one training last (re)started from. Newer checkpoints hold the spiking stretch and are deleted, so
    a rerun of the command cannot resume from one either. Where no checkpoint is good yet, going back to the
    initialisation would throw away all the training so far and is no recovery: training goes on from where it
    is instead. Either way the data stream resumes `skip_batches` batches past the batch at which the spike was
    detected, so no batch of the discarded stretch is fed again, and the learning rate is multiplied by
    `lr_factor`. The new controls live in the optimizer state; `resave(state)` writes them into the restored
    checkpoint itself, so a run killed before its next save resumes with them.

    restore(step) -> TrainState and resave(state) own everything about layout and files. Every process computes
    the same verdict from the same replicated metrics; `agree` makes that certain before anyone acts.
    """

    def __init__(self, stability_config, *, manager, restore: Callable[[int], Any], resave: Callable[[Any], None],
                 start_step: int, controls: dict, checkpoint_dir: str = "", agree: Callable[[bool], bool] = bool):
        self.config = stability_config
        self.detector = SpikeDetector.from_config(stability_config)
        self.manager, self.restore, self.resave, self.agree = manager, restore, resave, agree
        self.checkpoint_dir = checkpoint_dir
        self.last_good_step = start_step  # the last step the detector passed
        self.anchor_step = start_step  # where training last (re)started from: a good checkpoint by construction
        self.rollbacks = int(controls["rollbacks"])
        self.lr_scale = float(controls["lr_scale"])
        self.batch_offset = int(controls["batch_offset"])
        self._reported_skip = False

    def check(self, step: int, window: Sequence[dict]) -> str | None:
        """Feed the per-step metrics of the steps up to `step`; returns why to roll back, or None."""
        first = step - len(window) + 1
        skipped = [bool(m["skipped"]) for m in window]
        if any(skipped) and not self._reported_skip:
            self._reported_skip = True
            # The loop never waits on the device between log steps, so this is said at the log step after.
            logging.warning("Step %d had a non-finite loss, gradient or update: it was skipped, params and "
                            "optimizer state left unchanged (counted in skipped_steps; reported at log step %d)",
                            first + skipped.index(True), step)
        reason = None
        for i, metrics in enumerate(window):
            reason = self.detector.update(first + i, float(metrics["train_loss"]), skipped[i])
            if reason is not None:
                break
            self.last_good_step = first + i
        fire = self.agree(reason is not None)
        return (reason or "another process saw a loss spike") if fire else None

    def _last_good_checkpoint(self) -> int | None:
        """The newest good checkpoint; deletes newer ones (they hold the spiking trajectory)."""
        checkpointing.wait(self.manager)  # a save in flight that failed is reported as its own step's
        steps = sorted(self.manager.all_steps())
        good = max((s for s in steps if s < self.last_good_step or s == self.anchor_step), default=None)
        for s in steps:
            if good is None or s > good:
                logging.warning("Deleting checkpoint %d: no step trained from it passed the spike detector", s)
                self.manager.delete(s)
        return good

    def rollback(self, state, step: int, reason: str):
        """The state to continue from after a spike detected at step `step`; raises TrainingStopped."""
        good = self._last_good_checkpoint()
        limit = int(self.config.max_rollbacks)
        if self.rollbacks >= limit:
            where = (f"checkpoint {good} in {self.checkpoint_dir} (the newest the detector passed) is where a rerun "
                     "resumes" if good is not None else "no checkpoint passed the detector, so a rerun starts over")
            raise TrainingStopped(
                f"training stopped by the stability guard at step {step}: {reason}, after {self.rollbacks} "
                f"rollback(s) (stability.max_rollbacks={limit}); {where}. Lower optim.learning_rate, set "
                "optim.clip_norm, or use BatchNorm (model.variant=bn)")
        restored_step = step if good is None else good
        self.rollbacks += 1
        self.lr_scale *= float(self.config.lr_factor)
        # Batch index step + offset was next; continue skip_batches past it. Step restored_step uses it.
        self.batch_offset += step - restored_step + int(self.config.skip_batches)
        self.detector.forget_after(restored_step)
        self.last_good_step = self.anchor_step = restored_step
        where = (f"Restarted from checkpoint {good}" if good is not None else
                 "No checkpoint has passed the detector yet, so training goes on from this step (restarting from "
                 "initialisation would lose everything learned)")
        logging.warning("Rollback %d of at most %d at step %d: %s. %s; the data stream skips %d batches; learning "
                        "rate x%g", self.rollbacks, limit, step, reason, where, int(self.config.skip_batches),
                        self.lr_scale)
        controls = {"lr_scale": self.lr_scale, "batch_offset": self.batch_offset, "rollbacks": self.rollbacks}
        if good is None:
            return set_controls(state, **controls)
        # skipped_steps stays cumulative over the whole run: the steps refused before the rollback still happened.
        restored = set_controls(self.restore(good).replace(skipped_steps=state.skipped_steps), **controls)
        self.resave(restored)
        return restored


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
    check("spike_recent_steps", lambda v: v >= 1, ">= 1", integer=True)
    check("spike_sigmas", lambda v: v >= 0, ">= 0")
    check("spike_min_delta", lambda v: v >= 0, ">= 0")
    check("max_consecutive_skips", lambda v: v >= 0, ">= 0 (0 disables the skip rule)", integer=True)
    check("skip_batches", lambda v: v >= 0, ">= 0", integer=True)
    check("lr_factor", lambda v: 0 < v <= 1, "in (0, 1]")
    check("max_rollbacks", lambda v: v >= 0, ">= 0", integer=True)
    return problems
