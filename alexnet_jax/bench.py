"""Benchmarks: python -m alexnet_jax.bench {step,loop,pipeline,e2e,layers} [--config=FILE]
[--config.KEY=VALUE ...] [--json] [--torch]

Flags are parsed as by every other command (absl, ml_collections config files with --config.KEY=VALUE
overrides; default config: configs/imagenet.py). With --json the last stdout line is one JSON object. Every
number is reported with the device it was measured on (platform, device kind, count) and the machine's load
average, as timings on a busy machine are not comparable.

step: the compiled train step alone, the ceiling of what the device can do with this model. One fixed synthetic
  uint8 batch is put on the device once; the step training runs (train.compile_steps: on-device
  flip/lighting/normalise, forward, backward, optax update, donated state) is compiled ahead of time (compile_s),
  run --warmup times, then --steps times with a single sync at the end (img_per_s, ms_per_step: the pipelined
  rate training sees), then --steps times synced after each (ms_per_step_synced_median: one step's latency).
  mfu: the compiled step's FLOPs (XLA's cost analysis) per second over the device's peak (see PEAK_TFLOPS;
  "unknown" on devices not in that table, CPUs included). --torch then times the PyTorch reference step
  (alexnet_jax.torch_reference: same model, optimizer, batch and compute dtype, eager) in the same process on the
  same device, and reports its img/s as torch_img_per_s and our img_per_s over it as jax_to_torch.

loop: `step`, then the train loop fed from the host, in the same process on the same state, so their ratio
  compares one moment: the synthetic source (random pixels: no files, no decode) through
  pipeline.train_batches (crop, batching, --workers grain processes) and sharding.host_to_global into the same
  step. As in training, metrics are fetched one log step late (config log_every_steps), so the loop never waits
  for the device. Reports step_img_per_s, loop_img_per_s (= img_per_s) and loop_to_step.

e2e: `loop` from JPEG files: --images JPEGs of ImageNet-like sizes (~500x375) in a temp ImageFolder (or an
  existing one, --data), read by the imagefolder source and decoded in the grain workers.

pipeline: the host input pipeline against a plain Pillow loop on the same JPEG files and the same cores (no
  device): pil_baseline (one process: open, RGB, short side to data.resize_size, random data.image_size crop);
  pipeline_1worker (our train pipeline with one grain worker: the per-core comparison); pipeline (--workers
  processes, default one per CPU) next to the Pillow loop in as many processes (pil_baseline_parallel); and
  raw_records_1worker: the same files converted to raw-pixel ArrayRecords (`data.convert --format=raw`, short
  side data.resize_size) read by the same pipeline with one worker -- no JPEG decode. cpu_ms_per_img counts the
  CPU time of every process involved (Linux /proc), a like-for-like number even on a busy machine.

layers: each convolution's forward pass, input gradient and weight gradient, and each max pool's forward pass and
  gradient, timed on their own at the model's shapes (see alexnet_jax/bench_layers.py); with --torch, PyTorch's
  times for the same operations beside them and the two results' largest relative difference.

The config is read as training reads it: model.*, data.image_size/resize_size/augment/random_flip/lighting_std/
workers, batch_size, optim.*, mesh.model apply; data.source is replaced by what the benchmark reads. --workers
overrides data.workers (0 decodes in this process).

examples:
  python -m alexnet_jax.bench step --json --config.batch_size=128 --config.model.dtype=bfloat16
  python -m alexnet_jax.bench step --torch --config.batch_size=32 --config.model.dtype=float32
  python -m alexnet_jax.bench loop --workers=8
  python -m alexnet_jax.bench e2e --workers=8 --images=1024
  python -m alexnet_jax.bench pipeline --json
  python -m alexnet_jax.bench layers --torch --config.batch_size=32 --config.model.dtype=float32
"""

import gc
import io
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
from absl import flags
from ml_collections import config_flags

from alexnet_jax import cli, storage

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "imagenet.py")

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Called only when run as a command: importing this module (its helpers) defines no flags."""
    config_flags.DEFINE_config_file("config", None, "Config file (default: configs/imagenet.py); "
                                    "--config.KEY=VALUE overrides any key.", lock_config=True)
    flags.DEFINE_bool("json", False, "Print one JSON object as the last stdout line.")
    flags.DEFINE_integer("steps", 20, "Timed steps in each timed run (step, loop, e2e).", lower_bound=1)
    flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling (step, loop, e2e).", lower_bound=0)
    flags.DEFINE_integer("workers", None, "Grain worker processes (loop, e2e: default data.workers, 0 decodes in "
                         "this process; pipeline: default one per CPU).", lower_bound=0)
    flags.DEFINE_integer("images", 512, "JPEGs to write and read (e2e, pipeline).", lower_bound=1)
    flags.DEFINE_string("data", "", "Read an existing ImageFolder instead of written JPEGs (e2e, pipeline).")
    flags.DEFINE_bool("torch", False, "step, layers: also time the same work in PyTorch in this process (needs "
                      "torch).")


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
                        augment: str = "alexnet", worker_threads: int = 0, worker_buffer: int = 1) -> dict:
    """img/s and CPU ms/img of the train pipeline over `images` images, after its first batch (worker start-up,
    imports and the first prefetch are not counted)."""
    import multiprocessing

    from alexnet_jax.data import pipeline

    batches = pipeline.train_batches(source, workers=workers, worker_threads=worker_threads,
                                     worker_buffer=worker_buffer, global_batch_size=batch_size, seed=0,
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


class UsageError(Exception):
    """A bad flag or config value: main prints it as one `error:` line and exits 2."""


def _data_dir() -> str:
    if FLAGS.data and (problem := storage.problem(FLAGS.data, "dir")):
        raise UsageError(f"--data: {problem}")
    return FLAGS.data


def raw_records(paths: list[str], directory: str, resize_size: int):
    """The files converted by `data.convert --format=raw --resize=resize_size` into one shard under
    `directory`, opened as the arrayrecord source reads them. The files are linked into an ImageFolder first, so
    the converter reads exactly the timed files."""
    from alexnet_jax.data import arrayrecord, convert

    src, dst = os.path.join(directory, "raw_src"), os.path.join(directory, "raw_records")
    for i, path in enumerate(paths):
        folder = os.path.join(src, os.path.basename(os.path.dirname(path)))
        os.makedirs(folder, exist_ok=True)
        os.symlink(os.path.abspath(path), os.path.join(folder, f"{i:06d}_{os.path.basename(path)}"))
    convert.convert(convert.parse_args([f"--src={src}", f"--dst={dst}", "--shards=1", "--format=raw",
                                        f"--resize={resize_size}", "--workers=1"]))
    return arrayrecord.ArrayRecordSource(dst)


def run_pipeline(config) -> dict:
    from alexnet_jax.data import imagefolder, pipeline

    data = _data_dir()
    workers = FLAGS.workers or os.cpu_count() or 1
    image_size, resize_size = int(config.data.image_size), int(config.data.resize_size)
    batch_size, augment = int(config.batch_size), config.data.augment
    feed = pipeline.feed_options(config.data)  # its threads and buffer; the worker counts are the bench's own
    with tempfile.TemporaryDirectory(prefix="alexnet_bench_") as tmp:
        if data:
            source = imagefolder.ImageFolderSource(data)
            paths = [source.name(i) for i in np.random.default_rng(0).permutation(len(source))[:FLAGS.images]]
        else:
            print(f"writing {FLAGS.images} JPEGs to {tmp} ...", file=sys.stderr)
            paths = write_jpegs(os.path.join(tmp, "jpeg"), FLAGS.images)
            source = imagefolder.ImageFolderSource(os.path.join(tmp, "jpeg"))
        sizes = [os.path.getsize(p) for p in paths]
        print(f"pil baseline over {len(paths)} files ...", file=sys.stderr)
        baseline = pil_baseline(paths, image_size, resize_size)
        kwargs = dict(batch_size=batch_size, images=max(len(paths), 2 * batch_size), image_size=image_size,
                      resize_size=resize_size, augment=augment, worker_threads=feed["worker_threads"],
                      worker_buffer=feed["worker_buffer"])
        print(f"pil baseline in {workers} processes ...", file=sys.stderr)
        baseline_parallel = pil_baseline_parallel(paths, image_size, resize_size, workers)
        print("pipeline, 1 worker ...", file=sys.stderr)
        one = pipeline_throughput(source, workers=1, **kwargs)
        print(f"pipeline, {workers} workers ...", file=sys.stderr)
        many = pipeline_throughput(source, workers=workers, **kwargs)
        print("converting the files to raw-pixel records ...", file=sys.stderr)
        records = raw_records(paths, tmp, resize_size)
        raw_kb = records.manifest["shards"][0]["bytes"] / len(records) / 1024
        print("raw records, 1 worker ...", file=sys.stderr)
        raw = pipeline_throughput(records, workers=1, **kwargs)
    result = {
        "bench": "pipeline",
        "pipeline_img_per_s": round(many["img_per_s"], 1),
        "pil_baseline_img_per_s": round(baseline["img_per_s"], 1),
        "pipeline_1worker_img_per_s": round(one["img_per_s"], 1),
        "pil_baseline_parallel_img_per_s": round(baseline_parallel["img_per_s"], 1),
        "raw_records_1worker_img_per_s": round(raw["img_per_s"], 1),
        "pipeline_cpu_ms_per_img": round(many["cpu_ms_per_img"], 3),
        "pipeline_1worker_cpu_ms_per_img": round(one["cpu_ms_per_img"], 3),
        "pil_baseline_cpu_ms_per_img": round(baseline["cpu_ms_per_img"], 3),
        "raw_records_1worker_cpu_ms_per_img": round(raw["cpu_ms_per_img"], 3),
        # > 1: the pipeline does an image with less CPU than the plain loop (the "per core" comparison)
        "per_core_speedup": round(baseline["cpu_ms_per_img"] / one["cpu_ms_per_img"], 3),
        "raw_records_speedup": round(raw["img_per_s"] / baseline["img_per_s"], 3),
        "workers": workers,
        "worker_threads": feed["worker_threads"],
        "worker_buffer": feed["worker_buffer"],
        "batch_size": batch_size,
        "images": len(paths),
        "mean_file_kb": round(float(np.mean(sizes)) / 1024, 1),
        "raw_record_kb": round(raw_kb, 1),
        "data": data or "synthetic JPEGs (ImageNet-like sizes)",
        "augment": augment,
        "image_size": image_size,
        "resize_size": resize_size,
        **machine_info(),
    }
    device = f"[{result['device']}]"
    print(f"bench pipeline, load average {result.get('load_average_1m', '?')} on {result['cpu_count']} CPUs  "
          f"{device}")
    print(f"pil baseline   {result['pil_baseline_img_per_s']:8.1f} img/s  "
          f"{result['pil_baseline_cpu_ms_per_img']:.2f} CPU ms/img (1 process)")
    print(f"pil baseline x{workers:<2d}{result['pil_baseline_parallel_img_per_s']:7.1f} img/s  "
          f"{baseline_parallel['cpu_ms_per_img']:.2f} CPU ms/img ({workers} processes)")
    print(f"pipeline  x1   {result['pipeline_1worker_img_per_s']:8.1f} img/s  "
          f"{result['pipeline_1worker_cpu_ms_per_img']:.2f} CPU ms/img (1 worker)")
    print(f"pipeline  x{workers:<3d}{result['pipeline_img_per_s']:8.1f} img/s  "
          f"{result['pipeline_cpu_ms_per_img']:.2f} CPU ms/img ({workers} workers, {os.cpu_count()} CPUs; each "
          f"worker: {result['worker_threads']} decode threads, {result['worker_buffer']} batches buffered)")
    print(f"raw records x1 {result['raw_records_1worker_img_per_s']:8.1f} img/s  "
          f"{result['raw_records_1worker_cpu_ms_per_img']:.2f} CPU ms/img (1 worker, "
          f"{result['raw_record_kb']:.0f} KB/image against {result['mean_file_kb']:.0f} KB/JPEG)")
    return result


# --- step, loop, e2e: the train step, alone and fed ----------------------------------------------------------------

# Dense (no sparsity) bfloat16 peak of one chip, TFLOP/s, from the vendors' spec sheets: NVIDIA H100/H200
# datasheets (SXM 989, PCIe 756), NVIDIA A100 datasheet (312), Google Cloud TPU system architecture pages
# (v4 275, v5e 197, v5p 459, v6e 918). First matching substring of jax's device_kind wins, so the more specific
# names come first. MFU is always against this bf16 peak: an fp32 step reads as the fraction of what the chip
# could do in bf16.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("A100", 312.0),
    ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v5", 459.0),
    ("TPU v6 lite", 918.0), ("TPU v6e", 918.0),
)


def peak_tflops(device_kind: str) -> float | None:
    for name, tflops in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return tflops
    return None


def step_flops(compiled) -> float | None:
    """FLOPs of one step of the compiled program on one device (XLA's cost analysis of the partitioned program);
    None where the backend gives none."""
    try:
        analysis = compiled.cost_analysis()
    except NotImplementedError:
        return None
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0] if analysis else None
    flops = float((analysis or {}).get("flops", 0.0))
    return flops if flops > 0 else None


def mfu(flops: float | None, seconds_per_step: float, device_kind: str) -> float | str:
    """Model FLOP utilisation of one device: its share of the step's FLOPs per second over its peak."""
    peak = peak_tflops(device_kind)
    if flops is None or peak is None:
        return "unknown"
    return round(flops / seconds_per_step / (peak * 1e12), 4)


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


def build_step(config, total_steps: int):
    """(mesh, fresh train state, AOT-compiled train step, init seconds, compile seconds): the state and the
    step train.train_and_evaluate builds, compiled for this config's global batch."""
    import jax
    import jax.numpy as jnp

    from alexnet_jax import optim, sharding, train

    mesh = sharding.mesh_for(config)
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


def time_steps(step, state, next_batch, *, steps: int, warmup: int, log_every: int) -> tuple[dict, object]:
    """Runs `warmup` steps, then `steps` steps synced once at the end, then `steps` steps synced each.

    `next_batch()` gives the step's global batch; the time spent in it is counted apart (host_s). Every
    `log_every` steps the pipelined run fetches the metrics of the previous log step, as training does: those
    finished long ago, so fetching them never waits for the device. Returns (timings, final state)."""
    import jax

    step_metrics = None
    for _ in range(warmup):
        state, step_metrics = step(state, next_batch())
    jax.block_until_ready((state, step_metrics))

    host_s, logged = 0.0, None
    start = time.perf_counter()
    for i in range(1, steps + 1):
        fetch = time.perf_counter()
        batch = next_batch()
        host_s += time.perf_counter() - fetch
        state, step_metrics = step(state, batch)
        if i % log_every == 0:
            if logged is not None:
                jax.device_get(logged)
            logged = step_metrics
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


def _rates(config, timings: dict, steps: int, flops: float | None, device_kind: str) -> dict:
    batch = int(config.batch_size)
    median_s = float(np.median(timings["synced_s"]))
    return {
        "img_per_s": round(batch * steps / timings["pipelined_s"], 2),
        "ms_per_step": round(1000 * timings["pipelined_s"] / steps, 3),
        "ms_per_step_synced_median": round(1000 * median_s, 3),
        "img_per_s_synced_median": round(batch / median_s, 2),
        "host_ms_per_step": round(1000 * timings["host_s"] / steps, 3),
        "mfu": mfu(flops, timings["pipelined_s"] / steps, device_kind),
        "final_loss": timings["final_loss"],
        "skipped_steps": timings["skipped_steps"],
    }


def _host_info() -> dict:
    """machine_info without its device (device_info has it) and with its OS "platform" renamed, as "platform"
    here is the device's (cpu, gpu, tpu)."""
    info = machine_info()
    info.pop("device", None)
    info["host_platform"] = info.pop("platform")
    return info


def _print_report(result: dict) -> None:
    device = f"[{result['device']}]"
    print(f"bench {result['bench']} on {result['device']} (jax {result['jax']}): {result['variant']} width "
          f"{result['width']:g} {result['dtype']}, {result['image_size']} px, global batch {result['global_batch']}"
          f", load average {result.get('load_average_1m', '?')} on {result['cpu_count']} CPUs")
    print(f"  compile {result['compile_s']:.2f} s, state init {result['init_s']:.2f} s, "
          f"{result['step_gflops'] or '?'} GFLOP/step/device, peak {result['peak_tflops']} TFLOP/s  {device}")
    runs = [("step", result.get("step", result))]
    if result["bench"] != "step":
        runs.append((result["bench"], result))
    for name, run in runs:
        mfu_text = f"{100 * run['mfu']:.1f}%" if isinstance(run["mfu"], float) else run["mfu"]
        print(f"  {name:5s} {result['steps']} steps, one sync at the end: {run['img_per_s']:10.1f} img/s "
              f"{run['ms_per_step']:9.2f} ms/step  MFU {mfu_text}  {device}")
        print(f"  {name:5s} {result['steps']} steps, synced each, median: {run['img_per_s_synced_median']:8.1f} "
              f"img/s {run['ms_per_step_synced_median']:9.2f} ms/step  {device}")
    if "jax_to_torch" in result:
        print(f"  torch {result['torch']} eager, same step: {result['torch_img_per_s']:10.1f} img/s "
              f"{result['torch_ms_per_step']:9.2f} ms/step; ours/torch = {result['jax_to_torch']:.3f}  "
              f"[{result['torch_device']}]")
    if result["bench"] != "step":
        print(f"  {result['bench']}/step = {result['loop_to_step']:.3f}; host (batch fetch + transfer): "
              f"{result['host_ms_per_step']:.2f} ms/step, {result['workers']} worker(s), first batch after "
              f"{result['first_batch_s']:.2f} s  {device}")


def _validated(config):
    import jax

    from alexnet_jax import config as config_lib

    try:
        config_lib.validate(config, jax.device_count(), jax.process_count())
    except config_lib.ConfigError as error:
        raise UsageError(f"config: {error}") from None
    return config


def _fixed_batch(config, mesh):
    import jax

    from alexnet_jax import sharding

    rng = np.random.default_rng(config.seed)
    local = config.batch_size // jax.process_count()
    size = config.data.image_size
    return sharding.host_to_global({
        "image": rng.integers(0, 256, (local, size, size, 3), dtype=np.uint8),
        "label": rng.integers(0, config.model.num_classes, (local,), dtype=np.int32)}, mesh)


def _bench_step(config, total_steps: int):
    """Builds and times the bare step; returns (report without the fed run, mesh, state, compiled, flops)."""
    steps, warmup = FLAGS.steps, FLAGS.warmup
    mesh, state, compiled, init_s, compile_s = build_step(config, total_steps)
    flops = step_flops(compiled)
    device = device_info()
    batch = _fixed_batch(config, mesh)
    log_every = max(1, int(config.log_every_steps))
    timings, state = time_steps(compiled, state, lambda: batch, steps=steps, warmup=warmup, log_every=log_every)
    report = {"compile_s": round(compile_s, 3), "init_s": round(init_s, 3), "steps": steps, "warmup": warmup,
              "log_every_steps": log_every, "step_gflops": round(flops / 1e9, 3) if flops else None,
              **_rates(config, timings, steps, flops, device["device_kind"]), **device, **model_info(config)}
    return report, mesh, state, compiled, flops


def run_step(config) -> dict:
    config.data.source = "synthetic"  # nothing is read: validate must not ask for data paths
    _validated(config)
    if FLAGS.torch:
        torch_reference = _torch_reference(config)
    report, *_ = _bench_step(config, FLAGS.warmup + 2 * FLAGS.steps)
    result = {"bench": "step", **report, "data": "one fixed on-device uint8 batch", **_host_info()}
    if FLAGS.torch:
        torch_run = torch_reference.bench(
            result["variant"], result["global_batch"], result["image_size"], result["dtype"], width=result["width"],
            num_classes=result["num_classes"], steps=FLAGS.steps, warmup=FLAGS.warmup)
        result.update(torch_img_per_s=torch_run["img_per_s"], torch_ms_per_step=torch_run["ms_per_step"],
                      torch_device=torch_run["device"], torch=torch_run["torch"],
                      jax_to_torch=round(result["img_per_s"] / torch_run["img_per_s"], 3))
    return result


def _torch_reference(config):
    """The torch_reference module, or a UsageError saying why --torch cannot run with this config."""
    import jax

    try:
        from alexnet_jax import torch_reference
    except ImportError:
        raise UsageError("--torch needs PyTorch: pip install torch") from None
    if config.model.variant not in ("owt", "bn"):
        raise UsageError(f"--torch: the PyTorch reference has owt and bn, not model.variant={config.model.variant}")
    if int(config.mesh.model) != 1 or jax.device_count() != 1:
        raise UsageError("--torch compares one device: run it with a single device and mesh.model=1")
    return torch_reference


def _fed_loop(bench: str, config, source, extra: dict) -> dict:
    """`loop` and `e2e`: the bare step, then the train loop's own batches (pipeline.train_batches ->
    host_to_global) into the same compiled step and state."""
    import jax

    from alexnet_jax import sharding
    from alexnet_jax.data import pipeline

    steps, warmup = FLAGS.steps, FLAGS.warmup
    step_report, mesh, state, compiled, flops = _bench_step(config, 2 * (warmup + 2 * steps))
    feed = pipeline.feed_options(config.data)
    start = time.perf_counter()
    batches = [pipeline.train_batches(
        source, **feed, global_batch_size=config.batch_size, seed=config.seed,
        image_size=config.data.image_size, resize_size=config.data.resize_size, augment=config.data.augment,
        process_index=jax.process_index(), process_count=jax.process_count())]
    first = [next(batches[0])]  # worker start-up and the first prefetch: reported apart, not in the timed steps
    first_batch_s = time.perf_counter() - start

    def next_batch():
        return sharding.host_to_global(first.pop() if first else next(batches[0]), mesh)

    try:
        timings, _ = time_steps(compiled, state, next_batch, steps=steps, warmup=warmup,
                                log_every=step_report["log_every_steps"])
    finally:
        # The grain iterator sits in reference cycles: collect it now, while its workers can still take back their
        # shared-memory buffers, not at interpreter exit (which leaks them, and resource_tracker warns).
        batches.clear()
        first.clear()
        gc.collect()
    fed = _rates(config, timings, steps, flops, step_report["device_kind"])
    step_only = {k: step_report[k] for k in fed}
    return {"bench": bench, **step_report, **fed,
            "step_img_per_s": step_only["img_per_s"], "loop_img_per_s": fed["img_per_s"],
            "loop_to_step": round(fed["img_per_s"] / step_only["img_per_s"], 3),
            "step_mfu": step_only["mfu"], "step": step_only,
            **feed, "first_batch_s": round(first_batch_s, 3),
            "resize_size": int(config.data.resize_size), "augment": config.data.augment, **extra, **_host_info()}


def run_loop(config) -> dict:
    from alexnet_jax.data import sources

    config.data.source = "synthetic"
    if FLAGS.workers is not None:
        config.data.workers = FLAGS.workers
    _validated(config)
    source = sources.create_source(config.data, "train", config.model.num_classes, config.seed)
    return _fed_loop("loop", config, source,
                     {"data": f"synthetic source ({len(source)} random {config.data.image_size} px images)"})


def run_e2e(config) -> dict:
    from alexnet_jax.data import sources

    if FLAGS.workers is not None:
        config.data.workers = FLAGS.workers
    data = _data_dir()
    with tempfile.TemporaryDirectory(prefix="alexnet_bench_") as tmp:
        config.data.source = "imagefolder"
        config.data.train_path = config.data.eval_path = data or tmp
        _validated(config)  # before spending time on the files
        if not data:
            print(f"writing {FLAGS.images} JPEGs to {tmp} ...", file=sys.stderr)
            write_jpegs(tmp, FLAGS.images, seed=config.seed, classes=min(4, config.model.num_classes))
        try:
            source = sources.create_source(config.data, "train", config.model.num_classes, config.seed)
        except ValueError as error:
            raise UsageError(f"data: {error}") from None
        sample = [source.name(i) for i in range(0, len(source), max(1, len(source) // 64))]
        sizes = [storage.size(path) for path in sample]
        return _fed_loop("e2e", config, source, {
            "data": data or "synthetic JPEGs (ImageNet-like sizes)", "images": len(source),
            "mean_file_kb": round(float(np.mean(sizes)) / 1024, 1)})


def run_layers(config) -> dict:
    from alexnet_jax import bench_layers

    config.data.source = "synthetic"
    _validated(config)
    if FLAGS.torch:
        _torch_reference(config)  # the same checks: PyTorch installed, one device
    report = bench_layers.run(config, steps=FLAGS.steps, warmup=FLAGS.warmup, with_torch=FLAGS.torch)
    info = model_info(config)
    if FLAGS.torch:
        import torch

        info["torch"] = torch.__version__
    return {"bench": "layers", **report, **info, **device_info(), "steps": FLAGS.steps, "warmup": FLAGS.warmup,
            **_host_info()}


RUNNERS = {"step": run_step, "loop": run_loop, "pipeline": run_pipeline, "e2e": run_e2e, "layers": run_layers}


def main(argv) -> int:
    if len(argv) != 2 or argv[1] not in RUNNERS:
        got = " ".join(argv[1:]) or "nothing"
        print(f"error: expected one benchmark, {' | '.join(RUNNERS)}, got {got} (--help describes them)",
              file=sys.stderr)
        return cli.EXIT_BAD_USAGE
    try:
        result = RUNNERS[argv[1]](FLAGS.config)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return cli.EXIT_BAD_USAGE
    if argv[1] == "layers":
        from alexnet_jax import bench_layers

        bench_layers.print_report(result)
    elif argv[1] != "pipeline":
        _print_report(result)
    if FLAGS.json:
        print(json.dumps(result))
    return 0


def with_default_config(argv: list[str]) -> list[str]:
    """argv with --config=configs/imagenet.py added when it names no config. Not a flag default: config_flags
    loads a default file as the flag is defined, where a bad --config.KEY override is a traceback instead of
    cli's one error line."""
    if any(arg == "--config" or arg.startswith("--config=") for arg in argv[1:]):
        return argv
    return [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]


if __name__ == "__main__":
    define_flags()
    sys.argv = with_default_config(sys.argv)
    cli.run(main)
