"""What every benchmark reports beside its numbers (the machine, the device, the model), the peak FLOP/s table
behind MFU, the JPEGs the JPEG benchmarks read, and the one error type a bad flag or config raises."""

import os
import platform
import time

import numpy as np
from absl import flags

from alexnet_jax import storage
from alexnet_jax.utilization import mfu, peak_tflops, step_flops  # noqa: F401 (the benchmarks' MFU)

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "configs", "imagenet.py")

FLAGS = flags.FLAGS


class UsageError(Exception):
    """A bad flag or config value: the command prints it as one `error:` line and exits 2."""


# A spread of the commonest ImageNet train sizes (width, height); most photos are 500 px on the long side.
IMAGENET_LIKE_SIZES = ((500, 375), (500, 333), (375, 500), (500, 400), (400, 300), (500, 500), (640, 480))


def write_jpegs(directory: str, count: int, seed: int = 0, classes: int = 4) -> list[str]:
    """`count` photo-like JPEGs (smooth colour fields + sensor-like noise, ~80 KB each at 500x375, quality 90)
    in an ImageFolder layout with `classes` class folders; returns their paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for c in range(classes):
        os.makedirs(os.path.join(directory, f"class_{c}"), exist_ok=True)
    for i in range(count):
        width, height = IMAGENET_LIKE_SIZES[0] if i % 2 == 0 else IMAGENET_LIKE_SIZES[rng.integers(
            len(IMAGENET_LIKE_SIZES))]
        coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.int16)
        noisy = np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)
        path = os.path.join(directory, f"class_{i % classes}", f"img_{i:05d}.JPEG")
        Image.fromarray(noisy).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (Linux); 0 where /proc is not there."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def cpu_now(child_pids) -> float:
    return time.process_time() + sum(proc_cpu_seconds(p) for p in child_pids)


def machine_info() -> dict:
    info = {"cpu_count": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    if hasattr(os, "getloadavg"):  # other work on the machine shows here: img/s are only comparable when it is low
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    if hasattr(os, "sched_getaffinity"):
        info["cpus_available"] = len(os.sched_getaffinity(0))
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu_model"] = platform.processor()
    try:
        from PIL import Image, features

        info["pillow"] = Image.__version__
        info["libjpeg_turbo"] = bool(features.check_feature("libjpeg_turbo"))
    except Exception:
        pass
    from alexnet_jax.data import decode

    info["simplejpeg"] = decode.simplejpeg is not None
    try:
        import jax

        info["device"] = f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind} x {jax.device_count()}"
    except Exception as error:
        info["device"] = f"unavailable ({error})"
    return info


def data_dir() -> str:
    """--data, checked: a UsageError naming it when it is not a readable folder."""
    if FLAGS.data and (problem := storage.problem(FLAGS.data, "dir")):
        raise UsageError(f"--data: {problem}")
    return FLAGS.data


def device_info() -> dict:
    import jax

    device = jax.devices()[0]
    return {"device": f"{device.platform}: {device.device_kind} x {jax.device_count()}",
            "device_kind": device.device_kind, "platform": device.platform, "device_count": jax.device_count(),
            "process_count": jax.process_count(), "jax": jax.__version__,
            "peak_tflops": peak_tflops(device.device_kind) or "unknown"}


def model_info(config) -> dict:
    import jax.numpy as jnp

    from alexnet_jax import models

    # The dtype the step computes in: model.dtype=auto is resolved for this device (bfloat16 on GPU/TPU).
    dtype = jnp.dtype(models.compute_dtype(config.model.dtype)).name
    return {"variant": config.model.variant, "width": float(config.model.width), "dtype": dtype,
            "num_classes": int(config.model.num_classes), "image_size": int(config.data.image_size),
            "global_batch": int(config.batch_size), "mesh_model": int(config.mesh.model)}


def host_info() -> dict:
    """machine_info without its device (device_info has it) and with its OS "platform" renamed, as "platform"
    here is the device's (cpu, gpu, tpu)."""
    info = machine_info()
    info.pop("device", None)
    info["host_platform"] = info.pop("platform")
    return info


def validated(config):
    import jax

    from alexnet_jax import config as config_lib

    try:
        config_lib.validate(config, jax.device_count(), jax.process_count())
    except config_lib.ConfigError as error:
        raise UsageError(f"config: {error}") from None
    return config


def torch_reference_module(config):
    """The torch_reference module, or a UsageError saying why --torch cannot run with this config."""
    import jax

    try:
        from alexnet_jax.bench import torch_reference
    except ImportError:
        raise UsageError("--torch needs PyTorch: pip install torch") from None
    if config.model.variant not in ("owt", "bn"):
        raise UsageError(f"--torch: the PyTorch reference has owt and bn, not model.variant={config.model.variant}")
    if int(config.mesh.model) != 1 or jax.device_count() != 1:
        raise UsageError("--torch compares one device: run it with a single device and mesh.model=1")
    return torch_reference


def with_default_config(argv: list[str]) -> list[str]:
    """argv with --config=configs/imagenet.py added when it names no config. Not a flag default: config_flags
    loads a default file as the flag is defined, where a bad --config.KEY override is a traceback instead of
    cli's one error line."""
    if any(arg == "--config" or arg.startswith("--config=") for arg in argv[1:]):
        return argv
    return [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]
