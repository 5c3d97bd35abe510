import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from alexnet_jax import optim


def make_optim_config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(
            optimizer="sgd", learning_rate=0.01, schedule="step", decay_epochs=30, decay_factor=0.1,
            exponential_decay_rate=0.94, end_learning_rate_factor=0.0, warmup_steps=0, momentum=0.9, nesterov=False,
            weight_decay=5e-4, clip_norm=0.0))
    c.update(overrides)
    return c


def lr_at(fn, step):
    # Through jit with an int32 array, as the train step calls it.
    return float(jax.jit(fn)(jnp.asarray(step, jnp.int32)))


# --- schedules -------------------------------------------------------------------------------------------------

def test_step_schedule_divides_by_ten_every_30_epochs():
    fn = optim.create_learning_rate_fn(make_optim_config(), steps_per_epoch=10, num_train_steps=900)
    for step, expected in [(0, 0.01), (299, 0.01), (300, 0.001), (599, 0.001), (600, 1e-4), (899, 1e-4)]:
        assert lr_at(fn, step) == pytest.approx(expected, rel=1e-5), step


def test_warmup_is_linear_from_zero_to_peak():
    fn = optim.create_learning_rate_fn(
            make_optim_config(schedule="constant", warmup_steps=100), steps_per_epoch=10, num_train_steps=900)
    assert lr_at(fn, 0) == 0.0
    for step in (1, 25, 50, 99):
        assert lr_at(fn, step) == pytest.approx(0.01 * step / 100, rel=1e-5)
    assert lr_at(fn, 100) == pytest.approx(0.01, rel=1e-6)
    assert lr_at(fn, 500) == pytest.approx(0.01, rel=1e-6)


def test_step_boundaries_stay_on_the_training_clock_with_warmup():
    fn = optim.create_learning_rate_fn(
            make_optim_config(warmup_steps=50), steps_per_epoch=10, num_train_steps=900)
    assert lr_at(fn, 25) == pytest.approx(0.005, rel=1e-5)
    assert lr_at(fn, 50) == pytest.approx(0.01, rel=1e-6)
    assert lr_at(fn, 299) == pytest.approx(0.01, rel=1e-6)
    assert lr_at(fn, 300) == pytest.approx(0.001, rel=1e-5)
    assert lr_at(fn, 600) == pytest.approx(1e-4, rel=1e-5)


def test_warmup_longer_than_first_decay_ramps_to_the_decayed_value():
    fn = optim.create_learning_rate_fn(
            make_optim_config(schedule="exponential", warmup_steps=25), steps_per_epoch=10, num_train_steps=900)
    at_end_of_warmup = 0.01 * 0.94**2
    assert lr_at(fn, 25) == pytest.approx(at_end_of_warmup, rel=1e-5)
    assert lr_at(fn, 24) == pytest.approx(at_end_of_warmup * 24 / 25, rel=1e-5)
    assert lr_at(fn, 30) == pytest.approx(0.01 * 0.94**3, rel=1e-5)


def test_exponential_multiplies_by_the_rate_once_per_epoch():
    fn = optim.create_learning_rate_fn(
            make_optim_config(schedule="exponential", learning_rate=0.1), steps_per_epoch=10, num_train_steps=900)
    for step, epochs in [(0, 0), (9, 0), (10, 1), (19, 1), (25, 2), (500, 50)]:
        assert lr_at(fn, step) == pytest.approx(0.1 * 0.94**epochs, rel=1e-5), step


def test_cosine_ends_at_the_end_factor_and_starts_after_warmup():
    config = make_optim_config(schedule="cosine", learning_rate=0.1, end_learning_rate_factor=0.01, warmup_steps=100)
    fn = optim.create_learning_rate_fn(config, steps_per_epoch=10, num_train_steps=1100)
    assert lr_at(fn, 0) == 0.0
    assert lr_at(fn, 100) == pytest.approx(0.1, rel=1e-6)
    assert lr_at(fn, 600) == pytest.approx(0.1 * (1 + 0.01) / 2, rel=1e-5)  # halfway through the cosine
    assert lr_at(fn, 1100) == pytest.approx(0.001, rel=1e-4)
    assert lr_at(fn, 5000) == pytest.approx(0.001, rel=1e-4)


def test_cosine_without_warmup_decays_to_zero_by_default():
    config = make_optim_config(schedule="cosine", learning_rate=0.1)
    del config["end_learning_rate_factor"]
    fn = optim.create_learning_rate_fn(config, steps_per_epoch=10, num_train_steps=200)
    assert lr_at(fn, 0) == pytest.approx(0.1, rel=1e-6)
    assert lr_at(fn, 100) == pytest.approx(0.05, rel=1e-5)
    assert lr_at(fn, 200) == pytest.approx(0.0, abs=1e-9)


def test_polynomial_decays_as_the_square_of_the_remaining_fraction_after_warmup():
    # You et al.'s LARS schedule: warmup, then lr * (1 - t/T)^2 over the steps left after warmup.
    config = make_optim_config(schedule="polynomial", learning_rate=14.0, warmup_steps=5, polynomial_power=2.0)
    fn = optim.create_learning_rate_fn(config, steps_per_epoch=10, num_train_steps=105)
    assert lr_at(fn, 0) == 0.0
    assert lr_at(fn, 3) == pytest.approx(14.0 * 3 / 5, rel=1e-5)
    assert lr_at(fn, 5) == pytest.approx(14.0, rel=1e-6)
    assert lr_at(fn, 30) == pytest.approx(14.0 * 0.75**2, rel=1e-5)
    assert lr_at(fn, 55) == pytest.approx(14.0 * 0.25, rel=1e-5)
    assert lr_at(fn, 105) == pytest.approx(0.0, abs=1e-6)
    ending = make_optim_config(schedule="polynomial", learning_rate=1.0, polynomial_power=1.0,
                               end_learning_rate_factor=0.1)
    fn = optim.create_learning_rate_fn(ending, steps_per_epoch=10, num_train_steps=100)
    assert lr_at(fn, 50) == pytest.approx(0.55, rel=1e-5)
    assert lr_at(fn, 100) == pytest.approx(0.1, rel=1e-5)


def test_constant():
    fn = optim.create_learning_rate_fn(make_optim_config(schedule="constant"), steps_per_epoch=10, num_train_steps=9)
    assert {round(lr_at(fn, s), 9) for s in (0, 1, 300, 10**6)} == {0.01}


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="optim.schedule"):
        optim.create_learning_rate_fn(make_optim_config(schedule="foo"), steps_per_epoch=10, num_train_steps=9)


# --- the chain -------------------------------------------------------------------------------------------------

def one_update(config, params, grads, steps=1):
    tx = optim.create_optimizer(config, optax.constant_schedule(float(config.learning_rate)))
    state = tx.init(params)
    update = jax.jit(tx.update)
    results = []
    for g in (grads if steps > 1 else [grads]):
        u, state = update(g, state, params)
        results.append(u)
    return results if steps > 1 else results[0]


def small_params():
    return {"conv": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros((2,))}}


def test_clipping_scales_a_large_gradient_to_the_threshold_keeping_its_direction():
    config = make_optim_config(learning_rate=1.0, momentum=0.0, weight_decay=0.0, clip_norm=1.0)
    grads = {"conv": {"kernel": jnp.array([[6.0, 0.0], [0.0, 0.0]]), "bias": jnp.array([8.0, 0.0])}}
    assert float(optim.global_norm(grads)) == pytest.approx(10.0)
    update = one_update(config, small_params(), grads)
    assert float(optim.global_norm(update)) == pytest.approx(1.0, rel=1e-6)
    expected = jax.tree.map(lambda g: -g / 10.0, grads)
    jax.tree.map(lambda u, e: np.testing.assert_allclose(u, e, rtol=1e-6), update, expected)


def test_clipping_leaves_a_small_gradient_alone():
    config = make_optim_config(learning_rate=1.0, momentum=0.0, weight_decay=0.0, clip_norm=1.0)
    grads = {"conv": {"kernel": jnp.array([[0.3, 0.0], [0.0, 0.0]]), "bias": jnp.array([0.4, 0.0])}}
    update = one_update(config, small_params(), grads)
    jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -g, rtol=1e-6), update, grads)


def test_clip_norm_zero_disables_clipping():
    config = make_optim_config(learning_rate=1.0, momentum=0.0, weight_decay=0.0, clip_norm=0.0)
    grads = {"conv": {"kernel": jnp.full((2, 2), 100.0), "bias": jnp.full((2,), -100.0)}}
    update = one_update(config, small_params(), grads)
    jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -g, rtol=1e-6), update, grads)


def test_weight_decay_is_added_after_clipping():
    config = make_optim_config(learning_rate=1.0, momentum=0.0, weight_decay=0.5, clip_norm=1.0)
    params = {"conv": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)}}
    grads = {"conv": {"kernel": jnp.array([[6.0, 0.0], [0.0, 0.0]]), "bias": jnp.array([8.0, 0.0])}}
    update = one_update(config, params, grads)
    # The decay term 0.5 * 2 = 1 on the kernel would be shrunk tenfold too if it went through the clip.
    np.testing.assert_allclose(update["conv"]["kernel"], -(grads["conv"]["kernel"] / 10 + 1.0), rtol=1e-6)
    np.testing.assert_allclose(update["conv"]["bias"], -grads["conv"]["bias"] / 10, rtol=1e-6)


def test_opt_state_tree_is_the_same_with_and_without_clipping():
    params = small_params()
    lr = optax.constant_schedule(0.1)
    on = optim.create_optimizer(make_optim_config(clip_norm=1.0), lr).init(params)
    off = optim.create_optimizer(make_optim_config(clip_norm=0.0), lr).init(params)
    assert jax.tree.structure(on) == jax.tree.structure(off)


class TinyNet(nnx.Module):
    """The layer kinds AlexNet's variants use, named as models.py names them."""

    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 4, kernel_size=(3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(4, rngs=rngs)
        self.fc6 = nnx.Linear(4, 5, rngs=rngs)


def tiny_params():
    return nnx.to_pure_dict(nnx.state(TinyNet(nnx.Rngs(0)), nnx.Param))


def test_weight_decay_mask_selects_kernels_only():
    mask = optim.weight_decay_mask(tiny_params())
    assert mask == {"conv1": {"kernel": True, "bias": False}, "bn1": {"scale": False, "bias": False},
                                    "fc6": {"kernel": True, "bias": False}}


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_with_zero_gradient_only_kernels_are_decayed(optimizer):
    params = jax.tree.map(lambda p: p + 0.5, tiny_params())  # non-zero biases, so their decay would show
    config = make_optim_config(optimizer=optimizer, learning_rate=1.0, momentum=0.0, weight_decay=0.1)
    update = one_update(config, params, jax.tree.map(jnp.zeros_like, params))
    for layer, name in [("conv1", "kernel"), ("fc6", "kernel")]:
        assert float(jnp.abs(update[layer][name]).max()) > 0, (layer, name)
    for layer, name in [("conv1", "bias"), ("fc6", "bias"), ("bn1", "scale"), ("bn1", "bias")]:
        assert float(jnp.abs(update[layer][name]).max()) == 0, (layer, name)
    if optimizer == "sgd":
        np.testing.assert_allclose(update["fc6"]["kernel"], -0.1 * params["fc6"]["kernel"], rtol=1e-6)


def test_nesterov_and_plain_momentum_match_hand_computation():
    lr, m = 0.1, 0.9
    params = {"w": jnp.array([1.0, 2.0])}
    g1, g2 = jnp.array([1.0, -2.0]), jnp.array([3.0, 0.5])
    grads = [{"w": g1}, {"w": g2}]
    common = dict(learning_rate=lr, momentum=m, weight_decay=0.0, schedule="constant")
    plain = one_update(make_optim_config(nesterov=False, **common), params, grads, steps=2)
    nesterov = one_update(make_optim_config(nesterov=True, **common), params, grads, steps=2)
    # trace t_k = g_k + m * t_{k-1}; plain steps along t_k, Nesterov along g_k + m * t_k.
    t1, t2 = g1, g2 + m * g1
    np.testing.assert_allclose(plain[0]["w"], -lr * t1, rtol=1e-6)
    np.testing.assert_allclose(plain[1]["w"], -lr * t2, rtol=1e-6)
    np.testing.assert_allclose(nesterov[0]["w"], -lr * (g1 + m * t1), rtol=1e-6)
    np.testing.assert_allclose(nesterov[1]["w"], -lr * (g2 + m * t2), rtol=1e-6)
    assert not np.allclose(plain[1]["w"], nesterov[1]["w"])


def test_lars_scales_each_kernel_step_to_its_trust_ratio():
    params = tiny_params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    config = make_optim_config(optimizer="lars", learning_rate=0.5, momentum=0.9, weight_decay=1e-4,
                                                         lars_trust_coefficient=0.001, clip_norm=1.0)
    tx = optim.create_optimizer(config, optim.create_learning_rate_fn(config, 10, 100))
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s, u))(*tx.update(g, s, p)))
    new_params, state, update = step(params, state, grads)
    # First step: the momentum trace is the update itself, so a kernel moves by lr * coefficient * ||w||.
    for layer in ("conv1", "fc6"):
        w = params[layer]["kernel"]
        assert float(jnp.linalg.norm(update[layer]["kernel"])) == pytest.approx(
                0.5 * 0.001 * float(jnp.linalg.norm(w)), rel=1e-4)
    # Vectors skip the trust ratio: they take the plain (clipped) gradient step.
    clipped_scale = 1.0 / float(optim.global_norm(grads))
    np.testing.assert_allclose(update["bn1"]["scale"], -0.5 * 0.3 * clipped_scale, rtol=1e-5)
    new_params, state, _ = step(new_params, state, grads)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(new_params))


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="optim.optimizer"):
        optim.create_optimizer(make_optim_config(optimizer="adam"), optax.constant_schedule(0.1))


# --- validation ------------------------------------------------------------------------------------------------

def test_valid_configs_have_no_problems():
    assert optim.validate_optim_config(make_optim_config()) == []
    assert optim.validate_optim_config(ml_collections.ConfigDict({"learning_rate": 0.1})) == []
    assert optim.validate_optim_config({"learning_rate": 0.1}) == []  # a plain dict works too
    assert optim.validate_optim_config(make_optim_config(optimizer="lars", nesterov=True, schedule="cosine")) == []


def test_base_config_defaults_are_valid():
    from alexnet_jax.config import base_config
    assert optim.validate_optim_config(base_config().optim) == []


@pytest.mark.parametrize("overrides, key", [
        (dict(learning_rate=-0.1), "learning_rate"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(learning_rate=float("nan")), "learning_rate"),
        (dict(learning_rate="0.1"), "learning_rate"),
        (dict(schedule="foo"), "schedule"),
        (dict(optimizer="adam"), "optimizer"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(warmup_steps=2.5), "warmup_steps"),
        (dict(momentum=-0.1), "momentum"),
        (dict(momentum=1.0), "momentum"),
        (dict(nesterov="yes"), "nesterov"),
        (dict(nesterov=True, momentum=0.0), "nesterov"),
        (dict(weight_decay=-1e-4), "weight_decay"),
        (dict(clip_norm=-1.0), "clip_norm"),
        (dict(decay_epochs=0), "decay_epochs"),
        (dict(decay_factor=0.0), "decay_factor"),
        (dict(decay_factor=1.5), "decay_factor"),
        (dict(schedule="exponential", exponential_decay_rate=1.2), "exponential_decay_rate"),
        (dict(schedule="exponential", exponential_decay_rate=0.0), "exponential_decay_rate"),
        (dict(schedule="cosine", end_learning_rate_factor=-0.5), "end_learning_rate_factor"),
        (dict(optimizer="lars", lars_trust_coefficient=0.0), "lars_trust_coefficient"),
        (dict(optimizer="lars", lars_trust_coefficient=1.0), "lars_trust_coefficient"),
        (dict(schedule="polynomial", polynomial_power=0.0), "polynomial_power"),
        (dict(schedule="polynomial", end_learning_rate_factor=2.0), "end_learning_rate_factor"),
        (dict(label_smoothing=1.0), "label_smoothing"),
        (dict(label_smoothing=-0.1), "label_smoothing"),
        (dict(grad_accum_steps=0), "grad_accum_steps"),
        (dict(grad_accum_steps=2.0), "grad_accum_steps"),
])
def test_each_bad_value_is_reported_naming_its_key(overrides, key):
    config = make_optim_config()
    for k, v in overrides.items():
        # Bypass ConfigDict's type locking: a config file can assign any type to a fresh key.
        if k in config and type(config[k]) is not type(v):
            del config[k]
        config[k] = v
    problems = optim.validate_optim_config(config)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"optim.{key} "), problems
    assert f"(got {overrides[key]!r}" in problems[0], problems


def test_messages_read_as_the_brief_asks():
    assert optim.validate_optim_config(make_optim_config(learning_rate=-0.1)) == [
            "optim.learning_rate must be > 0 (got -0.1)"]
    assert optim.validate_optim_config(make_optim_config(schedule="foo")) == [
            "optim.schedule must be one of step, exponential, cosine, polynomial, constant (got 'foo')"]


def test_missing_learning_rate_is_reported():
    config = make_optim_config()
    del config["learning_rate"]
    assert optim.validate_optim_config(config) == ["optim.learning_rate is missing"]


def test_settings_of_unused_schedules_do_not_block_a_run():
    config = make_optim_config(schedule="cosine", decay_factor=0.0, exponential_decay_rate=5.0,
                               polynomial_power=-1.0, optimizer="sgd", lars_trust_coefficient=5.0)
    assert optim.validate_optim_config(config) == []


def test_imagenet_lars_config_is_you_et_al_alexnet_bn_at_8k():
    import importlib.util
    import os

    from alexnet_jax import config as config_lib

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "imagenet_lars.py")
    spec = importlib.util.spec_from_file_location("imagenet_lars", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert config.model.variant == "bn" and config.batch_size >= 8192
    assert (config.optim.optimizer, config.optim.learning_rate, config.optim.lars_trust_coefficient) == (
            "lars", 14.0, 0.001)
    assert optim.validate_optim_config(config.optim) == []
    config.data.source = "synthetic"  # no ImageNet here; everything else as written
    config_lib.validate(config, num_devices=8)
    steps_per_epoch = 1_281_167 // config.batch_size
    total = config.num_epochs * steps_per_epoch
    fn = optim.create_learning_rate_fn(config.optim, steps_per_epoch, total)
    warmup = config.optim.warmup_steps
    assert warmup == 5 * steps_per_epoch  # 5 warmup epochs, as the paper used for AlexNet-BN
    assert lr_at(fn, warmup // 2) == pytest.approx(7.0, rel=1e-3)
    assert lr_at(fn, warmup) == pytest.approx(14.0, rel=1e-6)
    halfway = warmup + (total - warmup) // 2
    assert lr_at(fn, halfway) == pytest.approx(14.0 * (1 - (halfway - warmup) / (total - warmup)) ** 2, rel=1e-4)
    assert lr_at(fn, total) == pytest.approx(0.0, abs=1e-6)
