"""`bench pipeline`: the host input pipeline (no device) against a plain Pillow loop on the same JPEG files and
cores, and the same files as raw-pixel records and pixel shards (see `python -m alexnet_jax.bench --help`)."""

import io
import os
import sys
import tempfile
import time

import numpy as np
from absl import flags

from alexnet_jax import storage
from alexnet_jax.bench import common

FLAGS = flags.FLAGS
IMAGENET_TRAIN_EXAMPLES = 1_281_167  # ILSVRC-2012's train split


class RepeatedRecords:
    """A converted source's records repeated into one long epoch (record i is record i mod n), for timing the
    reads as they run on an ImageNet-sized split. grain's shuffle pays a setup at every epoch (~20 ms here), which
    is ~40 us an example on the bench's 512 records and a rounding error on 1.28 M: the short set measured the
    shuffle, not the read. Everything else is the source's own, and what it lacks this lacks too (the pipeline
    picks its read by what the source offers)."""

    _READS = ("read_pixels", "read_pixels_into", "send_pixels_to")

    def __init__(self, source, length: int):
        self.source, self.length = source, length

    def __len__(self):
        return self.length

    def __getattr__(self, name):
        if name == "source" or name.startswith("__"):  # unpickling (grain's workers) looks these up first
            raise AttributeError(name)
        attribute = getattr(self.source, name)
        if name in self._READS:
            return lambda indices, *rest: attribute(np.asarray(indices, np.int64) % len(self.source), *rest)
        return attribute


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
        cpu, start = common.cpu_now(children), time.perf_counter()
        pool.map(_baseline_chunk, shares, chunksize=1)
        wall, cpu = time.perf_counter() - start, common.cpu_now(children) - cpu
    # Each share also decodes its first 8 files twice (pil_baseline's warm-up): count those too.
    done = len(paths) + sum(min(8, len(s[0])) for s in shares)
    return {"img_per_s": done / wall, "cpu_ms_per_img": 1000 * cpu / done}


def pipeline_throughput(source, *, workers: int, batch_size: int, images: int, image_size: int, resize_size: int,
                        augment: str = "alexnet", worker_threads: int = 0, worker_buffer: int = 1,
                        device_crops: bool = False) -> dict:
    """img/s and CPU ms/img of the train pipeline over `images` images, after its first batch (worker start-up,
    imports and the first prefetch are not counted). device_crops: the stored arrays shipped whole, as
    data.device_crops ships them (the crop is then the device's work, not timed here)."""
    import multiprocessing

    from alexnet_jax.data import pipeline

    batches = pipeline.train_batches(source, workers=workers, worker_threads=worker_threads,
                                     worker_buffer=worker_buffer, global_batch_size=batch_size, seed=0,
                                     image_size=image_size, resize_size=resize_size, augment=augment,
                                     device_crops=device_crops)
    next(batches)
    children = [p.pid for p in multiprocessing.active_children()]
    steps = max(1, images // batch_size)
    cpu, start = common.cpu_now(children), time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
    wall, cpu = time.perf_counter() - start, common.cpu_now(children) - cpu
    side = resize_size if device_crops else image_size
    assert batch["image"].shape == (batch_size, side, side, 3) and batch["image"].dtype == np.uint8
    del batches
    return {"img_per_s": steps * batch_size / wall, "cpu_ms_per_img": 1000 * cpu / (steps * batch_size),
}


def memcpy_gb_per_s(megabytes: int = 256, repeats: int = 5) -> float:
    """One core's copy bandwidth: the best of `repeats` numpy copies of a `megabytes` uint8 array (far larger
    than any cache) into another, in GB/s of bytes copied. The ceiling a reader of raw pixels is measured
    against: each record's pixels must be copied at least once into the batch."""
    src = np.ones(megabytes << 20, np.uint8)  # written, so its pages exist before the timing
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return src.nbytes / best / 1e9


def raw_records(paths: list[str], directory: str, resize_size: int, center_crop: int = 0, fmt: str = "raw"):
    """The files converted by `data.convert --format=fmt (raw or pixels) --resize=resize_size [--center_crop=N]`
    into one shard under `directory`, opened as the arrayrecord source reads them. The files are linked into an
    ImageFolder first, so the converter reads exactly the timed files."""
    from alexnet_jax.data import convert, sources

    src, dst = os.path.join(directory, "raw_src"), os.path.join(directory, f"{fmt}_records_{center_crop}")
    for i, path in enumerate(paths):
        folder = os.path.join(src, os.path.basename(os.path.dirname(path)))
        os.makedirs(folder, exist_ok=True)
        link = os.path.join(folder, f"{i:06d}_{os.path.basename(path)}")
        if not os.path.exists(link):
            os.symlink(os.path.abspath(path), link)
    crop = [f"--center_crop={center_crop}"] if center_crop else []
    convert.convert(convert.parse_args([f"--src={src}", f"--dst={dst}", "--shards=1", f"--format={fmt}",
                                        f"--resize={resize_size}", "--workers=1", *crop]))
    return sources.open_converted(dst)


def run_pipeline(config) -> dict:
    from alexnet_jax.data import imagefolder, pipeline

    data = common.data_dir()
    workers = FLAGS.workers or os.cpu_count() or 1
    image_size, resize_size = int(config.data.image_size), int(config.data.resize_size)
    batch_size, augment = int(config.batch_size), config.data.augment
    config.data.workers = 1  # the bench's own counts (1, `workers`) stand in for the config's: read its threads, buffer
    feed = pipeline.feed_options(config.data, purpose="the benchmark", images=FLAGS.images,
                                 global_batch_size=batch_size)
    with tempfile.TemporaryDirectory(prefix="alexnet_bench_") as tmp:
        if data:
            source = imagefolder.ImageFolderSource(data)
            paths = [source.name(i) for i in np.random.default_rng(0).permutation(len(source))[:FLAGS.images]]
        else:
            print(f"writing {FLAGS.images} JPEGs to {tmp} ...", file=sys.stderr)
            paths = common.write_jpegs(os.path.join(tmp, "jpeg"), FLAGS.images)
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
        converted = raw_records(paths, tmp, resize_size)
        raw_kb = converted.manifest["shards"][0]["bytes"] / len(converted) / 1024
        pixels = converted.read_pixels(range(len(converted)))["images"]
        records = RepeatedRecords(converted, IMAGENET_TRAIN_EXAMPLES)
        raw_bytes = float(np.mean([image.nbytes for image in pixels]))  # h x w x 3, what a read must copy
        del pixels
        print("raw records, 1 worker ...", file=sys.stderr)
        # Raw batches come fast: time more of them (the records repeat, from the page cache) than the JPEG runs.
        raw_kwargs = {**kwargs, "images": max(kwargs["images"], 32 * batch_size)}
        raw = pipeline_throughput(records, workers=1, **raw_kwargs)
        print(f"raw records, {workers} workers ...", file=sys.stderr)
        raw_many = pipeline_throughput(records, workers=workers, **raw_kwargs)
        print("stored pixels (--center_crop records, shipped whole for data.device_crops), 1 worker ...",
              file=sys.stderr)
        stored_records = RepeatedRecords(raw_records(paths, tmp, resize_size, center_crop=resize_size),
                                         IMAGENET_TRAIN_EXAMPLES)
        stored = pipeline_throughput(stored_records, workers=1, device_crops=True, **raw_kwargs)
        stored_bytes = resize_size * resize_size * 3
        print("converting the files to pixel shards ...", file=sys.stderr)
        shards = RepeatedRecords(raw_records(paths, tmp, resize_size, center_crop=resize_size, fmt="pixels"),
                                 IMAGENET_TRAIN_EXAMPLES)
        # Read at the copy's speed: time yet more batches, so the timing spans about a second, not a few ms.
        shard_kwargs = {**kwargs, "images": max(kwargs["images"], 256 * batch_size)}
        print("pixel shards (read straight into the batch, shipped whole for data.device_crops), 1 worker ...",
              file=sys.stderr)
        shard_one = pipeline_throughput(shards, workers=1, device_crops=True, **shard_kwargs)
        print(f"pixel shards, {workers} workers ...", file=sys.stderr)
        shard_many = pipeline_throughput(shards, workers=workers, device_crops=True, **shard_kwargs)
        # No worker processes (data.workers=0: grain's 2 reader threads here; preadv releases the GIL): no batch
        # copied into fresh shared memory, which is what a worker's batch costs at these speeds.
        print("pixel shards, no worker processes ...", file=sys.stderr)
        shard_here = pipeline_throughput(shards, workers=0, device_crops=True, **shard_kwargs)
    print("memcpy, one core ...", file=sys.stderr)
    memcpy = memcpy_gb_per_s()
    result = {
        "bench": "pipeline",
        "pipeline_img_per_s": round(many["img_per_s"], 1),
        "pil_baseline_img_per_s": round(baseline["img_per_s"], 1),
        "pipeline_1worker_img_per_s": round(one["img_per_s"], 1),
        "pil_baseline_parallel_img_per_s": round(baseline_parallel["img_per_s"], 1),
        # raw records and pixel shards are timed in an epoch of this many examples (the records repeated)
        "raw_records_epoch_examples": len(records),
        "raw_records_1worker_img_per_s": round(raw["img_per_s"], 1),
        "raw_records_img_per_s": round(raw_many["img_per_s"], 1),
        "memcpy_gb_per_s": round(memcpy, 2),
        "raw_record_bytes": round(raw_bytes),
        # the share of one core's copy bandwidth the raw pixels arrive at: 1 would be a single copy at memcpy speed
        "raw_records_1worker_memcpy_fraction": round(raw["img_per_s"] * raw_bytes / (memcpy * 1e9), 4),
        "raw_records_memcpy_fraction": round(raw_many["img_per_s"] * raw_bytes / (memcpy * 1e9), 4),
        "stored_pixels_1worker_img_per_s": round(stored["img_per_s"], 1),
        "stored_pixel_bytes": stored_bytes,
        "stored_pixels_1worker_memcpy_fraction": round(stored["img_per_s"] * stored_bytes / (memcpy * 1e9), 4),
        "stored_pixels_1worker_cpu_ms_per_img": round(stored["cpu_ms_per_img"], 3),
        # the same pixels as pixel shards (stored_pixel_bytes a record), read by os.preadv into the batch (sent by
        # os.sendfile into the shared batch in a worker)
        "pixel_shards_1worker_img_per_s": round(shard_one["img_per_s"], 1),
        "pixel_shards_img_per_s": round(shard_many["img_per_s"], 1),
        "pixel_shards_1worker_memcpy_fraction": round(shard_one["img_per_s"] * stored_bytes / (memcpy * 1e9), 4),
        "pixel_shards_memcpy_fraction": round(shard_many["img_per_s"] * stored_bytes / (memcpy * 1e9), 4),
        "pixel_shards_1worker_cpu_ms_per_img": round(shard_one["cpu_ms_per_img"], 3),
        "pixel_shards_cpu_ms_per_img": round(shard_many["cpu_ms_per_img"], 3),
        "pixel_shards_in_process_img_per_s": round(shard_here["img_per_s"], 1),
        "pixel_shards_in_process_memcpy_fraction": round(shard_here["img_per_s"] * stored_bytes / (memcpy * 1e9), 4),
        "pipeline_cpu_ms_per_img": round(many["cpu_ms_per_img"], 3),
        "pipeline_1worker_cpu_ms_per_img": round(one["cpu_ms_per_img"], 3),
        "pil_baseline_cpu_ms_per_img": round(baseline["cpu_ms_per_img"], 3),
        "raw_records_1worker_cpu_ms_per_img": round(raw["cpu_ms_per_img"], 3),
        "raw_records_cpu_ms_per_img": round(raw_many["cpu_ms_per_img"], 3),
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
        **common.machine_info(),
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
    print(f"raw records x{workers:<2d}{result['raw_records_img_per_s']:8.1f} img/s  "
          f"{result['raw_records_cpu_ms_per_img']:.2f} CPU ms/img ({workers} workers)")
    print(f"memcpy, 1 core {result['memcpy_gb_per_s']:8.2f} GB/s: raw records deliver "
          f"{100 * result['raw_records_1worker_memcpy_fraction']:.1f}% of it with 1 worker, "
          f"{100 * result['raw_records_memcpy_fraction']:.1f}% with {workers} "
          f"({result['raw_record_bytes'] / 1024:.0f} KiB of pixels per record)")
    print(f"stored pixels x1 {result['stored_pixels_1worker_img_per_s']:6.1f} img/s  "
          f"{result['stored_pixels_1worker_cpu_ms_per_img']:.2f} CPU ms/img (1 worker, --center_crop records "
          f"shipped whole for data.device_crops): "
          f"{100 * result['stored_pixels_1worker_memcpy_fraction']:.1f}% of memcpy")
    print(f"pixel shards x1 {result['pixel_shards_1worker_img_per_s']:7.1f} img/s  "
          f"{result['pixel_shards_1worker_cpu_ms_per_img']:.2f} CPU ms/img (1 worker, the same pixels sent by "
          f"the kernel into the shared batch): {100 * result['pixel_shards_1worker_memcpy_fraction']:.1f}% of memcpy")
    print(f"pixel shards x{workers:<2d}{result['pixel_shards_img_per_s']:7.1f} img/s  "
          f"{result['pixel_shards_cpu_ms_per_img']:.2f} CPU ms/img ({workers} workers): "
          f"{100 * result['pixel_shards_memcpy_fraction']:.1f}% of memcpy")
    print(f"pixel shards x0 {result['pixel_shards_in_process_img_per_s']:7.1f} img/s  (no worker processes: "
          f"read in the consuming process): {100 * result['pixel_shards_in_process_memcpy_fraction']:.1f}% of memcpy")
    return result
