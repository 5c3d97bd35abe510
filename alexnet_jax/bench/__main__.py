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
  (alexnet_jax.bench.torch_reference: same model, optimizer, batch and compute dtype, eager) in the same process on the
  same device, and reports its img/s as torch_img_per_s and our img_per_s over it as jax_to_torch.

loop: `step`, then the train loop fed from the host, in the same process on the same state, so their ratio
  compares one moment: the synthetic source (random pixels: no files, no decode) through
  pipeline.train_batches (crop, batching, --workers grain processes) and sharding.host_to_global into the same
  step. As in training, metrics are fetched one log step late (config log_every_steps), so the loop never waits
  for the device. Reports step_img_per_s, loop_img_per_s (= img_per_s) and loop_to_step. --device_crops: the
  synthetic pixels are stored at data.resize_size and shipped whole, and the step (bare and fed) cuts the crops
  (data.device_crops), to compare with the host's crops.

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
  gradient, timed on their own at the model's shapes (see alexnet_jax/bench/layers.py); with --torch, PyTorch's
  times for the same operations beside them and the two results' largest relative difference.

The config is read as training reads it: model.*, data.image_size/resize_size/augment/random_flip/lighting_std/
workers, batch_size, optim.*, mesh.model apply; data.source is replaced by what the benchmark reads. --workers
overrides data.workers (0 decodes in this process).

examples:
  python -m alexnet_jax.bench step --json --config.batch_size=128 --config.model.dtype=bfloat16
  python -m alexnet_jax.bench step --torch --config.batch_size=32 --config.model.dtype=float32
  python -m alexnet_jax.bench loop --workers=8
  python -m alexnet_jax.bench loop --workers=8 --device_crops --config.data.resize_size=256
  python -m alexnet_jax.bench e2e --workers=8 --images=1024
  python -m alexnet_jax.bench pipeline --json
  python -m alexnet_jax.bench layers --torch --config.batch_size=32 --config.model.dtype=float32
"""

import json
import sys

from absl import flags
from ml_collections import config_flags

from alexnet_jax import cli
from alexnet_jax.bench import common, layers, pipeline, step

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Called only when run as a command: importing the package (its helpers) defines no flags."""
    config_flags.DEFINE_config_file("config", None, "Config file (default: configs/imagenet.py); "
                                    "--config.KEY=VALUE overrides any key.", lock_config=True)
    flags.DEFINE_bool("json", False, "Print one JSON object as the last stdout line.")
    flags.DEFINE_integer("steps", 20, "Timed steps in each timed run (step, loop, e2e).", lower_bound=1)
    flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling (step, loop, e2e).", lower_bound=0)
    flags.DEFINE_integer("workers", None, "Grain worker processes (loop, e2e: default data.workers, 0 decodes in "
                         "this process; pipeline: default one per CPU).", lower_bound=0)
    flags.DEFINE_integer("images", 512, "JPEGs to write and read (e2e, pipeline).", lower_bound=1)
    flags.DEFINE_string("data", "", "Read an existing ImageFolder instead of written JPEGs (e2e, pipeline).")
    flags.DEFINE_bool("device_crops", False, "loop: synthetic pixels stored at data.resize_size, shipped whole "
                      "and cropped in the step (data.device_crops), instead of cut on the host.")
    flags.DEFINE_bool("torch", False, "step, layers: also time the same work in PyTorch in this process (needs "
                      "torch).")


RUNNERS = {"step": step.run_step, "loop": step.run_loop, "pipeline": pipeline.run_pipeline, "e2e": step.run_e2e,
           "layers": layers.run_command}


def main(argv) -> int:
    if len(argv) != 2 or argv[1] not in RUNNERS:
        got = " ".join(argv[1:]) or "nothing"
        print(f"error: expected one benchmark, {' | '.join(RUNNERS)}, got {got} (--help describes them)",
              file=sys.stderr)
        return cli.EXIT_BAD_USAGE
    try:
        result = RUNNERS[argv[1]](FLAGS.config)
    except common.UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return cli.EXIT_BAD_USAGE
    if argv[1] == "layers":
        layers.print_report(result)
    elif argv[1] != "pipeline":
        step.print_report(result)
    if FLAGS.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    define_flags()
    sys.argv = common.with_default_config(sys.argv)
    cli.run(main)
