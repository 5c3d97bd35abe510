"""`bench step`, `bench loop` and `bench e2e`: the compiled train step alone, then fed by the train loop's own
batches from synthetic pixels (loop) or JPEG files (e2e), in one process on one state (see `python -m
alexnet_jax.bench --help`)."""

import gc
import sys
import tempfile
import time

import numpy as np
from absl import flags

from alexnet_jax import storage
from alexnet_jax.bench import common

FLAGS = flags.FLAGS


def build_step(config, total_steps: int, stored=None):
    """(mesh, fresh train state, AOT-compiled train step, init seconds, compile seconds): the state and the
    step train.train_and_evaluate builds, compiled for this config's global batch; `stored` (height, width):
    for batches of stored pixels with their positions, which the step crops (data.device_crops)."""
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
    height, width = stored or (size, size)
    abstract_batch = {
        "image": jax.ShapeDtypeStruct((config.batch_size, height, width, 3), jnp.uint8, sharding=batch_sharding),
        "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=batch_sharding)}
    if stored:
        abstract_batch["position"] = jax.ShapeDtypeStruct((config.batch_size,), jnp.uint32, sharding=batch_sharding)
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
        "mfu": common.mfu(flops, timings["pipelined_s"] / steps, device_kind),
        "final_loss": timings["final_loss"],
        "skipped_steps": timings["skipped_steps"],
    }


def print_report(result: dict) -> None:
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


def _fixed_batch(config, mesh, stored=None):
    import jax

    from alexnet_jax import sharding

    rng = np.random.default_rng(config.seed)
    local = config.batch_size // jax.process_count()
    height, width = stored or (config.data.image_size,) * 2
    batch = {"image": rng.integers(0, 256, (local, height, width, 3), dtype=np.uint8),
             "label": rng.integers(0, config.model.num_classes, (local,), dtype=np.int32)}
    if stored:
        batch["position"] = np.arange(jax.process_index() * local, (jax.process_index() + 1) * local, dtype=np.uint32)
    return sharding.host_to_global(batch, mesh)


def _bench_step(config, total_steps: int, stored=None):
    """Builds and times the bare step (on stored pixels it crops, given `stored`: see build_step); returns
    (report without the fed run, mesh, state, compiled, flops)."""
    steps, warmup = FLAGS.steps, FLAGS.warmup
    mesh, state, compiled, init_s, compile_s = build_step(config, total_steps, stored)
    flops = common.step_flops(compiled)
    device = common.device_info()
    batch = _fixed_batch(config, mesh, stored)
    log_every = max(1, int(config.log_every_steps))
    timings, state = time_steps(compiled, state, lambda: batch, steps=steps, warmup=warmup, log_every=log_every)
    report = {"compile_s": round(compile_s, 3), "init_s": round(init_s, 3), "steps": steps, "warmup": warmup,
              "log_every_steps": log_every, "step_gflops": round(flops / 1e9, 3) if flops else None,
              **_rates(config, timings, steps, flops, device["device_kind"]), **device, **common.model_info(config)}
    return report, mesh, state, compiled, flops


def run_step(config) -> dict:
    config.data.source = "synthetic"  # nothing is read: validate must not ask for data paths
    common.validated(config)
    if FLAGS.torch:
        torch_reference = common.torch_reference_module(config)
    report, *_ = _bench_step(config, FLAGS.warmup + 2 * FLAGS.steps)
    result = {"bench": "step", **report, "data": "one fixed on-device uint8 batch", **common.host_info()}
    if FLAGS.torch:
        torch_run = torch_reference.bench(
            result["variant"], result["global_batch"], result["image_size"], result["dtype"], width=result["width"],
            num_classes=result["num_classes"], steps=FLAGS.steps, warmup=FLAGS.warmup)
        result.update(torch_img_per_s=torch_run["img_per_s"], torch_ms_per_step=torch_run["ms_per_step"],
                      torch_device=torch_run["device"], torch=torch_run["torch"],
                      jax_to_torch=round(result["img_per_s"] / torch_run["img_per_s"], 3))
    return result


def _fed_loop(bench: str, config, source, extra: dict) -> dict:
    """`loop` and `e2e`: the bare step, then the train loop's own batches (pipeline.train_batches ->
    host_to_global) into the same compiled step and state."""
    import jax

    from alexnet_jax import sharding
    from alexnet_jax.data import pipeline

    steps, warmup = FLAGS.steps, FLAGS.warmup
    device_crops = bool(config.data.get("device_crops", False))
    stored = tuple(source.uniform_pixels[:2]) if device_crops else None
    step_report, mesh, state, compiled, flops = _bench_step(config, 2 * (warmup + 2 * steps), stored)
    feed = pipeline.feed_options(config.data, purpose="the fed loop", images=(warmup + 2 * steps + 1) *
                                 config.batch_size, global_batch_size=config.batch_size,
                                 process_count=jax.process_count())
    start = time.perf_counter()
    batches = [pipeline.train_batches(
        source, **feed, global_batch_size=config.batch_size, seed=config.seed,
        image_size=config.data.image_size, resize_size=config.data.resize_size, augment=config.data.augment,
        device_crops=device_crops, process_index=jax.process_index(), process_count=jax.process_count())]
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
            "resize_size": int(config.data.resize_size), "augment": config.data.augment, "device_crops": device_crops,
            **extra, **common.host_info()}


def run_loop(config) -> dict:
    from alexnet_jax.data import pipeline as pipeline_lib, sources

    config.data.source = "synthetic"
    if FLAGS.workers is not None:
        config.data.workers = FLAGS.workers
    if FLAGS.device_crops:
        config.data.device_crops = True
    common.validated(config)
    if config.data.device_crops:
        # Stored at the crop's scale, as raw records converted with --center_crop are: the device cuts the crops.
        size = int(config.data.resize_size)
        source = sources.SyntheticSource(config.data.synthetic_examples, size, config.model.num_classes, config.seed)
        if problem := pipeline_lib.device_crop_problem(source, config.data):
            raise common.UsageError(f"config: {problem}")
        what = f"{size} px images, cropped on the device"
    else:
        source = sources.create_source(config.data, "train", config.model.num_classes, config.seed)
        what = f"{config.data.image_size} px images"
    return _fed_loop("loop", config, source, {"data": f"synthetic source ({len(source)} random {what})"})


def run_e2e(config) -> dict:
    from alexnet_jax.data import sources

    if FLAGS.workers is not None:
        config.data.workers = FLAGS.workers
    data = common.data_dir()
    with tempfile.TemporaryDirectory(prefix="alexnet_bench_") as tmp:
        config.data.source = "imagefolder"
        config.data.train_path = config.data.eval_path = data or tmp
        common.validated(config)  # before spending time on the files
        if not data:
            print(f"writing {FLAGS.images} JPEGs to {tmp} ...", file=sys.stderr)
            common.write_jpegs(tmp, FLAGS.images, seed=config.seed, classes=min(4, config.model.num_classes))
        try:
            source = sources.create_source(config.data, "train", config.model.num_classes, config.seed)
        except ValueError as error:
            raise common.UsageError(f"data: {error}") from None
        sample = [source.name(i) for i in range(0, len(source), max(1, len(source) // 64))]
        sizes = [storage.size(path) for path in sample]
        return _fed_loop("e2e", config, source, {
            "data": data or "synthetic JPEGs (ImageNet-like sizes)", "images": len(source),
            "mean_file_kb": round(float(np.mean(sizes)) / 1024, 1)})
