"""The PyTorch reference for `bench step`: the same AlexNet, optimizer and step, timed on the same device.

    python -m alexnet_jax.bench.torch_reference [--variant=owt|bn] [--batch_size=256] [--image_size=224]
        [--dtype=bfloat16|float32] [--compile] [--steps=20] [--warmup=5] [--json]

The step is what the JAX train step does: a uint8 NHWC batch on the device -> random left-right flip ->
PCA colour noise (sigma 0.1) -> normalise -> forward (channels_last; bf16 autocast when --dtype=bfloat16) ->
cross-entropy -> backward -> clip at global norm -> SGD with momentum 0.9 and weight decay on weights only (as
optim.py masks it). With --compile the step runs under torch.compile, the fastest PyTorch configuration on a GPU.
Runs on CUDA when one is there, else on the CPU (small sizes only: the tests run it there). With --json the last
stdout line is one JSON object: img_per_s, ms_per_step, step_gflops (forward + backward, from torch's FLOP
counter), device, and the settings.
"""

import json
import sys
import time

import torch
from absl import flags
from torch import nn

from alexnet_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Called only when run as a command: importing this module defines no flags."""
    flags.DEFINE_enum("variant", "owt", ["owt", "bn"], "AlexNet variant (as model.variant).")
    flags.DEFINE_float("width", 1.0, "Channel width multiplier (as model.width).")
    flags.DEFINE_integer("num_classes", 1000, "Output classes.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 256, "Batch size.", lower_bound=1)
    flags.DEFINE_integer("image_size", 224, "Input side in pixels.", lower_bound=64)
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype (autocast); parameters "
                      "stay float32 as in the JAX model.")
    flags.DEFINE_bool("compile", False, "Run the step under torch.compile.")
    flags.DEFINE_integer("steps", 20, "Timed steps.", lower_bound=1)
    flags.DEFINE_integer("warmup", 5, "Untimed steps first (compilation happens here).", lower_bound=0)
    flags.DEFINE_bool("json", False, "Print one JSON object as the last stdout line.")


CONV_CHANNELS = (64, 192, 384, 256, 256)  # conv1..conv5 of the owt and bn layouts at width 1
HIDDEN = 4096
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# transforms.IMAGENET_PCA_EIGVAL / _EIGVEC, repeated here so this module needs no jax
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


def scaled(channels: int, width: float) -> int:
    """models.scaled_channels: width-scaled, rounded to an even count."""
    return max(2, 2 * int(channels * width / 2 + 0.5))


class AlexNet(nn.Module):
    """The `owt` layout (with BatchNorm after every conv and hidden FC for `bn`, and no bias before it), the
    shapes of alexnet_jax.models.AlexNet."""

    def __init__(self, variant: str = "owt", num_classes: int = 1000, width: float = 1.0):
        super().__init__()
        bn = variant == "bn"
        c = [3, *(scaled(ch, width) for ch in CONV_CHANNELS)]
        hidden = scaled(HIDDEN, width)
        layers = []
        for i, (kernel, stride, padding, pool) in enumerate(
                [(11, 4, 2, True), (5, 1, 2, True), (3, 1, 1, False), (3, 1, 1, False), (3, 1, 1, True)]):
            layers.append(nn.Conv2d(c[i], c[i + 1], kernel, stride, padding, bias=not bn))
            layers += [nn.BatchNorm2d(c[i + 1])] if bn else []
            layers.append(nn.ReLU(inplace=True))
            layers += [nn.MaxPool2d(3, 2)] if pool else []
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d((6, 6)), nn.Flatten())

        def hidden_layer(features_in):
            return [nn.Dropout(0.5), nn.Linear(features_in, hidden, bias=not bn),
                    *([nn.BatchNorm1d(hidden)] if bn else []), nn.ReLU(inplace=True)]

        self.classifier = nn.Sequential(*hidden_layer(c[-1] * 36), *hidden_layer(hidden),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def make_optimizer(model: nn.Module, learning_rate: float = 0.01, weight_decay: float = 5e-4):
    """SGD, momentum 0.9, weight decay on conv and linear weights only (not biases or BatchNorm), as optim.py."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}], lr=learning_rate, momentum=0.9)


def make_step(model, optimizer, device: torch.device, dtype: str, clip_norm: float = 10.0):
    mean = torch.tensor(MEAN_RGB, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STDDEV_RGB, device=device).view(1, 3, 1, 1)
    eigval = torch.tensor(PCA_EIGVAL, device=device)
    eigvec = torch.tensor(PCA_EIGVEC, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step(images_uint8_nhwc, labels):
        x = images_uint8_nhwc.permute(0, 3, 1, 2).float()  # NCHW view of NHWC memory: channels_last already
        flip = torch.rand(x.shape[0], 1, 1, 1, device=device) < 0.5
        x = torch.where(flip, x.flip(3), x)
        alpha = torch.randn(x.shape[0], 3, device=device) * 0.1
        x = x + (255.0 * (alpha * eigval) @ eigvec.T).view(-1, 3, 1, 1)  # AlexNet's lighting noise
        x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
        with autocast:
            loss = nn.functional.cross_entropy(model(x).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        return loss.detach()

    return step


def forward_backward_flops(model, images, labels, device, dtype) -> float:
    """FLOPs of one forward and backward pass, counted by torch on a copy of the model (eager, no update)."""
    from torch.utils.flop_counter import FlopCounterMode

    import copy

    probe = copy.deepcopy(model)
    step = make_step(probe, make_optimizer(probe), device, dtype)
    with FlopCounterMode(display=False) as counter:
        step(images, labels)
    return float(counter.get_total_flops())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(variant: str, batch_size: int, image_size: int, dtype: str, *, width: float = 1.0,
          num_classes: int = 1000, compile_step: bool = False, steps: int = 20, warmup: int = 5) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = AlexNet(variant, num_classes, width).to(device).to(memory_format=torch.channels_last).train()
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, image_size, image_size, 3), dtype=torch.uint8,
                           generator=generator).to(device)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)
    flops = forward_backward_flops(model, images, labels, device, dtype)
    step = make_step(model, make_optimizer(model), device, dtype)
    if compile_step:
        step = torch.compile(step)
    start = time.perf_counter()
    for _ in range(warmup):
        loss = step(images, labels)
    _sync(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(images, labels)
    _sync(device)
    seconds = time.perf_counter() - start
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"bench": "torch_step", "img_per_s": round(batch_size * steps / seconds, 2),
            "ms_per_step": round(1000 * seconds / steps, 3), "warmup_s": round(warmup_s, 3),
            "step_gflops": round(flops / 1e9, 3), "final_loss": float(loss), "device": f"{device.type}: {name}",
            "variant": variant, "width": width, "dtype": dtype, "image_size": image_size,
            "global_batch": batch_size, "compile": compile_step, "steps": steps, "warmup": warmup,
            "torch": torch.__version__}


def main(argv) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return cli.EXIT_BAD_USAGE
    result = bench(FLAGS.variant, FLAGS.batch_size, FLAGS.image_size, FLAGS.dtype, width=FLAGS.width,
                   num_classes=FLAGS.num_classes, compile_step=FLAGS.compile, steps=FLAGS.steps,
                   warmup=FLAGS.warmup)
    print(f"torch {result['torch']} on {result['device']}: {result['variant']} width {result['width']:g} "
          f"{result['dtype']}{' compiled' if result['compile'] else ''}, {result['image_size']} px, batch "
          f"{result['global_batch']}: {result['img_per_s']:.1f} img/s, {result['ms_per_step']:.2f} ms/step  "
          f"[{result['device']}]")
    if FLAGS.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
