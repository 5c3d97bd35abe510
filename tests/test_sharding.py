"""The hybrid layout (batch over every device, classifier split over 'model') and ZeRO-1 optimizer state.

Layouts only change where arrays live and in which order XLA sums, so every layout must train to the same
losses. The multi-device checks run in a subprocess with 4 simulated CPU devices (this process has one).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from alexnet_jax import config as config_lib
from alexnet_jax import sharding
from conftest import REPO, tiny_config

STEPS = 8
# (mesh.model, mesh.shard_optimizer_state); the first is plain data parallelism, the reference.
LAYOUTS = ((1, False), (2, False), (4, False), (1, True), (2, True))


def _train_losses(model_axis: int, shard_optimizer_state: bool) -> dict:
    """Losses of STEPS steps on a fixed random batch, plus what each device holds; runs in the worker."""
    from alexnet_jax import optim, train

    config = tiny_config(**{"mesh.model": model_axis, "mesh.shard_optimizer_state": shard_optimizer_state,
                            "model.num_classes": 8})
    mesh = sharding.mesh_for(config)
    lr_fn = optim.create_learning_rate_fn(config.optim, 100, STEPS)
    tx = train.create_optimizer(config.optim, lr_fn)
    abstract = train.abstract_train_state(config, mesh, tx)
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    state = train.create_train_state(config, tx, abstract)
    step_fn, _ = train.compile_steps(config, mesh, tx, lr_fn, shardings)
    rng = np.random.default_rng(0)
    # One batch, memorised step after step: the loss must fall, so every step applies a real update.
    batch = {"image": rng.integers(0, 256, (config.batch_size, 64, 64, 3), dtype=np.uint8),
             "label": rng.integers(0, 8, (config.batch_size,), dtype=np.int32)}
    losses = []
    for _ in range(STEPS):
        state, metrics = step_fn(state, sharding.host_to_global(batch, mesh))
        losses.append(float(metrics["train_loss"]))
    momentum = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
                if "fc6" in jax.tree_util.keystr(path) and "kernel" in jax.tree_util.keystr(path)]
    return {"losses": losses,
            "param_bytes": sharding.bytes_per_device(state.params),
            "opt_bytes": sharding.bytes_per_device(state.opt_state),
            "fc6_kernel_spec": list(map(str, state.params["fc6"]["kernel"].sharding.spec)),
            "fc6_momentum_spec": [list(map(str, m.sharding.spec)) for m in momentum]}


@pytest.fixture(scope="module")
def layouts():
    env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    result = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return {tuple(json.loads(key)): value for key, value in json.loads(result.stdout.splitlines()[-1]).items()}


def test_every_layout_trains_to_the_same_losses(layouts):
    reference = layouts[(1, False)]["losses"]
    assert len(reference) == STEPS and reference[-1] < reference[0]  # it does learn
    for layout, run in layouts.items():
        # Only the order of XLA's sums differs between layouts: float rounding, nothing more.
        assert run["losses"] == pytest.approx(reference, rel=1e-5), layout


def test_model_axis_splits_the_classifier_and_shrinks_what_each_device_holds(layouts):
    assert layouts[(2, False)]["fc6_kernel_spec"] == ["None", "model"]
    assert (layouts[(4, False)]["param_bytes"] < layouts[(2, False)]["param_bytes"]
            < layouts[(1, False)]["param_bytes"])


def test_sharded_optimizer_state_splits_momentum_over_data(layouts):
    for model_axis in (1, 2):
        plain, zero = layouts[(model_axis, False)], layouts[(model_axis, True)]
        assert zero["param_bytes"] == plain["param_bytes"]  # ZeRO-1: parameters stay where they were
        # Momentum is the whole optimizer state but a few scalars; the 1/4 or 1/2 data axis splits the large
        # leaves (small ones stay whole, see MIN_SHARDED_ELEMENTS).
        data_axis = 4 // model_axis
        assert zero["opt_bytes"] < plain["opt_bytes"] * 0.6 / (data_axis / 2)
        assert zero["fc6_momentum_spec"] == [["data", "model"]]


def test_mesh_is_data_major_and_model_inner():
    mesh = sharding.create_mesh(1)
    assert mesh.axis_names == ("data", "model") and dict(mesh.shape) == {"data": jax.device_count(), "model": 1}
    with pytest.raises(ValueError, match="mesh.model=3"):
        sharding.create_mesh(3, devices=jax.devices() * 4)
    with pytest.raises(ValueError, match="mesh.num_slices=3"):
        sharding.create_mesh(1, num_slices=3, devices=jax.devices() * 4)
    # Slices over DCN are TPU slices or, on CPU/GPU, processes: this one process cannot be two.
    with pytest.raises(ValueError, match="mesh.num_slices=2"):
        sharding.create_mesh(1, num_slices=2, devices=jax.devices() * 2)


def test_spec_rules():
    mesh = sharding.create_mesh(1)
    assert sharding.spec_for("fc8/kernel", (256, 10), mesh) == P(None, "model")
    assert sharding.spec_for("conv1/kernel", (11, 11, 3, 64), mesh) == P()
    fake = type("FakeMesh", (), {"shape": {"data": 4, "model": 2}})()
    # fc8 is split only where the class count divides; a 4-way data axis then takes the largest whole dim.
    assert sharding.spec_for("fc8/kernel", (256, 5), fake) == P()
    assert sharding.with_data_axis(P(None, "model"), (9216, 4096), fake) == P("data", "model")
    assert sharding.with_data_axis(P(), (3, 3, 384, 256), fake) == P(None, None, "data", None)
    assert sharding.with_data_axis(P(), (64,), fake) == P()  # too small to pay for a collective


@pytest.mark.parametrize("overrides, key", [
    ({"mesh.model": 3}, "mesh.model must divide the 4 devices"),
    # width 0.0015 leaves fc6/fc7 6 wide, which a 4-way model axis cannot split
    ({"mesh.model": 4, "model.width": 0.0015}, "mesh.model=4 must divide the fc6/fc7 width 6"),
    ({"batch_size": 18}, "batch_size=18 must be divisible by the 4 devices"),
    ({"eval_batch_size": 6}, "eval_batch_size=6 must be divisible by the 4 devices"),
    ({"mesh.num_slices": 3}, "mesh.num_slices=3"),
])
def test_validation_names_the_key(overrides, key):
    with pytest.raises(config_lib.ConfigError, match=key):
        config_lib.validate(tiny_config(**overrides), num_devices=4)


@pytest.mark.parametrize("override, devices, message", [
    ("--config.mesh.model=2", 1, "error: config: mesh.model must divide the 1 devices (got 2)"),
    # The numbers add up (2 data-parallel devices), but one process cannot be two DCN slices.
    ("--config.mesh.num_slices=2", 2, "error: config: mesh.model=1, mesh.num_slices=2: no 2x1 mesh on these 2 "
                                      "devices: Number of slices 1 must equal the product of dcn_mesh_shape (2, 1)"),
])
def test_a_mesh_that_cannot_be_built_exits_2_with_one_line(tmp_path, override, devices, message):
    from conftest import run_cli

    workdir = tmp_path / "run"
    result = run_cli("alexnet_jax.main", "--config=configs/digits.py", f"--workdir={workdir}", override,
                     "--config.batch_size=16",
                     env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [message]
    assert not workdir.exists()


if __name__ == "__main__":
    print(json.dumps({json.dumps(layout): _train_losses(*layout) for layout in LAYOUTS}))


HLO = """
  %all-reduce.1 = f32[256,576]{1,0} all-reduce(f32[256,576]{1,0} %dot.11), channel_id=56, to_apply=%add
  %ag-start = (f32[8,256]{1,0}, f32[16,256]{1,0}) all-gather-start(f32[8,256]{1,0} %x), dimensions={0}
  %ag-done = f32[16,256]{1,0} all-gather-done((f32[8,256]{1,0}, f32[16,256]{1,0}) %ag-start)
  %a2a = (bf16[1,4,1,500]{3,2,1,0}, bf16[1,4,1,500]{3,2,1,0}) all-to-all(%p, %q), channel_id=63
  %conv = f32[4,15,15,4]{3,2,1,0} convolution(%img, %k), dim_labels=b01f_01io->b01f, metadata={op_name=\
"jit(step)/jvp()/conv_general_dilated"}
  %wgrad = f32[12,3,3,24]{3,2,1,0} convolution(%a, %b), dim_labels=b01f_01io->b01f, metadata={op_name=\
"jit(step)/transpose(jvp())/conv_general_dilated"}
"""


def test_collectives_and_conv_batch_are_read_off_hlo_text():
    from alexnet_jax import summary

    counts, total = summary.collectives(HLO)
    assert counts == {"all-reduce": 1, "all-gather": 1, "reduce-scatter": 0, "all-to-all": 1,
                      "collective-permute": 0}
    # Results only, an async pair once (its -done): 256*576 + 16*256 float32, two 2,000-element bfloat16 arrays.
    assert total == 4 * (256 * 576 + 16 * 256) + 2 * 2 * 2000
    assert summary.conv_batch_per_device(HLO) == 4  # the weight-gradient convolution is not a batch


TINY_IMAGENET = ["--config=configs/imagenet.py", "--config.model.width=0.0625", "--config.data.image_size=64",
                 "--config.batch_size=16"]


@pytest.fixture(scope="module")
def parallelism():
    from conftest import run_cli

    reports = {}
    for model_axis in (1, 4):
        result = run_cli("alexnet_jax.summary", *TINY_IMAGENET, f"--config.mesh.model={model_axis}", "--json",
                         env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
        assert result.returncode == 0, result.stderr[-3000:]
        assert "collectives per step" in result.stdout  # the console form precedes the JSON line
        reports[model_axis] = json.loads(result.stdout.strip().splitlines()[-1])["parallelism"]
    return reports


def test_summary_reports_the_compiled_steps_parallelism(parallelism):
    data_parallel, model_parallel = parallelism[1], parallelism[4]
    assert data_parallel["devices"] == model_parallel["devices"] == 4
    assert data_parallel["mesh"] == {"data": 4, "model": 1} and model_parallel["mesh"] == {"data": 1, "model": 4}
    # The hybrid layout's point: the convolutions see 16 / 4 images per device whatever mesh.model is.
    assert data_parallel["conv_batch_per_device"] == model_parallel["conv_batch_per_device"] == 4
    # Pure data parallelism all-reduces every gradient: at least the whole parameter set moves.
    assert data_parallel["collectives"]["all-reduce"] >= 1
    assert data_parallel["collective_bytes_per_step"] >= data_parallel["param_bytes_per_device"]
    # fc6-fc8 (most of the parameters) are split four ways.
    assert model_parallel["param_bytes_per_device"] < data_parallel["param_bytes_per_device"] / 2
    assert model_parallel["opt_state_bytes_per_device"] < data_parallel["opt_state_bytes_per_device"] / 2
    # ... so their gradients need no all-reduce across the model axis: far fewer bytes move.
    assert model_parallel["collective_bytes_per_step"] * 3 < data_parallel["collective_bytes_per_step"]


def test_a_global_batch_on_cpu_owns_its_memory():
    """On CPUs a jax.Array made from a numpy array may be that array's own memory. With grain workers the host
    batch is a shared-memory block, which would then live for as long as XLA holds the device array and be freed
    on XLA's threads, at times after the pipeline's close waited for its blocks ("leaked shared_memory" at exit):
    the global batch is a copy, so the host batch's life ends with it."""
    host = {"image": np.arange(48, dtype=np.uint8).reshape(4, 2, 2, 3), "label": np.arange(4, dtype=np.int32)}
    batch = sharding.host_to_global(host, sharding.create_mesh())
    for key, array in host.items():
        np.testing.assert_array_equal(np.asarray(batch[key]), array)
        pointers = {shard.data.unsafe_buffer_pointer() for shard in batch[key].addressable_shards}
        assert array.ctypes.data not in pointers, key
