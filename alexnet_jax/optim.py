"""The optimizer: learning-rate schedules, the weight-decay mask and the optax chain built from `config.optim`.

Order of the chain, and why:

        clip(clip_norm) -> add_decayed_weights(weight_decay, kernels only) -> SGD (momentum/nesterov) -> x lr_scale
        clip(clip_norm) -> LARS (does its own masked decay and trust ratio)                      -> x lr_scale

Clipping acts on the loss gradient alone and decay is added after it, as in torchvision's reference script
(`clip_grad_norm_` on `.grad`, then `SGD(weight_decay=...)` adds `wd * w` inside `step()`); a spike therefore
cannot shrink the decay term. The clip and the final learning-rate factor are `stability.controlled`, the one
clipping implementation: its threshold and factor are scalars in the optimizer state, not compiled-in
constants, so `diagnose` sweeps them through one compiled step and a rollback changes them without a recompile.

Schedule clocks (the step passed in is the number of updates already applied, so the first update uses step 0):
- warmup ramps linearly from 0 at step 0 to the main schedule's value at step `warmup_steps`, which is
    `learning_rate` unless warmup outlasts the first decay (then it ramps to the decayed value, never jumping).
- "step" and "exponential" are defined per epoch, so they run on the training clock: "divide by 10 every 30
    epochs" decays at epoch 30, 60, ... whether or not warmup was used; warmup only replaces the first
    `warmup_steps` values.
- "cosine" and "polynomial" start their clock when warmup ends and reach `learning_rate *
    end_learning_rate_factor` exactly at `num_train_steps`, so warmup does not cut the tail of the curve off.
    "polynomial" is You et al.'s LARS schedule, lr * (1 - t/T)^polynomial_power (power 2 in their paper).
"""

import math
import numbers
from typing import Any

import jax
import optax

from alexnet_jax import stability

OPTIMIZERS = ("sgd", "lars")
SCHEDULES = ("step", "exponential", "cosine", "polynomial", "constant")

# Used only where a config omits a key; base_config() sets all of them. learning_rate has no default on purpose:
# a run that silently trained at some library's favourite rate would be worse than one that refuses to start.
_DEFAULTS = {
        "optimizer": "sgd",
        "schedule": "step",
        "warmup_steps": 0,
        "momentum": 0.9,
        "nesterov": False,
        "weight_decay": 5e-4,
        "clip_norm": 0.0,
        "decay_epochs": 30,
        "decay_factor": 0.1,
        "exponential_decay_rate": 0.94,
        "end_learning_rate_factor": 0.0,
        "polynomial_power": 2.0,
        "lars_trust_coefficient": 0.001,
        "label_smoothing": 0.0,
        "grad_accum_steps": 1,
        "ema_decay": 0.0,
}

# The L2 norm over every leaf of a tree, what clip_by_global_norm compares with clip_norm. optax 0.2.8 deprecates
# optax.global_norm in favour of this same function.
global_norm = optax.tree.norm


def get(optim_config, key: str) -> Any:
    """`optim_config[key]`, or its default where the config predates the key (e.g. one saved in a checkpoint)."""
    return optim_config.get(key, _DEFAULTS.get(key))


def create_learning_rate_fn(optim_config, steps_per_epoch: int, num_train_steps: int) -> optax.Schedule:
    """Maps the number of updates applied so far (an int, or an int array under jit) to the learning rate."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1 (got {steps_per_epoch})")
    if num_train_steps < 1:
        raise ValueError(f"num_train_steps must be >= 1 (got {num_train_steps})")
    learning_rate = float(optim_config["learning_rate"])
    schedule = get(optim_config, "schedule")
    warmup_steps = int(get(optim_config, "warmup_steps"))

    if schedule in ("step", "exponential"):
        if schedule == "step":
            # round(): fractional decay_epochs (e.g. 2.5) still land on a whole step.
            steps_per_decay = max(1, round(float(get(optim_config, "decay_epochs")) * steps_per_epoch))
            rate = float(get(optim_config, "decay_factor"))
        else:
            steps_per_decay = steps_per_epoch
            rate = float(get(optim_config, "exponential_decay_rate"))
        # staircase: the rate changes once per period, as torchvision's StepLR/ExponentialLR stepped per epoch do.
        main = optax.exponential_decay(
                learning_rate, transition_steps=steps_per_decay, decay_rate=rate, staircase=True)
        if warmup_steps == 0:
            return main
        peak = learning_rate * rate ** (warmup_steps // steps_per_decay)
        after_warmup = lambda step: main(step + warmup_steps)  # join_schedules restarts the clock; undo that.
    elif schedule == "cosine":
        end_factor = float(get(optim_config, "end_learning_rate_factor"))
        after_warmup = optax.cosine_decay_schedule(
                learning_rate, decay_steps=max(1, num_train_steps - warmup_steps), alpha=end_factor)
        peak = learning_rate
    elif schedule == "polynomial":
        end_factor = float(get(optim_config, "end_learning_rate_factor"))
        after_warmup = optax.polynomial_schedule(
                learning_rate, learning_rate * end_factor, power=float(get(optim_config, "polynomial_power")),
                transition_steps=max(1, num_train_steps - warmup_steps))
        peak = learning_rate
    elif schedule == "constant":
        after_warmup = optax.constant_schedule(learning_rate)
        peak = learning_rate
    else:
        raise ValueError(f"optim.schedule must be one of {', '.join(SCHEDULES)} (got {schedule!r})")

    if warmup_steps == 0:
        return after_warmup
    warmup = optax.linear_schedule(0.0, peak, transition_steps=warmup_steps)
    return optax.join_schedules([warmup, after_warmup], boundaries=[warmup_steps])


def weight_decay_mask(params) -> Any:
    """True where a leaf is a conv or linear kernel; biases and BatchNorm scale/bias (all 1-D) are not decayed.

    Decay on BatchNorm's scale/bias pulls against the normalisation without regularising anything, and biases
    barely affect capacity; this is "no bias decay" (He et al. 2019, Bag of Tricks) and torchvision's
    `--norm-weight-decay 0`. Shape-based, so it also works on jax.ShapeDtypeStruct trees and on any layer names.
    """
    return jax.tree.map(lambda p: len(p.shape) > 1, params)


def create_optimizer(optim_config, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
    """The whole optimizer: clip -> decay -> SGD or LARS -> learning-rate factor, its state a stability.Controls.

    The state's tree is the same whether or not clipping is on (the threshold is a value, 0 = off), so a run
    can be resumed with clipping switched on, off or changed.
    """
    return stability.controlled(_chain(optim_config, learning_rate_fn), float(get(optim_config, "clip_norm")))


def _chain(optim_config, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
    weight_decay = float(get(optim_config, "weight_decay"))
    momentum = float(get(optim_config, "momentum"))
    nesterov = bool(get(optim_config, "nesterov"))
    optimizer = get(optim_config, "optimizer")

    if optimizer == "sgd":
        return optax.chain(
                optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
                optax.sgd(learning_rate_fn, momentum=momentum, nesterov=nesterov),
        )
    if optimizer == "lars":
        # optax's masks select where a transformation applies (True = decay / trust ratio), as weight_decay_mask
        # marks kernels. Same mask for the trust ratio, as MLPerf's ResNet LARS reference does: a bias or BN vector
        # starts at or near zero norm, so a step size proportional to its norm would barely move it; those take
        # plain momentum SGD steps at the global rate. optax's ratio is coefficient * ||w|| / ||g + wd * w||, You et
        # al.'s Algorithm 1 has ||g|| + wd * ||w|| below: a kernel's step before momentum is then exactly, and in the
        # paper at most (triangle inequality), lr * coefficient * ||w||.
        return optax.lars(
                learning_rate_fn,
                weight_decay=weight_decay,
                weight_decay_mask=weight_decay_mask,
                trust_coefficient=float(get(optim_config, "lars_trust_coefficient")),
                trust_ratio_mask=weight_decay_mask,
                momentum=momentum,
                nesterov=nesterov,
        )
    raise ValueError(f"optim.optimizer must be one of {', '.join(OPTIMIZERS)} (got {optimizer!r})")


def _is_real(value) -> bool:
    # bool is an int to Python, but `momentum=True` is a typo, not 1.0.
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def validate_optim_config(optim_config) -> list[str]:
    """Every problem with `config.optim`, each a sentence naming the full key; empty when the config can train.

    Keys that only matter to another schedule or optimizer are checked only when that one is selected, so a
    leftover value there never blocks a run.
    """
    problems = []

    def check_real(key, ok, requirement):
        value = get(optim_config, key)
        if not _is_real(value):
            problems.append(f"optim.{key} must be a finite number (got {value!r})")
        elif not ok(value):
            problems.append(f"optim.{key} must be {requirement} (got {value!r})")

    optimizer = get(optim_config, "optimizer")
    if optimizer not in OPTIMIZERS:
        problems.append(f"optim.optimizer must be one of {', '.join(OPTIMIZERS)} (got {optimizer!r})")

    if "learning_rate" not in optim_config:
        problems.append("optim.learning_rate is missing")
    else:
        check_real("learning_rate", lambda v: v > 0, "> 0")

    schedule = get(optim_config, "schedule")
    if schedule not in SCHEDULES:
        problems.append(f"optim.schedule must be one of {', '.join(SCHEDULES)} (got {schedule!r})")

    warmup_steps = get(optim_config, "warmup_steps")
    if not _is_int(warmup_steps):
        problems.append(f"optim.warmup_steps must be an integer (got {warmup_steps!r})")
    elif warmup_steps < 0:
        problems.append(f"optim.warmup_steps must be >= 0 (got {warmup_steps!r})")

    # momentum >= 1 makes the trace grow without bound.
    check_real("momentum", lambda v: 0 <= v < 1, "in [0, 1)")
    nesterov = get(optim_config, "nesterov")
    if not isinstance(nesterov, bool):
        problems.append(f"optim.nesterov must be True or False (got {nesterov!r})")
    elif nesterov and _is_real(momentum := get(optim_config, "momentum")) and momentum == 0:
        # Same rule as torch.optim.SGD: nesterov without momentum is plain SGD, so the flag is a mistake somewhere.
        problems.append(f"optim.nesterov requires optim.momentum > 0 (got True with momentum {momentum!r})")
    check_real("weight_decay", lambda v: v >= 0, ">= 0")
    check_real("clip_norm", lambda v: v >= 0, ">= 0 (0 disables clipping)")

    if schedule == "step":
        check_real("decay_epochs", lambda v: v > 0, "> 0")
        check_real("decay_factor", lambda v: 0 < v <= 1, "in (0, 1]")
    elif schedule == "exponential":
        check_real("exponential_decay_rate", lambda v: 0 < v <= 1, "in (0, 1]")
    elif schedule in ("cosine", "polynomial"):
        check_real("end_learning_rate_factor", lambda v: 0 <= v <= 1, "in [0, 1]")
    if schedule == "polynomial":
        check_real("polynomial_power", lambda v: v > 0, "> 0")
    if optimizer == "lars":
        # You et al. bound each layer's step at trust x its weight norm with trust < 1; at 0 nothing with a
        # trust ratio (every kernel) would ever move.
        check_real("lars_trust_coefficient", lambda v: 0 < v < 1, "in (0, 1)")
    # 1 would put no weight at all on the true class.
    check_real("label_smoothing", lambda v: 0 <= v < 1, "in [0, 1) (0 disables it)")
    check_real("ema_decay", lambda v: 0 <= v < 1, "in [0, 1) (0 disables the weight average; e.g. 0.9998)")
    grad_accum_steps = get(optim_config, "grad_accum_steps")
    if not _is_int(grad_accum_steps):
        problems.append(f"optim.grad_accum_steps must be an integer (got {grad_accum_steps!r})")
    elif grad_accum_steps < 1:
        problems.append(f"optim.grad_accum_steps must be >= 1 (1 = one pass over the whole batch) "
                        f"(got {grad_accum_steps!r})")
    return problems
