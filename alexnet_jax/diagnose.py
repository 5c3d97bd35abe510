"""Where does training blow up? Short runs over learning rate x clipping x variant x activation.

    python -m alexnet_jax.diagnose --config=configs/digits.py --workdir=DIR [--json] [--markdown]
    python -m alexnet_jax.diagnose --from_json=DIR/diagnose.json [--workdir=OUT] [--markdown]

For every (variant, activation) it compiles the real train step once and trains from the same initialisation,
on the same batches, at every learning rate of the grid, with clipping off and on. Learning rate and clipping
threshold are runtime scalars of the optimizer state (stability.controlled), so the grid costs no recompiles.
The schedule is constant with no warmup: warmup hides exactly the early instability this is meant to show.

Per run it reports learning_rate, clip_norm, variant, activation, max_grad_norm (pre-clip), final_loss (mean of
the last 5 steps; a non-finite step makes it non-finite), skipped_steps (steps the guard refused), clip_fraction
and exploded: some step had a non-finite loss, gradient or update, or the final loss ended above
`--diverge_factor` (1.5) times the first step's (about chance level, ln 10, for an untrained net). A table goes
to the console (`--markdown`: as the Markdown table of docs/diagnose.md), DIR/diagnose.png plots the gradient
norm against the step for every run, DIR/diagnose.json holds the setup, the machine, the run time and the
per-step curves, and `--json` prints it without the curves as the last line. `--from_json` trains nothing: it
redraws the plot and prints the table of a saved diagnose.json, so docs/diagnose.md is the output of the
committed docs/diagnose.json (tests/test_diagnose.py checks that).
"""

import json
import math
import os
import platform
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from alexnet_jax import cli, metrics, optim, sharding, stability, storage, train
from alexnet_jax import config as config_lib
from alexnet_jax.data import pipeline, sources
from alexnet_jax.diagnose_report import markdown, plot, summary, table

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for diagnose.png and diagnose.json (with --from_json: for the "
                    "redrawn plot; default: the JSON file's directory).")
flags.DEFINE_bool("json", False, "Print the results as one JSON object on the last stdout line.")
flags.DEFINE_bool("markdown", False, "Print the table as Markdown, with the line that says what ran where.")
flags.DEFINE_string("from_json", None, "Train nothing: redraw the plot and print the table of this diagnose.json.")
flags.DEFINE_list("learning_rates", ["0.01", "0.1", "1", "10"], "Learning-rate grid.")
flags.DEFINE_list("variants", ["owt", "bn"], "Model variants.")
flags.DEFINE_list("activations", ["relu", "tanh"], "model.activation values.")
flags.DEFINE_float("clip_norm", 1.0, "Global-norm threshold of the clipped runs.")
flags.DEFINE_integer("steps", 40, "Steps per run.")
flags.DEFINE_float("width", 0.125, "model.width for the runs (small: each run is only a probe).")
flags.DEFINE_float("diverge_factor", 1.5, "A run exploded if a step was non-finite or its final loss is above "
                   "this x its first step's loss.")

FINAL_STEPS = 5  # final_loss averages this many last steps


def probe_config(config, variant: str, activation: str, width: float):
    """The config of one (variant, activation) group: base learning rate 1 (lr_scale sets the real one),
    constant schedule, no warmup, clipping handled at run time."""
    c = config.copy_and_resolve_references()
    c.model.variant, c.model.activation, c.model.width = variant, activation, width
    c.optim.learning_rate, c.optim.schedule, c.optim.warmup_steps, c.optim.clip_norm = 1.0, "constant", 0, 0.0
    return c


def fixed_batches(config, mesh, steps: int) -> list[dict]:
    """The first `steps` training batches, on the device once and shared by every run."""
    source = sources.create_source(config.data, "train", config.model.num_classes, config.seed)
    it = pipeline.train_batches(source, global_batch_size=config.batch_size, seed=config.seed,
                                image_size=config.data.image_size, resize_size=config.data.resize_size,
                                process_index=jax.process_index(), process_count=jax.process_count())
    return [sharding.host_to_global(next(it), mesh) for _ in range(steps)]


def run_group(config, mesh, batches, learning_rates, clip_norms, diverge_factor: float) -> list[dict]:
    """Every (learning rate, clip) run of one (variant, activation): one compile, one initialisation."""
    steps = len(batches)
    lr_fn = optim.create_learning_rate_fn(config.optim, steps_per_epoch=steps, num_train_steps=steps)
    tx = optim.create_optimizer(config.optim, lr_fn)
    abstract = train.abstract_train_state(config, mesh, tx)
    step_fn, _ = train.compile_steps(config, mesh, tx, lr_fn, jax.tree.map(lambda x: x.sharding, abstract))
    initial = train.create_train_state(config, tx, abstract)
    runs = []
    for clip_norm in clip_norms:
        for learning_rate in learning_rates:
            state = jax.tree.map(jnp.copy, initial)  # the step donates its input: every run gets its own copy
            state = stability.set_controls(state, lr_scale=learning_rate, clip_norm=clip_norm)
            history = []
            for batch in batches:
                state, step_metrics = step_fn(state, batch)
                history.append({k: step_metrics[k] for k in ("train_loss", "grad_norm", "skipped", "clipped")})
            history = jax.device_get(history)  # one sync per run
            loss = np.array([h["train_loss"] for h in history], np.float64)
            grad_norm = np.array([h["grad_norm"] for h in history], np.float64)
            skipped = int(sum(bool(h["skipped"]) for h in history))
            max_grad_norm = float(np.max(np.where(np.isfinite(grad_norm), grad_norm, np.inf)))
            final_loss = float(np.mean(loss[-FINAL_STEPS:]))
            runs.append({
                "learning_rate": learning_rate, "clip_norm": clip_norm, "variant": config.model.variant,
                "activation": config.model.activation, "max_grad_norm": max_grad_norm,
                "final_loss": final_loss,
                "exploded": bool(skipped > 0 or not final_loss <= diverge_factor * loss[0]),
                "skipped_steps": skipped,
                "clip_fraction": float(np.mean([bool(h["clipped"]) for h in history])),
                "grad_norm_curve": grad_norm.tolist(), "loss_curve": loss.tolist(),
            })
    return runs


def _plain(value):
    """JSON-safe: non-finite floats become "nan"/"inf" strings, as in metrics.jsonl."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return metrics.plain(value) if isinstance(value, float) else value


def _cpu() -> tuple[str, str]:
    """The CPU's model name and its widest vector extension: XLA:CPU's kernels round differently at each
    width, and a diverging run amplifies that, so an exploded run's numbers differ between machines."""
    model, vector = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return model, vector
    for line in info.splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            extensions = set(line.split(":", 1)[1].split())
            vector = "AVX-512" if "avx512f" in extensions else "AVX2" if "avx2" in extensions else ""
            break
    return model, vector


def machine() -> dict:
    """Where the grid ran, and how busy the machine already was: a time means little without both."""
    device = jax.devices()[0]
    model, vector = _cpu()
    return {"device": "CPU" if device.platform == "cpu" else f"{jax.device_count()} x {device.device_kind}",
            "cpu": model, "vector": vector, "cores": os.cpu_count(), "load_average": round(os.getloadavg()[0], 2),
            "jax": jax.__version__}


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def diagnose(config, *, learning_rates, variants, activations, clip_norm: float, steps: int, width: float,
             diverge_factor: float) -> list[dict]:
    mesh = sharding.mesh_for(config)
    batches = fixed_batches(config, mesh, steps)
    runs = []
    for variant in variants:
        for activation in activations:
            start = time.perf_counter()
            group = run_group(probe_config(config, variant, activation, width), mesh, batches, learning_rates,
                              (0.0, clip_norm), diverge_factor)
            logging.info("%s/%s: %d runs of %d steps in %.1f s", variant, activation, len(group), steps,
                         time.perf_counter() - start)
            runs += group
    return runs


def save(result: dict, workdir: str) -> str:
    """DIR/diagnose.json (everything, curves included) and DIR/diagnose.png; returns the plot's path."""
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    png = storage.join(workdir, "diagnose.png")
    plot(result, png)
    head = json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1)
    runs = ",\n".join(json.dumps({k: _plain(v) for k, v in r.items()}) for r in result["runs"])
    # One run a line: a rerun's diff reads run by run.
    storage.write_text(storage.join(workdir, "diagnose.json"), f'{head[:-2]},\n "runs": [\n{runs}\n]}}\n')
    return png


def _report(result: dict, png: str) -> None:
    """The table on stdout (only the Markdown block with --markdown, ready to paste into docs/diagnose.md)."""
    if FLAGS.markdown:
        print(markdown(result))
        print(f"plot: {png}", file=sys.stderr)
    else:
        print(table(result["runs"]))
        print((summary(result) + " " if "setup" in result else "") + f"Plot: {png}")


def _from_json(path: str) -> int:
    try:
        result = json.loads(storage.read_bytes(path))
        if not isinstance(result, dict) or not result.get("runs"):
            raise ValueError("no runs in it")
        workdir = FLAGS.workdir or os.path.dirname(path) or "."
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        png = storage.join(workdir, "diagnose.png")
        plot(result, png)
        _report(result, png)
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"error: --from_json {path}: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    metrics.quiet_library_logs()
    if FLAGS.from_json:
        return _from_json(FLAGS.from_json)
    config = FLAGS.config
    try:
        if config is None or not FLAGS.workdir:
            raise config_lib.ConfigError("--config and --workdir are required (or --from_json=FILE)")
        learning_rates = [float(v) for v in FLAGS.learning_rates]
        if not learning_rates or not all(v > 0 and math.isfinite(v) for v in learning_rates):
            raise config_lib.ConfigError(f"--learning_rates must be positive numbers (got {FLAGS.learning_rates})")
        for variant in FLAGS.variants:
            for activation in FLAGS.activations:
                config_lib.validate(probe_config(config, variant, activation, FLAGS.width), jax.device_count(),
                                    jax.process_count())
        if FLAGS.steps < FINAL_STEPS:
            raise config_lib.ConfigError(f"--steps must be >= {FINAL_STEPS} (got {FLAGS.steps})")
        if not FLAGS.clip_norm > 0:
            raise config_lib.ConfigError(f"--clip_norm must be > 0 (got {FLAGS.clip_norm})")
    except (ValueError, config_lib.ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    setup = {"config": config_flags.get_config_filename(FLAGS["config"]),
             "overrides": {k: str(v) for k, v in config_flags.get_override_values(FLAGS["config"]).items()},
             "source": config.data.source, "batch_size": config.batch_size, "image_size": config.data.image_size,
             "variants": list(FLAGS.variants), "activations": list(FLAGS.activations),
             "learning_rates": learning_rates, "clip_norm": FLAGS.clip_norm, "steps": FLAGS.steps,
             "width": FLAGS.width, "diverge_factor": FLAGS.diverge_factor, "final_steps": FINAL_STEPS}
    host = machine()  # the load average before this run adds its own
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    runs = diagnose(config, learning_rates=learning_rates, variants=FLAGS.variants, activations=FLAGS.activations,
                    clip_norm=FLAGS.clip_norm, steps=FLAGS.steps, width=FLAGS.width,
                    diverge_factor=FLAGS.diverge_factor)
    seconds = time.perf_counter() - start
    result = {"setup": setup, "machine": host, "seconds": round(seconds, 1),
              "cpu_seconds": round(_cpu_seconds() - cpu_start, 1), "runs": runs}
    png = save(result, FLAGS.workdir)
    _report(result, png)
    if FLAGS.json:
        runs = [{k: _plain(v) for k, v in r.items() if not k.endswith("_curve")} for r in runs]
        print(json.dumps({**result, "runs": runs, "plot": png}))
    return 0


if __name__ == "__main__":
    cli.run(main)
