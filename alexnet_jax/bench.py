"""Benchmarks: python -m alexnet_jax.bench {step,loop,pipeline,e2e} [--config=...] [--json]

With --json the last stdout line is one JSON object.

pipeline: the host input pipeline against a plain Pillow loop, on the same JPEG files and the same cores.
    python -m alexnet_jax.bench pipeline --json [--images=512] [--workers=N] [--data=IMAGEFOLDER]
  Writes `--images` JPEGs of ImageNet-like sizes (~500x375, quality 90) to a temp dir (or reads an existing
  ImageFolder with --data), then measures, one after the other:
  - pil_baseline: one process looping Image.open -> convert("RGB") -> resize short side to 256 (bilinear) ->
    random 224 crop -> numpy, the textbook per-image train transform;
  - pipeline (1 worker): our train pipeline (alexnet_jax.data.pipeline.train_batches, the "alexnet" augment)
    with one grain worker process -- the per-core comparison;
  - pipeline: the same with `--workers` processes (default: one per CPU) -- how it scales -- next to the plain
    loop run in as many processes at once (pil_baseline_parallel).
  img/s are wall-clock; cpu_ms_per_img counts the CPU time of every process involved (Linux /proc), so
  "per core" is a like-for-like number even on a busy machine.

step: the compiled train step alone, the ceiling of what the device can do with this model.
    python -m alexnet_jax.bench step --json [--config=configs/imagenet.py] [--config.KEY=VALUE ...]
        [--steps=20] [--warmup=2]
  One fixed synthetic uint8 batch is put on the device once; the step from train.compile_steps (the one
  training runs: on-device flip/lighting/normalise, forward, backward, optax update, donated state) is compiled
  ahead of time (compile_s), run `--warmup` times, then `--steps` times with a single block_until_ready at the
  end (img_per_s, ms_per_step: the pipelined rate training sees), then `--steps` times more with a
  block_until_ready after each (ms_per_step_synced_median: one step's latency, dispatch included; in loop and
  e2e also the batch's fetch and transfer).

loop: the real host -> device loop of train.train_and_evaluate, without eval or checkpoints.
    python -m alexnet_jax.bench loop --json [--config=...] [--config.KEY=VALUE ...] [--workers=N]
  The `synthetic` source (random pixels: no files, no decode) through pipeline.train_batches (crop, batching,
  grain workers) and sharding.host_to_global into the same step, so the host's share of a step shows:
  host_ms_per_step is the time the loop spent getting and transferring each batch (it overlaps the device's
  work when the host keeps ahead; compare img_per_s with `step`'s).

e2e: `loop` from JPEG files: --images JPEGs of ImageNet-like sizes (~500x375, as `pipeline` writes them) in a
  temp ImageFolder (or an existing one, --data), read by the imagefolder source and decoded in the grain workers.
    python -m alexnet_jax.bench e2e --json [--config=...] [--config.KEY=VALUE ...] [--workers=N] [--images=512]

step, loop and e2e read the config like training does (default configs/imagenet.py: width 1, 224 px, global
batch 256): model.*, data.image_size/resize_size/augment/random_flip/lighting_std/workers, batch_size, optim.*,
mesh.model apply; data.source is replaced by what the benchmark reads. `--workers` (loop, e2e) overrides
data.workers, with its meaning: 0 decodes in this process. Every number is reported with the device it was
measured on (platform, device kind, count) and the load average, as timings on a busy machine are not comparable.
"""

import argparse
import gc
import io
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

from alexnet_jax import storage

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


def _proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (Linux); 0 where /proc is not there."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _cpu_now(child_pids) -> float:
    return time.process_time() + sum(_proc_cpu_seconds(p) for p in child_pids)


def pil_baseline(paths: list[str], image_size: int, resize_size: int, seed: int = 0) -> dict:
    """The plain loop: open, RGB, short side to resize_size, random image_size crop, as numpy."""
    from PIL import Image

    rng = np.random.default_rng(seed)

    def one(path):
        with Image.open(io.BytesIO(storage.read_bytes(path))) as image:  # the timed read, local or gs://
            image = image.convert("RGB")
            w, h = image.size
            scale = resize_size / min(w, h)
            image = image.resize((max(resize_size, round(w * scale)), max(resize_size, round(h * scale))),
                                 Image.Resampling.BILINEAR)
            array = np.asarray(image)
        top = int(rng.integers(array.shape[0] - image_size + 1))
        left = int(rng.integers(array.shape[1] - image_size + 1))
        return np.ascontiguousarray(array[top:top + image_size, left:left + image_size])

    for path in paths[:8]:  # warm the page cache and Pillow's plugins like the pipeline's first batch does
        one(path)
    cpu, start = time.process_time(), time.perf_counter()
    for path in paths:
        one(path)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"img_per_s": len(paths) / wall, "cpu_ms_per_img": 1000 * cpu / len(paths)}


def _baseline_chunk(args) -> int:
    paths, image_size, resize_size, seed = args
    pil_baseline(paths, image_size, resize_size, seed)
    return len(paths)


def pil_baseline_parallel(paths: list[str], image_size: int, resize_size: int, processes: int) -> dict:
    """The plain loop in `processes` processes at once over disjoint shares of the files: how the textbook
    loop scales on these cores under the same load, next to the pipeline's workers."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(processes) as pool:
        pool.map(_baseline_chunk, [(paths[:4], image_size, resize_size, k) for k in range(processes)])  # start-up
        children = [p.pid for p in multiprocessing.active_children()]
        shares = [(paths[k::processes], image_size, resize_size, k) for k in range(processes)]
        cpu, start = _cpu_now(children), time.perf_counter()
        pool.map(_baseline_chunk, shares, chunksize=1)
        wall, cpu = time.perf_counter() - start, _cpu_now(children) - cpu
    # Each share also decodes its first 8 files twice (pil_baseline's warm-up): count those too.
    done = len(paths) + sum(min(8, len(s[0])) for s in shares)
    return {"img_per_s": done / wall, "cpu_ms_per_img": 1000 * cpu / done}


def pipeline_throughput(source, *, workers: int, batch_size: int, images: int, image_size: int, resize_size: int,
                        augment: str = "alexnet") -> dict:
    """img/s and CPU ms/img of the train pipeline over `images` images, after its first batch (worker start-up,
    imports and the first prefetch are not counted)."""
    import multiprocessing

    from alexnet_jax.data import pipeline

    batches = pipeline.train_batches(source, workers=workers, global_batch_size=batch_size, seed=0,
                                     image_size=image_size, resize_size=resize_size, augment=augment)
    next(batches)
    children = [p.pid for p in multiprocessing.active_children()]
    steps = max(1, images // batch_size)
    cpu, start = _cpu_now(children), time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
    wall, cpu = time.perf_counter() - start, _cpu_now(children) - cpu
    assert batch["image"].shape == (batch_size, image_size, image_size, 3) and batch["image"].dtype == np.uint8
    del batches
    return {"img_per_s": steps * batch_size / wall, "cpu_ms_per_img": 1000 * cpu / (steps * batch_size),
}


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


def run_pipeline(args) -> dict:
    from alexnet_jax.data import imagefolder

    workers = args.workers or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="alexnet_bench_") as tmp:
        if args.data:
            source = imagefolder.ImageFolderSource(args.data)
            paths = [source.name(i) for i in np.random.default_rng(0).permutation(len(source))[:args.images]]
        else:
            print(f"writing {args.images} JPEGs to {tmp} ...", file=sys.stderr)
            paths = write_jpegs(tmp, args.images)
            source = imagefolder.ImageFolderSource(tmp)
        sizes = [storage.size(p) for p in paths]
        print(f"pil baseline over {len(paths)} files ...", file=sys.stderr)
        baseline = pil_baseline(paths, args.image_size, args.resize_size)
        kwargs = dict(batch_size=args.batch_size, images=max(len(paths), 2 * args.batch_size),
                      image_size=args.image_size, resize_size=args.resize_size, augment=args.augment)
        print(f"pil baseline in {workers} processes ...", file=sys.stderr)
        baseline_parallel = pil_baseline_parallel(paths, args.image_size, args.resize_size, workers)
        print("pipeline, 1 worker ...", file=sys.stderr)
        one = pipeline_throughput(source, workers=1, **kwargs)
        print(f"pipeline, {workers} workers ...", file=sys.stderr)
        many = pipeline_throughput(source, workers=workers, **kwargs)
    result = {
        "bench": "pipeline",
        "pipeline_img_per_s": round(many["img_per_s"], 1),
        "pil_baseline_img_per_s": round(baseline["img_per_s"], 1),
        "pipeline_1worker_img_per_s": round(one["img_per_s"], 1),
        "pil_baseline_parallel_img_per_s": round(baseline_parallel["img_per_s"], 1),
        "pipeline_cpu_ms_per_img": round(many["cpu_ms_per_img"], 3),
        "pipeline_1worker_cpu_ms_per_img": round(one["cpu_ms_per_img"], 3),
        "pil_baseline_cpu_ms_per_img": round(baseline["cpu_ms_per_img"], 3),
        # > 1: the pipeline does an image with less CPU than the plain loop (the "per core" comparison)
        "per_core_speedup": round(baseline["cpu_ms_per_img"] / one["cpu_ms_per_img"], 3),
        "workers": workers,
        "batch_size": args.batch_size,
        "images": len(paths),
        "mean_file_kb": round(float(np.mean(sizes)) / 1024, 1),
        "data": args.data or "synthetic JPEGs (ImageNet-like sizes)",
        "augment": args.augment,
        "image_size": args.image_size,
        "resize_size": args.resize_size,
        **machine_info(),
    }
    print(f"pil baseline   {result['pil_baseline_img_per_s']:8.1f} img/s  "
          f"{result['pil_baseline_cpu_ms_per_img']:.2f} CPU ms/img (1 process)")
    print(f"pil baseline x{workers:<2d}{result['pil_baseline_parallel_img_per_s']:7.1f} img/s  "
          f"{baseline_parallel['cpu_ms_per_img']:.2f} CPU ms/img ({workers} processes)")
    print(f"pipeline  x1   {result['pipeline_1worker_img_per_s']:8.1f} img/s  "
          f"{result['pipeline_1worker_cpu_ms_per_img']:.2f} CPU ms/img (1 worker)")
    print(f"pipeline  x{workers:<3d}{result['pipeline_img_per_s']:8.1f} img/s  "
          f"{result['pipeline_cpu_ms_per_img']:.2f} CPU ms/img ({workers} workers, {os.cpu_count()} CPUs)")
    return result


# --- step, loop, e2e: the train step, alone and fed ----------------------------------------------------------------

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "imagenet.py")


class UsageError(Exception):
    """A bad flag or config value: main prints it as one `error:` line and exits 2."""


def load_config(path: str, overrides: list[str]):
    """The config file with `--config.KEY=VALUE` overrides applied, parsed by ml_collections exactly as
    `alexnet_jax.main` parses them (locked: an override can change a key, not add one)."""
    from absl import flags
    from ml_collections import config_flags

    if not os.path.isfile(path):
        raise UsageError(f"--config: no such file: {path}")
    argv = ["bench", f"--config={path}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=flag_values, lock_config=True,
                                    sys_argv=argv)
    try:
        rest = flag_values(argv)
    except (AttributeError, KeyError):  # ml_collections' answers to an override of a key the config lacks
        raise UsageError(_unknown_key(path, overrides)) from None
    except (flags.Error, OSError) as error:
        raise UsageError(str(error).splitlines()[0]) from None
    if rest[1:]:
        raise UsageError(f"unexpected arguments: {' '.join(rest[1:])}")
    return flag_values.config


def _unknown_key(path: str, overrides: list[str]) -> str:
    """The message naming the first override whose key the config file does not define."""
    config = load_config(path, [])
    for arg in overrides:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].split("=", 1)[0]
        node = config
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                return f"{arg}: config has no key {key} ({path})"
            node = node[part]
    return f"config: overrides {' '.join(overrides)} do not apply to {path}"


def device_info() -> dict:
    import jax

    device = jax.devices()[0]
    return {"device": f"{device.platform}: {device.device_kind} x {jax.device_count()}",
            "device_kind": device.device_kind, "platform": device.platform, "device_count": jax.device_count(),
            "process_count": jax.process_count(), "jax": jax.__version__}


def model_info(config) -> dict:
    return {"variant": config.model.variant, "width": float(config.model.width), "dtype": config.model.dtype,
            "num_classes": int(config.model.num_classes), "image_size": int(config.data.image_size),
            "global_batch": int(config.batch_size), "mesh_model": int(config.mesh.model)}


def build_step(config, total_steps: int):
    """(mesh, fresh train state, AOT-compiled train step, init seconds, compile seconds): the state and the
    step train.train_and_evaluate builds, compiled for this config's global batch."""
    import jax
    import jax.numpy as jnp

    from alexnet_jax import optim, sharding, train

    mesh = sharding.create_mesh(config.mesh.model)
    # One "epoch" as long as the run: the schedule's shape does not change the step's cost, only its values.
    learning_rate_fn = optim.create_learning_rate_fn(config.optim, max(1, total_steps), max(1, total_steps))
    tx = train.create_optimizer(config.optim, learning_rate_fn)
    abstract_state = train.abstract_train_state(config, mesh, tx)
    state_shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
    start = time.perf_counter()
    state = jax.block_until_ready(train.create_train_state(config, tx, abstract_state))
    init_s = time.perf_counter() - start
    step_fn, _ = train.compile_steps(config, mesh, tx, learning_rate_fn, state_shardings)
    size, batch_sharding = int(config.data.image_size), sharding.batch_sharding(mesh)
    abstract_batch = {
        "image": jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.uint8, sharding=batch_sharding),
        "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=batch_sharding)}
    start = time.perf_counter()
    compiled = step_fn.lower(abstract_state, abstract_batch).compile()
    return mesh, state, compiled, init_s, time.perf_counter() - start


def time_steps(step, state, next_batch, *, steps: int, warmup: int) -> tuple[dict, object]:
    """Runs `warmup` steps, then `steps` steps synced once at the end, then `steps` steps synced each.

    `next_batch()` gives the step's global batch; the time spent in it is counted apart (host_s), so a loop fed
    by the host shows how much of a step the host took. Returns (timings, final state)."""
    import jax

    step_metrics = None
    for _ in range(warmup):
        state, step_metrics = step(state, next_batch())
    jax.block_until_ready((state, step_metrics))

    host_s = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        fetch = time.perf_counter()
        batch = next_batch()
        host_s += time.perf_counter() - fetch
        state, step_metrics = step(state, batch)
    jax.block_until_ready((state, step_metrics))  # state s+1 depends on state s: this waits for every step
    pipelined_s = time.perf_counter() - start

    synced = []
    for _ in range(steps):
        start = time.perf_counter()
        state, step_metrics = step(state, next_batch())
        jax.block_until_ready((state, step_metrics))
        synced.append(time.perf_counter() - start)
    loss = float(jax.device_get(step_metrics["train_loss"]))
    return {"pipelined_s": pipelined_s, "host_s": host_s, "synced_s": synced, "final_loss": loss,
            "skipped_steps": int(jax.device_get(state.skipped_steps))}, state


def _report(bench: str, config, timings: dict, *, steps: int, warmup: int, init_s: float, compile_s: float,
            extra: dict) -> dict:
    batch = int(config.batch_size)
    median_s = float(np.median(timings["synced_s"]))
    return {
        "bench": bench,
        "img_per_s": round(batch * steps / timings["pipelined_s"], 2),
        "ms_per_step": round(1000 * timings["pipelined_s"] / steps, 3),
        "ms_per_step_synced_median": round(1000 * median_s, 3),
        "img_per_s_synced_median": round(batch / median_s, 2),
        "host_ms_per_step": round(1000 * timings["host_s"] / steps, 3),
        "compile_s": round(compile_s, 3),
        "init_s": round(init_s, 3),
        "steps": steps,
        "warmup": warmup,
        "final_loss": timings["final_loss"],
        "skipped_steps": timings["skipped_steps"],
        **device_info(),
        **model_info(config),
        **extra,
        **_host_info(),
    }


def _host_info() -> dict:
    """machine_info without its device (device_info has it) and with its OS "platform" renamed, as "platform"
    here is the device's (cpu, gpu, tpu)."""
    info = machine_info()
    info.pop("device", None)
    info["host_platform"] = info.pop("platform")
    return info


def _print_report(result: dict) -> None:
    print(f"bench {result['bench']} on {result['device']} (jax {result['jax']}): {result['variant']} width "
          f"{result['width']:g} {result['dtype']}, {result['image_size']} px, global batch {result['global_batch']}"
          f", load average {result.get('load_average_1m', '?')} on {result['cpu_count']} CPUs")
    device = f"[{result['device']}]"
    print(f"  compile {result['compile_s']:.2f} s, state init {result['init_s']:.2f} s  {device}")
    print(f"  {result['steps']} steps, one sync at the end: {result['img_per_s']:10.1f} img/s "
          f"{result['ms_per_step']:9.2f} ms/step  {device}")
    print(f"  {result['steps']} steps, synced each, median: {result['img_per_s_synced_median']:8.1f} img/s "
          f"{result['ms_per_step_synced_median']:9.2f} ms/step  {device}")
    if result["bench"] != "step":
        print(f"  host (batch fetch + transfer): {result['host_ms_per_step']:.2f} ms/step, "
              f"{result['workers']} worker(s), first batch after {result['first_batch_s']:.2f} s  {device}")


def _check_steps(args) -> None:
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1 (got {args.steps})")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0 (got {args.warmup})")
    if getattr(args, "workers", None) is not None and args.workers < 0:
        raise UsageError(f"--workers must be >= 0 (got {args.workers})")
    if getattr(args, "images", 1) < 1:
        raise UsageError(f"--images must be >= 1 (got {args.images})")


def _validated(config):
    import jax

    from alexnet_jax import config as config_lib

    try:
        config_lib.validate(config, jax.device_count(), jax.process_count())
    except config_lib.ConfigError as error:
        raise UsageError(f"config: {error}") from None
    return config


def run_step(args, config) -> dict:
    import jax

    from alexnet_jax import sharding

    config.data.source = "synthetic"  # nothing is read: validate must not ask for data paths
    _validated(config)
    mesh, state, compiled, init_s, compile_s = build_step(config, args.warmup + 2 * args.steps)
    rng = np.random.default_rng(config.seed)
    local = config.batch_size // jax.process_count()
    size = config.data.image_size
    batch = sharding.host_to_global({
        "image": rng.integers(0, 256, (local, size, size, 3), dtype=np.uint8),
        "label": rng.integers(0, config.model.num_classes, (local,), dtype=np.int32)}, mesh)
    timings, _ = time_steps(compiled, state, lambda: batch, steps=args.steps, warmup=args.warmup)
    return _report("step", config, timings, steps=args.steps, warmup=args.warmup, init_s=init_s,
                   compile_s=compile_s, extra={"data": "one fixed on-device uint8 batch"})


def _fed_loop(bench: str, args, config, source, extra: dict) -> dict:
    """`loop` and `e2e`: the train loop's own batches (pipeline.train_batches -> host_to_global) into the step."""
    import jax

    from alexnet_jax import sharding
    from alexnet_jax.data import pipeline

    mesh, state, compiled, init_s, compile_s = build_step(config, args.warmup + 2 * args.steps)
    start = time.perf_counter()
    batches = [pipeline.train_batches(
        source, workers=config.data.workers, global_batch_size=config.batch_size, seed=config.seed,
        image_size=config.data.image_size, resize_size=config.data.resize_size, augment=config.data.augment,
        process_index=jax.process_index(), process_count=jax.process_count())]
    first = [next(batches[0])]  # worker start-up and the first prefetch: reported apart, not in the timed steps
    first_batch_s = time.perf_counter() - start

    def next_batch():
        return sharding.host_to_global(first.pop() if first else next(batches[0]), mesh)

    try:
        timings, _ = time_steps(compiled, state, next_batch, steps=args.steps, warmup=args.warmup)
    finally:
        # The grain iterator sits in reference cycles: collect it now, while its workers can still take back their
        # shared-memory buffers, not at interpreter exit (which leaks them, and resource_tracker warns).
        batches.clear()
        first.clear()
        gc.collect()
    return _report(bench, config, timings, steps=args.steps, warmup=args.warmup, init_s=init_s,
                   compile_s=compile_s, extra={"workers": int(config.data.workers), "first_batch_s":
                                               round(first_batch_s, 3), "resize_size": int(config.data.resize_size),
                                               "augment": config.data.augment, **extra})


def run_loop(args, config) -> dict:
    from alexnet_jax.data import sources

    config.data.source = "synthetic"
    if args.workers is not None:
        config.data.workers = args.workers
    _validated(config)
    source = sources.create_source(config.data, "train", config.model.num_classes, config.seed)
    return _fed_loop("loop", args, config, source,
                     {"data": f"synthetic source ({len(source)} random {config.data.image_size} px images)"})


def run_e2e(args, config) -> dict:
    from alexnet_jax.data import sources

    if args.workers is not None:
        config.data.workers = args.workers
    if args.data and (problem := storage.problem(args.data, "dir")):
        raise UsageError(f"--data: {problem}")
    with tempfile.TemporaryDirectory(prefix="alexnet_bench_") as tmp:
        config.data.source = "imagefolder"
        config.data.train_path = config.data.eval_path = args.data or tmp
        _validated(config)  # before spending time on the files
        if not args.data:
            print(f"writing {args.images} JPEGs to {tmp} ...", file=sys.stderr)
            write_jpegs(tmp, args.images, seed=config.seed, classes=min(4, config.model.num_classes))
        try:
            source = sources.create_source(config.data, "train", config.model.num_classes, config.seed)
        except ValueError as error:
            raise UsageError(f"data: {error}") from None
        sample = [source.name(i) for i in range(0, len(source), max(1, len(source) // 64))]
        sizes = [storage.size(path) for path in sample]
        return _fed_loop("e2e", args, config, source, {
            "data": args.data or "synthetic JPEGs (ImageNet-like sizes)", "images": len(source),
            "mean_file_kb": round(float(np.mean(sizes)) / 1024, 1)})


STEP_FLAGS_HELP = """config: --config=FILE (default: configs/imagenet.py) and any --config.KEY=VALUE override, parsed as
  by `python -m alexnet_jax.main`, e.g. --config.batch_size=32 --config.model.width=0.25
  --config.data.image_size=128 --config.model.dtype=bfloat16 --config.mesh.model=2

With --json the last stdout line is one JSON object: bench, img_per_s, ms_per_step (both from the run synced once
at the end), ms_per_step_synced_median, img_per_s_synced_median, host_ms_per_step, compile_s, init_s, device
("platform: device_kind x count"), device_kind, platform, device_count, variant, width, dtype, image_size,
global_batch, jax, steps, warmup, final_loss, and the machine's cpu_count and load_average_1m."""

SUBCOMMANDS = {
    "step": ("the compiled train step alone, on one fixed on-device batch",
             "Times the train step alone: one synthetic uint8 batch on the device, the step train.py compiles\n"
             "(ahead of time: compile_s), --warmup steps, then --steps steps synced once (img_per_s, ms_per_step)\n"
             "and --steps steps synced each (ms_per_step_synced_median)."),
    "loop": ("the train loop fed from the host: synthetic source -> grain pipeline -> host_to_global -> step",
             "Times train.train_and_evaluate's loop without eval or checkpoints: the synthetic source (no files)\n"
             "through pipeline.train_batches and sharding.host_to_global into the train step, so the host's\n"
             "share shows (host_ms_per_step; compare img_per_s with `bench step`)."),
    "pipeline": ("the host input pipeline against a plain Pillow loop (no device)",
                 "Times the input pipeline alone against the textbook Pillow loop on the same JPEGs and cores."),
    "e2e": ("`loop` from JPEG files: ImageFolder source, decode in grain workers, step",
            "Times the loop end to end from JPEG files: --images JPEGs of ImageNet-like sizes (~500x375) written\n"
            "to a temp ImageFolder (or --data DIR) through the imagefolder source, decode and crop in --workers\n"
            "grain processes, host_to_global and the train step."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m alexnet_jax.bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmarks of the train step (step), the fed train loop (loop, e2e) and the input pipeline "
                    "(pipeline).",
        epilog="examples:\n"
               "  python -m alexnet_jax.bench step --json --config.batch_size=128\n"
               "  python -m alexnet_jax.bench loop --workers=8\n"
               "  python -m alexnet_jax.bench e2e --workers=8 --images=1024\n"
               "  python -m alexnet_jax.bench pipeline --json\n"
               "`python -m alexnet_jax.bench SUBCOMMAND --help` for each one's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{step,loop,pipeline,e2e}")
    for name, (summary, description) in SUBCOMMANDS.items():
        fed = name in ("loop", "e2e")
        p = sub.add_parser(name, help=summary, description=description,
                           epilog=None if name == "pipeline" else STEP_FLAGS_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
        if name == "pipeline":
            p.add_argument("--config", default=None, help="ignored: pipeline takes its sizes from its own flags")
            p.add_argument("--images", type=int, default=512, help="JPEGs to write and time over")
            p.add_argument("--workers", type=int, default=0, help="grain worker processes (0: one per CPU)")
            p.add_argument("--batch_size", type=int, default=64)
            p.add_argument("--image_size", type=int, default=224)
            p.add_argument("--resize_size", type=int, default=256)
            p.add_argument("--augment", choices=("alexnet", "inception"), default="alexnet")
            p.add_argument("--data", default="", help="time an existing ImageFolder instead of written JPEGs")
            continue
        p.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE",
                       help="ml_collections config file (default: configs/imagenet.py); --config.KEY=VALUE "
                            "overrides any key")
        p.add_argument("--steps", type=int, default=20, help="timed steps, in each of the two timed runs "
                                                             "(default: 20)")
        p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling (default: 2)")
        if fed:
            p.add_argument("--workers", type=int, default=None,
                           help="grain worker processes, overriding data.workers (0: decode in this process); "
                                "default: the config's data.workers")
        if name == "e2e":
            p.add_argument("--images", type=int, default=512, help="JPEGs to write (default: 512)")
            p.add_argument("--data", default="", help="read an existing ImageFolder instead of written JPEGs")
    return parser


def _config_overrides(extras: list[str]) -> tuple[list[str], list[str]]:
    """Splits argparse's leftovers into --config.KEY[=VALUE] overrides (with a separate VALUE) and the rest."""
    overrides, rest = [], []
    for arg in extras:
        if arg.startswith("--config."):
            overrides.append(arg)
        elif overrides and "=" not in overrides[-1] and overrides[-1].startswith("--") and not arg.startswith("-"):
            overrides.append(arg)  # the VALUE of `--config.KEY VALUE`
        else:
            rest.append(arg)
    return overrides, rest


def parse_args(argv=None):
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    overrides, rest = _config_overrides(extras)
    if rest or (overrides and args.command == "pipeline"):
        parser.error(f"unrecognized arguments: {' '.join(rest or overrides)}")
    args.overrides = overrides
    return args


RUNNERS = {"step": run_step, "loop": run_loop, "e2e": run_e2e}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "pipeline":
        if args.data and (problem := storage.problem(args.data, "dir")):
            print(f"error: --data: {problem}", file=sys.stderr)
            return 2
        result = run_pipeline(args)
    else:
        try:
            _check_steps(args)
            config = load_config(args.config, args.overrides)
            result = RUNNERS[args.command](args, config)
        except UsageError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        _print_report(result)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
