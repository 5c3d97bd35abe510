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

step, loop, e2e: not implemented yet (exit code 2).
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

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
        with Image.open(path) as image:
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
        sizes = [os.path.getsize(p) for p in paths]
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
        "benchmark": "pipeline",
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m alexnet_jax.bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("step", "loop", "pipeline", "e2e"):
        p = sub.add_parser(name)
        p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
        p.add_argument("--config", default=None, help="ml_collections config file")
        if name == "pipeline":
            p.add_argument("--images", type=int, default=512, help="JPEGs to write and time over")
            p.add_argument("--workers", type=int, default=0, help="grain worker processes (0: one per CPU)")
            p.add_argument("--batch_size", type=int, default=64)
            p.add_argument("--image_size", type=int, default=224)
            p.add_argument("--resize_size", type=int, default=256)
            p.add_argument("--augment", choices=("alexnet", "inception"), default="alexnet")
            p.add_argument("--data", default="", help="time an existing ImageFolder instead of written JPEGs")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command != "pipeline":
        print(f"error: bench {args.command} is not implemented yet (only: pipeline)", file=sys.stderr)
        return 2
    if args.data and not os.path.isdir(args.data):
        print(f"error: --data: no such directory: {args.data}", file=sys.stderr)
        return 2
    result = run_pipeline(args)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
