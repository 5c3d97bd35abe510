"""AlexNet in Flax NNX, in three variants.

- ``owt``: the single-tower layout of Krizhevsky 2014, "One weird trick for parallelizing convolutional neural
  networks", which is what torchvision ships as ``alexnet`` (61,100,840 parameters).
- ``original``: Krizhevsky, Sutskever & Hinton 2012, with its two-GPU grouping kept as grouped convolutions,
  local response normalisation and the paper's initialisation (60,965,224 parameters).
- ``bn``: the ``owt`` layout with BatchNorm after every convolution and hidden fully-connected layer.

Inputs are NHWC, already normalised, of any spatial size of at least 64 px; the adaptive average pool makes the
classifier independent of the input size, as in torchvision.

Parameters are always float32; ``dtype`` only sets the compute dtype, so bfloat16 training keeps float32 master
weights without any extra machinery in the optimiser.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

VARIANTS = ("owt", "original", "bn")

ACTIVATIONS: Mapping[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    # Saturating activation, kept to reproduce the paper's argument for ReLU and for gradient-explosion runs.
    "tanh": jnp.tanh,
}

# Channel widths of conv1..conv5 at width=1.
_CONV_CHANNELS = {
    "owt": (64, 192, 384, 256, 256),
    "original": (96, 256, 384, 384, 256),
    "bn": (64, 192, 384, 256, 256),
}
_HIDDEN_FEATURES = 4096
_POOLED_SIZE = (6, 6)
# Set only while a multi-device step is traced (see fc_layout); None leaves the model layout-agnostic.
_FC_LAYOUT = contextvars.ContextVar("fc_layout", default=None)


def scaled_channels(channels: int, width: float) -> int:
    """Channels after width scaling, rounded to an even number.

    Even counts everywhere (not only where ``original`` splits a layer into two groups) so one rule serves all
    variants and ``original`` at any width stays splittable into its two towers.
    """
    return max(2, 2 * int(channels * width / 2 + 0.5))


def hidden_features(width: float) -> int:
    """Width of fc6 and fc7 at a width multiplier (4,096 at width 1)."""
    return scaled_channels(_HIDDEN_FEATURES, width)


@contextlib.contextmanager
def fc_layout(features, hidden, classes, logits):
    """Within this context, tracing the model pins the classifier's activations to these shardings: the
    features entering fc6 to `features`, the outputs of fc6 and fc7 to `hidden`, fc8's to `classes`, and
    then the logits it returns to `logits`.

    This is the hinge of the "one weird trick" layout (sharding.py): convolutions split the batch over every
    device, the classifier splits it over 'data' only and its weights over 'model', and the loss sees the
    convolutions' layout again. Pinned activations (and so, by transposition, their gradients) leave XLA no
    reason to move weights instead of activations. Predict and export trace the model without it and see no
    mesh at all.
    """
    token = _FC_LAYOUT.set((features, hidden, classes, logits))
    try:
        yield
    finally:
        _FC_LAYOUT.reset(token)


# How max_pool's gradient is computed: XLA's select_and_scatter, or max_pool_slice_grad (see there). "auto" picks
# slices on CPUs, where it measured 4-5x faster (README, "Performance"), and XLA's elsewhere.
MAX_POOL_GRADS = ("auto", "xla", "slices")
_POOL_WINDOW, _POOL_STRIDE = 3, 2


def max_pool(x: jax.Array, grad: str = "xla") -> jax.Array:
    """3x3 stride-2 max pooling without padding: PyTorch's ``MaxPool2d(3, 2)`` floors the output size too.
    `grad` is a resolved MAX_POOL_GRADS entry (see resolve_max_pool_grad); both give the same pooled values."""
    return max_pool_slice_grad(x) if grad == "slices" else _max_pool(x)


def _max_pool(x: jax.Array) -> jax.Array:
    window, stride = (_POOL_WINDOW,) * 2, (_POOL_STRIDE,) * 2
    return nnx.max_pool(x, window_shape=window, strides=stride, padding="VALID")


def resolve_max_pool_grad(name: str) -> str:
    if name not in MAX_POOL_GRADS:
        raise ValueError(f"model.max_pool_grad={name!r} is not one of {MAX_POOL_GRADS}")
    if name == "auto":
        return "slices" if jax.default_backend() == "cpu" else "xla"
    return name


@jax.custom_vjp
def max_pool_slice_grad(x: jax.Array) -> jax.Array:
    """max_pool whose gradient is built from the 9 strided window offsets instead of XLA's select_and_scatter,
    which XLA:CPU runs as a slow scalar loop (80 ms against 15 ms for conv1's output at batch 32).

    Each pooling window sends its output gradient to its first maximal element in row-major window order -- the
    element select_and_scatter picks, ties included -- so the gradient is the same up to the order in which
    the (at most 4) windows overlapping one input element are summed: bit-equal when those sums are exact."""
    return _max_pool(x)


def _max_pool_fwd(x):
    return _max_pool(x), x


def _max_pool_bwd(x, g):
    _, height, width, _ = x.shape
    out_h, out_w = g.shape[1], g.shape[2]
    span_h, span_w = _POOL_STRIDE * (out_h - 1) + 1, _POOL_STRIDE * (out_w - 1) + 1
    offsets = [(i, j) for i in range(_POOL_WINDOW) for j in range(_POOL_WINDOW)]
    # at_offset[k][:, a, b] = x[:, i + 2a, j + 2b]: element (i, j) of window (a, b), for offset k = (i, j)
    at_offset = [jax.lax.slice(x, (0, i, j, 0), (x.shape[0], i + span_h, j + span_w, x.shape[3]),
                               (1, _POOL_STRIDE, _POOL_STRIDE, 1)) for i, j in offsets]
    # The maximum is taken again from these very values rather than kept from the forward pass: XLA may
    # recompute x for the backward pass in another fusion, and a maximum that differs from it in the last bit
    # would match no element and drop the window's gradient. select_and_scatter also searches its own operand.
    maximum = functools.reduce(jnp.maximum, at_offset)
    taken = jnp.zeros(g.shape, bool)  # windows whose maximum already received the gradient
    dx = jnp.zeros_like(x)
    zero = jnp.zeros((), x.dtype)
    for (i, j), values in zip(offsets, at_offset):
        first = (values == maximum) & ~taken
        taken = taken | first
        # ...and back: window (a, b)'s share lands on x[:, i + 2a, j + 2b] (interior padding spreads it out)
        dx = dx + jax.lax.pad(jnp.where(first, g, zero), zero, [
            (0, 0, 0), (i, height - i - span_h, _POOL_STRIDE - 1), (j, width - j - span_w, _POOL_STRIDE - 1),
            (0, 0, 0)])
    return (dx,)


max_pool_slice_grad.defvjp(_max_pool_fwd, _max_pool_bwd)


def local_response_norm(
    x: jax.Array, *, size: int = 5, k: float = 2.0, alpha: float = 1e-4, beta: float = 0.75
) -> jax.Array:
    """Local response normalisation across channels, as written in the 2012 paper (section 3.3).

    b_i = a_i / (k + alpha * sum_{j=i-size//2}^{i+size//2} a_j^2) ** beta, with channels beyond the edges
    treated as zero. The paper's alpha multiplies the plain sum; PyTorch's ``LocalResponseNorm`` divides alpha by
    ``size`` (it averages). We follow the paper because the ``original`` variant exists to reproduce it; the
    PyTorch layer with ``alpha=5e-4`` computes the same thing.
    """
    # In bfloat16, k + alpha * sum rounds to exactly k unless the sum is large, which would silently turn the
    # normalisation into a constant scale; computing it in float32 costs little next to the convolutions.
    x32 = x.astype(jnp.float32)
    squares = jnp.square(x32)
    channels = x.shape[-1]
    before, after = size // 2, (size - 1) // 2
    padded = jnp.pad(squares, [(0, 0)] * (x.ndim - 1) + [(before, after)])
    # A handful of shifted adds fuses into one elementwise kernel; a reduce_window over the channel (lane) axis
    # does not map as well onto TPUs.
    window_sum = sum(padded[..., offset : offset + channels] for offset in range(size))
    return (x32 / (k + alpha * window_sum) ** beta).astype(x.dtype)


def space_to_depth_conv1(conv: nnx.Conv, x: jax.Array) -> jax.Array:
    """conv1 (11x11, stride 4, padding 2) computed as a 3x3 stride-1 convolution over 4x4 space-to-depth blocks.

    MLPerf's ResNet stem trick, for AlexNet's even more lopsided first layer: 3 input channels and stride 4 leave a
    TPU's matrix units mostly idle, while 48 channels at stride 1 fill them. The kernel is zero-padded to 12x12
    and rearranged the same way as the input, so every output sums exactly the products the plain convolution
    sums (in another order): out[y, x] = sum_{kh,kw} in[4y+kh, 4x+kw] k[kh, kw]. Parameters are unchanged, so
    checkpoints do not care which form trained them.
    """
    n, height, width, channels = x.shape
    out_h, out_w = (height + 4 - 11) // 4 + 1, (width + 4 - 11) // 4 + 1
    # Pad 2 like the plain conv, then up to a multiple of 4; the extra rows only add outputs that are cut below.
    x = jnp.pad(x, ((0, 0), (2, 2 + (-(height + 4)) % 4), (2, 2 + (-(width + 4)) % 4), (0, 0)))
    blocks_h, blocks_w = x.shape[1] // 4, x.shape[2] // 4
    x = x.reshape(n, blocks_h, 4, blocks_w, 4, channels).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(n, blocks_h, blocks_w, 16 * channels)
    kernel = conv.kernel[...]
    features = kernel.shape[-1]
    kernel = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0))).reshape(3, 4, 3, 4, channels, features)
    kernel = kernel.transpose(0, 2, 1, 3, 4, 5).reshape(3, 3, 16 * channels, features)
    dtype = conv.dtype or x.dtype
    y = jax.lax.conv_general_dilated(x.astype(dtype), kernel.astype(dtype), (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))[:, :out_h, :out_w]
    return y + conv.bias[...].astype(dtype) if conv.bias is not None else y


def compute_dtype(name: str):
    """The compute dtype for `model.dtype`: "auto" is bfloat16 where matrix units want it (GPU, TPU) and float32 on
    CPUs, which have no fast bfloat16 path."""
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    try:
        return jnp.dtype(name)
    except TypeError as error:
        raise ValueError(f"model.dtype={name!r} is not a dtype name: {error}") from None


def _averaging_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) matrix whose row i averages torchvision's bin [floor(i*H/O), ceil((i+1)*H/O))."""
    matrix = np.zeros((out_size, in_size), dtype=np.float32)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int] = _POOLED_SIZE) -> jax.Array:
    """Average pool an NHWC array to ``output_size`` with torchvision's ``AdaptiveAvgPool2d`` bins.

    Bins may overlap (e.g. 13 -> 6) or repeat an input row (H < 6), so this is not a strided pool. The shapes are
    static, so the bins become one small constant averaging matrix per spatial axis, built in numpy at trace time
    and applied as two contractions; that is cheap, exact for the bins and has no per-bin slicing in the graph.
    """
    _, height, width, _ = x.shape
    out_h, out_w = output_size
    if (height, width) == (out_h, out_w):
        return x  # 224 px inputs already arrive at 6x6: skip the identity contractions.
    rows = jnp.asarray(_averaging_matrix(height, out_h), dtype=x.dtype)
    cols = jnp.asarray(_averaging_matrix(width, out_w), dtype=x.dtype)
    # HIGHEST keeps float32 averages exact on TPU, where the default would round operands to bfloat16.
    precision = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,nhwc->nowc", rows, x, precision=precision)
    return jnp.einsum("pw,nowc->nopc", cols, x, precision=precision)


def _uniform_fan_in(fan_in: int) -> nnx.Initializer:
    """PyTorch's default for weights and biases alike: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    Biases need the layer's fan-in, which a bias initializer never sees (its shape is just (features,)), hence a
    closure over it.
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class AlexNet(nnx.Module):
    """AlexNet; attribute names follow the paper's table (conv1..conv5, fc6..fc8, bn1..bn7 for ``bn``).

    Call as ``model(x, rngs=nnx.Rngs(dropout=key))`` in train mode; ``rngs`` may be None in eval mode. Dropout
    takes its randomness from the call rather than owning an RNG stream, so a jitted train step stays a pure
    function of its key. ``.train()`` / ``.eval()`` switch dropout and BatchNorm statistics.
    """

    def __init__(
        self,
        variant: str = "owt",
        num_classes: int = 1000,
        *,
        width: float = 1.0,
        dtype=jnp.float32,
        activation: str = "relu",
        dropout_rate: float = 0.5,
        space_to_depth: bool = False,
        max_pool_grad: str = "auto",
        rngs: nnx.Rngs,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"model.variant={variant!r} is not one of {VARIANTS}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.activation={activation!r} is not one of {tuple(ACTIVATIONS)}")
        if not width > 0:
            raise ValueError(f"model.width={width!r} must be positive")
        self.variant = variant
        self.num_classes = num_classes
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.dtype = dtype
        self.space_to_depth = space_to_depth
        self.max_pool_grad = resolve_max_pool_grad(max_pool_grad)

        c1, c2, c3, c4, c5 = (scaled_channels(c, width) for c in _CONV_CHANNELS[variant])
        hidden = hidden_features(width)
        flat = _POOLED_SIZE[0] * _POOLED_SIZE[1] * c5
        # The paper split conv2, conv4 and conv5 across two GPUs, each half seeing only its own half of the
        # previous layer; grouped convolutions keep exactly that connectivity (and parameter count) on one device.
        groups = 2 if variant == "original" else 1
        batch_norm = variant == "bn"

        def conv(in_ch, out_ch, kernel, *, stride=1, padding, group_count=1, paper_bias=0.0):
            fan_in = kernel * kernel * in_ch // group_count
            if variant == "original":
                kernel_init = nnx.initializers.normal(0.01)
                bias_init = nnx.initializers.constant(paper_bias)
            elif variant == "bn":
                kernel_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
                bias_init = nnx.initializers.zeros
            else:
                kernel_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
                bias_init = _uniform_fan_in(fan_in)
            return nnx.Conv(
                in_ch, out_ch, (kernel, kernel), (stride, stride),
                padding=((padding, padding), (padding, padding)),
                feature_group_count=group_count,
                # BatchNorm subtracts the batch mean and adds its own learned shift, so a bias before it is
                # cancelled exactly: it would only be a dead parameter for weight decay to shrink.
                use_bias=not batch_norm,
                kernel_init=kernel_init, bias_init=bias_init,
                dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
            )

        def dense(in_features, out_features, *, followed_by_norm=False, paper_bias=0.0):
            if variant == "original":
                kernel_init = nnx.initializers.normal(0.01)
                bias_init = nnx.initializers.constant(paper_bias)
            elif variant == "bn" and followed_by_norm:
                kernel_init = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
                bias_init = nnx.initializers.zeros
            else:
                kernel_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
                bias_init = _uniform_fan_in(in_features)
            return nnx.Linear(
                in_features, out_features, use_bias=not followed_by_norm,
                kernel_init=kernel_init, bias_init=bias_init,
                dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
            )

        def norm(features):
            # PyTorch's defaults (momentum 0.1 there = 0.9 here, eps 1e-5) rather than flax's 0.99: statistics
            # that track within a few hundred steps matter for short runs and for evaluating early checkpoints.
            return nnx.BatchNorm(
                features, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, rngs=rngs
            )

        # Biases of 1 in conv2, conv4, conv5 and the hidden FCs are the paper's: they start ReLUs in their
        # positive region. They only apply to ``original``; the other variants ignore ``paper_bias``.
        self.conv1 = conv(3, c1, 11, stride=4, padding=2)
        if batch_norm:
            self.bn1 = norm(c1)
        self.conv2 = conv(c1, c2, 5, padding=2, group_count=groups, paper_bias=1.0)
        if batch_norm:
            self.bn2 = norm(c2)
        self.conv3 = conv(c2, c3, 3, padding=1)
        if batch_norm:
            self.bn3 = norm(c3)
        self.conv4 = conv(c3, c4, 3, padding=1, group_count=groups, paper_bias=1.0)
        if batch_norm:
            self.bn4 = norm(c4)
        self.conv5 = conv(c4, c5, 3, padding=1, group_count=groups, paper_bias=1.0)
        if batch_norm:
            self.bn5 = norm(c5)
        self.fc6 = dense(flat, hidden, followed_by_norm=batch_norm, paper_bias=1.0)
        if batch_norm:
            self.bn6 = norm(hidden)
        self.fc7 = dense(hidden, hidden, followed_by_norm=batch_norm, paper_bias=1.0)
        if batch_norm:
            self.bn7 = norm(hidden)
        self.fc8 = dense(hidden, num_classes)
        # No rngs here: the mask key comes from the call, see the class docstring.
        self.dropout = nnx.Dropout(dropout_rate)

    def _dropout(self, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        # In eval mode dropout is the identity, so it is not called at all: jax2onnx (the ONNX export) replaces
        # nnx.Dropout.__call__ by a version that takes no `rngs`.
        return x if self.dropout.deterministic else self.dropout(x, rngs=rngs)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        bn = self.variant == "bn"
        lrn = self.variant == "original"
        act = self.act
        x = x.astype(self.dtype)

        x = space_to_depth_conv1(self.conv1, x) if self.space_to_depth else self.conv1(x)
        x = self.bn1(x) if bn else x
        x = act(x)
        x = local_response_norm(x) if lrn else x
        x = max_pool(x, self.max_pool_grad)

        x = self.conv2(x)
        x = self.bn2(x) if bn else x
        x = act(x)
        x = local_response_norm(x) if lrn else x
        x = max_pool(x, self.max_pool_grad)

        x = self.conv3(x)
        x = self.bn3(x) if bn else x
        x = act(x)

        x = self.conv4(x)
        x = self.bn4(x) if bn else x
        x = act(x)

        x = self.conv5(x)
        x = self.bn5(x) if bn else x
        x = act(x)
        x = max_pool(x, self.max_pool_grad)

        x = adaptive_avg_pool(x, _POOLED_SIZE)
        # H-W-C order is the free reshape of NHWC. torchvision's fc6 expects C-H-W order; the interop layer
        # permutes fc6's kernel rows once at load time instead of transposing activations on every step.
        x = x.reshape(x.shape[0], -1)
        layout = _FC_LAYOUT.get()

        def pin(y, i):  # onto the i-th sharding of fc_layout, when one is set
            return y if layout is None else jax.lax.with_sharding_constraint(y, layout[i])

        x = pin(x, 0)

        x = self._dropout(x, rngs)
        x = pin(self.fc6(x), 1)
        x = self.bn6(x) if bn else x
        x = act(x)

        x = self._dropout(x, rngs)
        x = pin(self.fc7(x), 1)
        x = self.bn7(x) if bn else x
        x = act(x)

        x = pin(pin(self.fc8(x), 2), 3)
        # Softmax/cross-entropy in bfloat16 loses too much; the loss always sees float32 logits.
        return x.astype(jnp.float32)


def create_model(model_config, *, rngs: nnx.Rngs) -> AlexNet:
    """Build AlexNet from a ``config.model`` ConfigDict (``variant, num_classes, width, dtype`` required;
    ``activation``, ``dropout_rate``, ``space_to_depth`` and ``max_pool_grad`` optional). ``dtype`` is a name such as "float32",
    "bfloat16" or "auto" (see compute_dtype)."""
    return AlexNet(
        model_config.variant,
        int(model_config.num_classes),
        width=float(model_config.width),
        dtype=compute_dtype(model_config.dtype),
        activation=model_config.get("activation", "relu"),
        dropout_rate=float(model_config.get("dropout_rate", 0.5)),
        space_to_depth=bool(model_config.get("space_to_depth", False)),
        max_pool_grad=model_config.get("max_pool_grad", "auto"),
        rngs=rngs,
    )


def model_graphdefs(model_config):
    """(train, eval) graph definitions; the train/eval switch is static structure, so each compiles once."""
    model = nnx.eval_shape(lambda: create_model(model_config, rngs=nnx.Rngs(0)))
    model.train()
    train_def = nnx.graphdef(model)
    model.eval()
    return train_def, nnx.graphdef(model)


def abstract_model_vars(model_config) -> dict:
    """Shapes and dtypes of {"params", "batch_stats"}, without allocating or initialising anything."""
    model = nnx.eval_shape(lambda: create_model(model_config, rngs=nnx.Rngs(0)))
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(batch_stats)}
