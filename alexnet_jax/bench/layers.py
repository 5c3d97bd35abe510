"""`python -m alexnet_jax.bench layers`: where a train step's time goes, one convolution and pooling at a time.

For each convolution of the config's model (shapes from the model itself: variant, width, image size, batch), the
compiled forward pass, input gradient and weight gradient are timed on their own (the median of --steps runs after
--warmup), and so are each max pool's forward pass and gradient (model.max_pool_grad's implementations, both). With
--torch the same operations run in PyTorch on the same device in the same process (torch.nn.functional.conv2d and
max_pool2d, torch.nn.grad.conv2d_input/conv2d_weight; channels_last, as the reference step uses), and each row also
carries the largest relative difference between the two libraries' results on the same inputs -- a check that the
rows compare the same computation.

conv1's input gradient is never computed in training (nothing upstream has parameters), so the step total
(`train_ops_ms`) leaves it out.
"""

import time

import numpy as np
from absl import flags

from alexnet_jax.bench import common

FLAGS = flags.FLAGS

# Spatial size into each layer follows the model's order: conv1 -> pool -> conv2 -> pool -> conv3..5 -> pool.
_CONVS = ("conv1", "conv2", "conv3", "conv4", "conv5")
_POOL_AFTER = {"conv1", "conv2", "conv5"}


def _median_ms(fn, *, steps: int, warmup: int, sync) -> float:
    for _ in range(max(1, warmup)):
        sync(fn())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return round(1000 * float(np.median(times)), 3)


def _rel_diff(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-30))


def layer_shapes(config) -> list[dict]:
    """Each convolution's input, kernel and output as the model has them, at the config's batch and image size."""
    from flax import nnx

    from alexnet_jax import models

    model = nnx.eval_shape(lambda: models.create_model(config.model, rngs=nnx.Rngs(0)))
    size, rows = int(config.data.image_size), []
    for name in _CONVS:
        conv = getattr(model, name)
        (kh, kw), (stride, _), ((pad, _), _) = conv.kernel_size, conv.strides, conv.padding
        out = (size + 2 * pad - kh) // stride + 1
        rows.append({"layer": name, "input": [int(config.batch_size), size, size, conv.in_features],
                     "kernel": [kh, kw, conv.in_features // conv.feature_group_count, conv.out_features],
                     "output": [int(config.batch_size), out, out, conv.out_features],
                     "stride": stride, "padding": pad, "groups": conv.feature_group_count})
        size = out
        if name in _POOL_AFTER:
            size = (size - 3) // 2 + 1
    return rows


def _jax_ops(row, dtype, seed: int):
    """(inputs, {op: jitted fn of the inputs}) for one convolution."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(row["input"]), dtype)
    w = jnp.asarray(rng.standard_normal(row["kernel"]) / np.sqrt(np.prod(row["kernel"][:3])), dtype)

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (row["stride"],) * 2, [(row["padding"],) * 2] * 2,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=row["groups"])

    g = jnp.asarray(rng.standard_normal(jax.eval_shape(conv, x, w).shape), dtype)
    ops = {"fwd": jax.jit(conv),
           "dx": jax.jit(lambda x, w: jax.vjp(lambda x: conv(x, w), x)[1](g)[0]),
           "dw": jax.jit(lambda x, w: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])}
    return (x, w, g), ops


def _torch_ops(row, x, w, g, dtype_name: str):
    """The same three operations in PyTorch on the same values (NCHW views of channels_last tensors)."""
    import torch

    dtype = getattr(torch, dtype_name)

    def nchw(a):  # NHWC (or HWIO) numpy -> NCHW (or OIHW) channels_last tensor
        t = torch.from_numpy(np.array(a, np.float32)).to(dtype)
        return t.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

    xt, gt = nchw(x), nchw(g)
    wt = torch.from_numpy(np.array(w, np.float32)).to(dtype).permute(3, 2, 0, 1).contiguous(
        memory_format=torch.channels_last)
    args = dict(stride=row["stride"], padding=row["padding"], groups=row["groups"])
    to_nhwc = lambda t: t.float().permute(0, 2, 3, 1).numpy()  # noqa: E731
    return {"fwd": (lambda: torch.nn.functional.conv2d(xt, wt, **args), to_nhwc),
            "dx": (lambda: torch.nn.grad.conv2d_input(xt.shape, wt, gt, **args), to_nhwc),
            "dw": (lambda: torch.nn.grad.conv2d_weight(xt, wt.shape, gt, **args),
                   lambda t: t.float().permute(2, 3, 1, 0).numpy())}


def _pool_rows(shapes, dtype, *, steps: int, warmup: int, with_torch: bool) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from alexnet_jax import models

    rows = []
    for row in shapes:
        if row["layer"] not in _POOL_AFTER:
            continue
        x = jnp.asarray(np.random.default_rng(1).standard_normal(row["output"]), dtype)
        g = jnp.ones(jax.eval_shape(models.max_pool, x).shape, dtype)
        forward = jax.jit(models.max_pool)
        result = {"layer": f"pool after {row['layer']}", "input": list(x.shape),
                  "fwd_ms": _median_ms(lambda: forward(x), steps=steps, warmup=warmup, sync=jax.block_until_ready)}
        for grad in ("xla", "slices"):
            fn = jax.jit(lambda x, grad=grad: jax.vjp(lambda x: models.max_pool(x, grad), x)[1](g)[0])
            result[f"grad_{grad}_ms"] = _median_ms(lambda fn=fn: fn(x), steps=steps, warmup=warmup,
                                                   sync=jax.block_until_ready)
        if with_torch:
            import torch

            xt = torch.from_numpy(np.array(x, np.float32)).permute(0, 3, 1, 2).contiguous(
                memory_format=torch.channels_last).requires_grad_()

            def torch_grad():
                y = torch.nn.functional.max_pool2d(xt, 3, 2)
                return torch.autograd.grad(y, xt, torch.ones_like(y))[0]

            result["torch_fwd_ms"] = _median_ms(lambda: torch.nn.functional.max_pool2d(xt.detach(), 3, 2),
                                                steps=steps, warmup=warmup, sync=lambda _: None)
            result["torch_grad_ms"] = _median_ms(torch_grad, steps=steps, warmup=warmup, sync=lambda _: None)
        rows.append(result)
    return rows


def run(config, *, steps: int, warmup: int, with_torch: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from alexnet_jax import models

    dtype = jnp.dtype(models.compute_dtype(config.model.dtype))
    shapes = layer_shapes(config)
    rows = []
    for i, row in enumerate(shapes):
        inputs, ops = _jax_ops(row, dtype, seed=i)
        result = dict(row)
        jax_out = {}
        for op, fn in ops.items():
            jax_out[op] = fn(*inputs[:2])
            result[f"{op}_ms"] = _median_ms(lambda fn=fn: fn(*inputs[:2]), steps=steps, warmup=warmup,
                                            sync=jax.block_until_ready)
        if with_torch:
            for op, (fn, to_numpy) in _torch_ops(row, *inputs, dtype.name).items():
                result[f"torch_{op}_ms"] = _median_ms(fn, steps=steps, warmup=warmup, sync=lambda _: None)
                result[f"{op}_rel_diff"] = _rel_diff(jax_out[op], to_numpy(fn()))
        rows.append(result)
    pools = _pool_rows(shapes, dtype, steps=steps, warmup=warmup, with_torch=with_torch)
    # What a train step runs: every forward and weight gradient, the input gradients past conv1, the pools.
    pool_grad = models.resolve_max_pool_grad(config.model.get("max_pool_grad", "auto"))
    report = {"convolutions": rows, "pools": pools, "dtype": dtype.name, "max_pool_grad": pool_grad,
              "train_ops_ms": round(sum(r["fwd_ms"] + r["dw_ms"] + (r["dx_ms"] if i else 0)
                                        for i, r in enumerate(rows))
                                    + sum(p["fwd_ms"] + p[f"grad_{pool_grad}_ms"] for p in pools), 3)}
    if with_torch:
        report["torch_train_ops_ms"] = round(
            sum(r["torch_fwd_ms"] + r["torch_dw_ms"] + (r["torch_dx_ms"] if i else 0) for i, r in enumerate(rows))
            + sum(p["torch_grad_ms"] for p in pools), 3)  # autograd.grad of a pool runs its forward too
    return report


def run_command(config) -> dict:
    config.data.source = "synthetic"
    common.validated(config)
    if FLAGS.torch:
        common.torch_reference_module(config)  # the same checks: PyTorch installed, one device
    report = run(config, steps=FLAGS.steps, warmup=FLAGS.warmup, with_torch=FLAGS.torch)
    info = common.model_info(config)
    if FLAGS.torch:
        import torch

        info["torch"] = torch.__version__
    return {"bench": "layers", **report, **info, **common.device_info(), "steps": FLAGS.steps, "warmup": FLAGS.warmup,
            **common.host_info()}


def print_report(result: dict) -> None:
    device = f"[{result['device']}]"
    with_torch = "torch_train_ops_ms" in result
    print(f"bench layers on {result['device']} (jax {result['jax']}): {result['variant']} width "
          f"{result['width']:g} {result['dtype']}, {result['image_size']} px, batch {result['global_batch']}, "
          f"load average {result.get('load_average_1m', '?')} on {result['cpu_count']} CPUs; median ms {device}")
    header = "  layer   input               kernel          fwd      dx      dw"
    print(header + ("   | torch fwd      dx      dw   max rel diff" if with_torch else ""))
    for r in result["convolutions"]:
        line = (f"  {r['layer']:6s}  {'x'.join(map(str, r['input'])):18s}  {'x'.join(map(str, r['kernel'])):13s}"
                f" {r['fwd_ms']:7.1f} {r['dx_ms']:7.1f} {r['dw_ms']:7.1f}")
        if with_torch:
            diff = max(r["fwd_rel_diff"], r["dx_rel_diff"], r["dw_rel_diff"])
            line += f"   | {r['torch_fwd_ms']:9.1f} {r['torch_dx_ms']:7.1f} {r['torch_dw_ms']:7.1f}   {diff:.1e}"
        print(line)
    for p in result["pools"]:
        line = (f"  {p['layer']:15s} {'x'.join(map(str, p['input'])):18s} fwd {p['fwd_ms']:6.1f}  grad: xla "
                f"{p['grad_xla_ms']:6.1f}, slices {p['grad_slices_ms']:6.1f}")
        if with_torch:
            line += f"   | torch fwd {p['torch_fwd_ms']:6.1f}, fwd+grad {p['torch_grad_ms']:6.1f}"
        print(line)
    line = (f"  train-step ops (conv1 dx excluded; pool grad {result['max_pool_grad']}): "
            f"{result['train_ops_ms']:.1f} ms")
    if with_torch:
        line += f", torch {result['torch_train_ops_ms']:.1f} ms"
    print(f"{line}  {device}")
