"""AlexNet variants: sizes, shapes, pooling and normalisation numerics, train/eval behaviour, dtypes.

Counts and shapes at full width come from abstract evaluation (nothing allocated). The few real forward passes
use tiny widths and rbg keys: threefry initialisers alone take ~10 s to compile on a small CPU.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from alexnet_jax.models import (
    ACTIVATIONS,
    VARIANTS,
    AlexNet,
    adaptive_avg_pool,
    create_model,
    local_response_norm,
)

OWT_CHANNELS = (64, 192, 384, 256, 256)
HIDDEN = 4096
TINY_WIDTH = 1 / 16  # 4-12-24-16-16 convs, 256 hidden: a forward pass is milliseconds once compiled


def fast_key(seed: int) -> jax.Array:
    return jax.random.key(seed, impl="rbg")


def fast_rngs(seed: int = 0) -> nnx.Rngs:
    return nnx.Rngs(fast_key(seed))


def abstract_model(variant="owt", **kwargs) -> AlexNet:
    return nnx.eval_shape(lambda: AlexNet(variant, rngs=nnx.Rngs(0), **kwargs))


def param_count(model) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def abstract_logits(model, image_size, batch=2):
    model.eval()
    image = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    return nnx.eval_shape(lambda m, x: m(x), model, image)


@nnx.jit
def train_forward(model, images, key):
    return model(images, rngs=nnx.Rngs(dropout=key))


@nnx.jit
def eval_forward(model, images):
    return model(images)


@pytest.fixture(scope="module")
def tiny_models():
    """One real, initialised tiny model per variant, shared because each costs a compile."""
    return {
        variant: nnx.jit(lambda v=variant: AlexNet(v, num_classes=10, width=TINY_WIDTH, rngs=fast_rngs()))()
        for variant in VARIANTS
    }


def images(size, batch=2, seed=0):
    return jax.random.normal(fast_key(seed), (batch, size, size, 3), jnp.float32)


# ---- sizes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, expected", [("owt", 61_100_840), ("original", 60_965_224)])
def test_parameter_count_matches_the_published_models(variant, expected):
    assert param_count(abstract_model(variant)) == expected


def test_bn_adds_scale_and_shift_and_drops_the_biases_they_make_redundant():
    normalised_features = [*OWT_CHANNELS, HIDDEN, HIDDEN]
    # Each BatchNorm brings a scale and a shift per feature; the conv/fc before it loses its bias.
    expected = 61_100_840 + 2 * sum(normalised_features) - sum(normalised_features)
    model = abstract_model("bn")
    assert param_count(model) == expected
    for i in range(1, 6):
        assert getattr(model, f"conv{i}").bias is None
    assert model.fc6.bias is None and model.fc7.bias is None and model.fc8.bias is not None


@pytest.mark.parametrize("variant", VARIANTS)
def test_layer_names_follow_the_paper(variant):
    model = abstract_model(variant, width=0.25)
    children = {name for name, _ in nnx.iter_children(model)}
    expected = {"conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8", "dropout"}
    if variant == "bn":
        expected |= {f"bn{i}" for i in range(1, 8)}
    assert children == expected


def test_width_scales_every_conv_and_hidden_fc_but_not_the_classes():
    model = abstract_model("owt", num_classes=37, width=0.25)
    convs = [getattr(model, f"conv{i}").out_features for i in range(1, 6)]
    assert convs == [16, 48, 96, 64, 64]
    assert (model.fc6.in_features, model.fc6.out_features) == (6 * 6 * 64, 1024)
    assert model.fc7.out_features == 1024 and model.fc8.out_features == 37


def test_original_keeps_grouped_layers_splittable_at_odd_widths():
    model = abstract_model("original", width=0.3)
    for i in (2, 4, 5):
        conv = getattr(model, f"conv{i}")
        assert conv.feature_group_count == 2
        assert conv.in_features % 2 == 0 and conv.out_features % 2 == 0


# ---- shapes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("image_size", [224, 96, 64, 150])
def test_logits_shape_for_any_input_size(variant, image_size):
    logits = abstract_logits(abstract_model(variant, num_classes=10, width=0.25), image_size)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32


def test_real_forward_at_64_px(tiny_models):
    model = tiny_models["original"]
    model.eval()
    logits = eval_forward(model, images(64))
    assert logits.shape == (2, 10)
    assert np.all(np.isfinite(np.asarray(logits)))


# ---- adaptive average pooling ------------------------------------------------------------------------------


def reference_adaptive_avg_pool(x, out_h, out_w):
    """torchvision's bins, one slice at a time."""
    n, h, w, c = x.shape
    out = np.zeros((n, out_h, out_w, c), np.float64)
    for i in range(out_h):
        h0, h1 = math.floor(i * h / out_h), math.ceil((i + 1) * h / out_h)
        for j in range(out_w):
            w0, w1 = math.floor(j * w / out_w), math.ceil((j + 1) * w / out_w)
            out[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
    return out


@pytest.mark.parametrize("h, w", [(1, 1), (3, 3), (5, 5), (6, 6), (7, 7), (13, 13), (13, 5), (2, 27)])
def test_adaptive_avg_pool_matches_torchvision_bins(h, w):
    x = np.random.default_rng(h * 100 + w).normal(size=(2, h, w, 3)).astype(np.float32)
    got = adaptive_avg_pool(jnp.asarray(x))
    assert got.shape == (2, 6, 6, 3)
    np.testing.assert_allclose(np.asarray(got), reference_adaptive_avg_pool(x, 6, 6), rtol=1e-5, atol=1e-6)


def test_adaptive_avg_pool_other_output_sizes():
    x = np.random.default_rng(0).normal(size=(1, 10, 9, 2)).astype(np.float32)
    got = adaptive_avg_pool(jnp.asarray(x), (3, 4))
    np.testing.assert_allclose(np.asarray(got), reference_adaptive_avg_pool(x, 3, 4), rtol=1e-5, atol=1e-6)


# ---- local response normalisation --------------------------------------------------------------------------


def reference_lrn(x, size, k, alpha, beta):
    """The paper's formula, channel by channel; alpha multiplies the plain sum (not the mean)."""
    channels = x.shape[-1]
    out = np.empty_like(x, dtype=np.float64)
    for i in range(channels):
        lo, hi = max(0, i - size // 2), min(channels - 1, i + size // 2)
        window = np.sum(x[..., lo : hi + 1].astype(np.float64) ** 2, axis=-1)
        out[..., i] = x[..., i] / (k + alpha * window) ** beta
    return out


@pytest.mark.parametrize("alpha", [1e-4, 0.05])
def test_local_response_norm_matches_the_paper(alpha):
    # Large activations so the normalising term is far from the constant k and alpha's scale matters.
    x = (30 * np.random.default_rng(1).normal(size=(2, 4, 3, 11))).astype(np.float32)
    got = local_response_norm(jnp.asarray(x), size=5, k=2.0, alpha=alpha, beta=0.75)
    np.testing.assert_allclose(np.asarray(got), reference_lrn(x, 5, 2.0, alpha, 0.75), rtol=1e-5)
    # PyTorch's LocalResponseNorm would divide alpha by size; that must give a visibly different answer here.
    assert not np.allclose(np.asarray(got), reference_lrn(x, 5, 2.0, alpha / 5, 0.75), rtol=1e-3)


def test_local_response_norm_keeps_bfloat16():
    x = jnp.ones((1, 2, 2, 8), jnp.bfloat16)
    assert local_response_norm(x).dtype == jnp.bfloat16


# ---- train / eval ------------------------------------------------------------------------------------------


def test_dropout_depends_on_the_key_in_train_mode_and_is_off_in_eval(tiny_models):
    model = tiny_models["owt"]
    x = images(96)
    model.train()
    a = np.asarray(train_forward(model, x, fast_key(1)))
    b = np.asarray(train_forward(model, x, fast_key(2)))
    a_again = np.asarray(train_forward(model, x, fast_key(1)))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, a_again)

    model.eval()
    c = np.asarray(eval_forward(model, x))
    d = np.asarray(eval_forward(model, x))
    np.testing.assert_array_equal(c, d)
    assert not np.allclose(a, c)


def test_batchnorm_updates_statistics_only_in_train_mode(tiny_models):
    model = tiny_models["bn"]
    x = images(64, batch=4)

    def stats():
        return [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]

    assert len(stats()) == 2 * 7  # mean and var for bn1..bn7
    before = stats()
    model.train()
    train_forward(model, x, fast_key(0))
    after_train = stats()
    assert all(not np.allclose(b, a) for b, a in zip(before, after_train))

    model.eval()
    first = np.asarray(eval_forward(model, x))
    second = np.asarray(eval_forward(model, x))
    for b, a in zip(after_train, stats()):
        np.testing.assert_array_equal(b, a)
    np.testing.assert_array_equal(first, second)


def test_train_mode_without_a_key_is_an_error(tiny_models):
    model = tiny_models["owt"]
    model.train()
    with pytest.raises(Exception, match="rngs"):
        model(images(64))


# ---- initialisation ----------------------------------------------------------------------------------------


def test_original_uses_the_papers_initialisation(tiny_models):
    model = tiny_models["original"]
    ones = {"conv2", "conv4", "conv5", "fc6", "fc7"}
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
        layer = getattr(model, name)
        bias = np.asarray(layer.bias[...])
        np.testing.assert_array_equal(bias, 1.0 if name in ones else 0.0, err_msg=name)
    # A large enough layer for the sample std to pin down 0.01.
    kernel = np.asarray(model.fc6.kernel[...])
    assert abs(kernel.mean()) < 1e-3 and abs(kernel.std() - 0.01) < 5e-4


def test_owt_uses_pytorch_default_bounds(tiny_models):
    model = tiny_models["owt"]
    for name in ("conv1", "conv3", "fc6", "fc8"):
        layer = getattr(model, name)
        kernel = np.asarray(layer.kernel[...])
        fan_in = math.prod(kernel.shape[:-1])
        bound = 1 / math.sqrt(fan_in)
        for values in (kernel, np.asarray(layer.bias[...])):
            assert np.abs(values).max() <= bound
        # Uniform on [-b, b]: the largest weight should come close to the bound.
        assert np.abs(kernel).max() > 0.9 * bound


# ---- dtypes and config -------------------------------------------------------------------------------------


def test_bfloat16_computes_in_bfloat16_but_keeps_float32_params_and_logits():
    model = abstract_model("bn", num_classes=10, width=0.25, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
    model.eval()
    image = jax.ShapeDtypeStruct((2, 96, 96, 3), jnp.float32)

    def forward(m, x):
        return nnx.capture(m, nnx.Intermediate, method_outputs=nnx.Intermediate)(x)

    logits, outputs = nnx.eval_shape(forward, model, image)
    assert logits.dtype == jnp.float32
    (conv1_out,) = outputs["conv1"]["__call__"].get_value()
    (fc8_out,) = outputs["fc8"]["__call__"].get_value()
    assert conv1_out.dtype == jnp.bfloat16 and fc8_out.dtype == jnp.bfloat16


def model_config(**overrides):
    config = ml_collections.ConfigDict({"variant": "owt", "num_classes": 10, "width": 0.25, "dtype": "float32"})
    config.update(overrides)
    return config


def test_create_model_reads_the_config():
    model = nnx.eval_shape(
        lambda: create_model(
            model_config(variant="original", dtype="bfloat16", activation="tanh", dropout_rate=0.3),
            rngs=nnx.Rngs(0),
        )
    )
    assert model.variant == "original"
    assert model.dtype == jnp.bfloat16
    assert model.act is ACTIVATIONS["tanh"]
    assert model.dropout.rate == 0.3
    assert model.fc8.out_features == 10

    defaults = nnx.eval_shape(lambda: create_model(model_config(), rngs=nnx.Rngs(0)))
    assert defaults.act is ACTIVATIONS["relu"] and defaults.dropout.rate == 0.5


@pytest.mark.parametrize(
    "overrides, key",
    [({"variant": "vgg"}, "model.variant"), ({"activation": "gelu"}, "model.activation"),
     ({"dtype": "floaty"}, "model.dtype"), ({"width": 0.0}, "model.width"),
     ({"max_pool_grad": "fast"}, "model.max_pool_grad")],
)
def test_create_model_rejects_bad_values_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        nnx.eval_shape(lambda: create_model(model_config(**overrides), rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("size", [64, 67, 224])
def test_space_to_depth_stem_equals_the_plain_conv1(size):
    """The MLPerf-style stem is the same function as conv1: same parameters, same outputs to float rounding
    (sizes whose padded side is not a multiple of 4 included)."""
    from alexnet_jax.models import space_to_depth_conv1

    model = AlexNet("owt", 10, width=0.25, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
    plain = model.conv1(x)
    s2d = space_to_depth_conv1(model.conv1, x)
    assert s2d.shape == plain.shape
    np.testing.assert_allclose(np.asarray(s2d), np.asarray(plain), rtol=1e-5, atol=1e-5)
    whole = AlexNet("owt", 10, width=0.25, space_to_depth=True, rngs=nnx.Rngs(0))
    whole.eval(), model.eval()
    np.testing.assert_allclose(np.asarray(whole(x)), np.asarray(model(x)), rtol=1e-4, atol=1e-5)


def test_auto_dtype_is_float32_on_cpu_and_float16_is_refused():
    from alexnet_jax import config as config_lib
    from alexnet_jax.models import compute_dtype
    from conftest import tiny_config

    assert jax.default_backend() == "cpu" and compute_dtype("auto") == jnp.float32
    assert compute_dtype("bfloat16") == jnp.bfloat16
    with pytest.raises(config_lib.ConfigError, match="model.dtype=float16 is refused"):
        config_lib.validate(tiny_config(**{"model.dtype": "float16"}), 1)


def _pool_grads(x, g):
    from alexnet_jax.models import max_pool

    return [np.asarray(jax.jit(lambda x, g, grad=grad: jax.vjp(lambda x: max_pool(x, grad), x)[1](g)[0])(x, g))
            for grad in ("xla", "slices")]


@pytest.mark.parametrize("shape", [(2, 55, 55, 8), (3, 13, 13, 5), (1, 12, 17, 3), (2, 3, 3, 4)])
def test_slice_max_pool_gradient_picks_the_same_element_as_xla_ties_included(shape):
    """model.max_pool_grad=slices against XLA's select_and_scatter. Small integers make ties in almost every window
    (the case ReLU's zeros create) and integer output gradients make every sum exact, so the two must be bit-equal:
    each window's gradient goes to the same element. Odd, even, non-square and single-window sizes."""
    rng = np.random.default_rng(sum(shape))
    x = jnp.asarray(rng.integers(0, 3, shape).astype(np.float32))
    from alexnet_jax.models import max_pool

    g = jnp.asarray(rng.integers(-8, 9, max_pool(x).shape).astype(np.float32))
    xla, slices = _pool_grads(x, g)
    assert np.abs(xla).sum() > 0
    np.testing.assert_array_equal(slices, xla)
    np.testing.assert_array_equal(np.asarray(max_pool(x, "slices")), np.asarray(max_pool(x, "xla")))


def test_slice_max_pool_gradient_on_real_values_differs_only_by_summation_order():
    """With real-valued gradients an input element shared by overlapping windows sums their shares in another
    order: equal to float rounding, in float32 and bfloat16."""
    rng = np.random.default_rng(0)
    for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)):
        x = jnp.asarray(rng.standard_normal((4, 27, 27, 16)), dtype)
        g = jnp.asarray(rng.standard_normal((4, 13, 13, 16)), dtype)
        xla, slices = _pool_grads(x, g)
        np.testing.assert_allclose(slices.astype(np.float32), xla.astype(np.float32), rtol=tol, atol=tol)


def test_whole_model_gradients_agree_between_max_pool_gradients():
    """The train loss's parameter gradients through all three pools, with either implementation (BatchNorm
    variant in train mode; ReLU zeros make pooling ties)."""
    from alexnet_jax.models import resolve_max_pool_grad

    assert resolve_max_pool_grad("auto") == ("slices" if jax.default_backend() == "cpu" else "xla")
    x = jax.random.normal(fast_key(3), (4, 64, 64, 3))
    labels = jnp.arange(4) % 10
    grads = []
    for grad in ("xla", "slices"):
        model = AlexNet("bn", 10, width=TINY_WIDTH, max_pool_grad=grad, rngs=nnx.Rngs(0))
        model.train()

        def loss(model):
            logits = model(x, rngs=nnx.Rngs(dropout=fast_key(4)))
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

        # jitted: run op by op, the two backward passes take ~25 s on 2 CPU cores
        grads.append(nnx.to_pure_dict(nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Param)))(model)))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
