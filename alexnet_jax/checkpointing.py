"""Orbax checkpoints in DIR/checkpoints/<step>/, split so inference can read the model without the optimizer.

Items of a checkpoint:
  model  params and BatchNorm statistics       (what predict / evaluate / export need)
  train  step, optimizer state, skipped steps  (what resuming also needs)
  meta   JSON: the config used and the class names, so a checkpoint is self-describing

The dropout key is fold_in(seed, step) and the data stream is a function of the step, so (config, step) already
pins the RNG state and the input pipeline's position: no extra state is needed to resume exactly.
"""

import os

import jax
import ml_collections
import orbax.checkpoint as ocp

ITEMS = ("model", "train", "meta")


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def create_manager(workdir: str, max_to_keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, state, config: ml_collections.ConfigDict, class_names) -> None:
    """Starts an asynchronous save of `state` (a TrainState); training goes on while it is written."""
    step = int(jax.device_get(state.step))
    manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave({"params": state.params, "batch_stats": state.batch_stats}),
        train=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state,
                                     "skipped_steps": state.skipped_steps}),
        meta=ocp.args.JsonSave({"config": config.to_dict(), "class_names": list(class_names), "step": step}),
    ))


def _abstract(tree):
    """ShapeDtypeStructs that carry each array's sharding, so Orbax restores straight onto the target devices."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def restore_train_state(manager: ocp.CheckpointManager, step: int, target_state):
    """The full TrainState at `step`, laid out like `target_state` (whose values are only used for shape)."""
    restored = manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(_abstract({"params": target_state.params,
                                                  "batch_stats": target_state.batch_stats})),
        train=ocp.args.StandardRestore(_abstract({"step": target_state.step, "opt_state": target_state.opt_state,
                                                  "skipped_steps": target_state.skipped_steps})),
    ))
    model, train = restored.model, restored.train
    return target_state.replace(step=train["step"], params=model["params"], batch_stats=model["batch_stats"],
                                opt_state=train["opt_state"], skipped_steps=train["skipped_steps"])


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def restore_model(manager: ocp.CheckpointManager, step: int, abstract_model: dict) -> dict:
    """Only params and BatchNorm statistics, onto the shardings in `abstract_model` (no optimizer state)."""
    return manager.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(abstract_model))).model
