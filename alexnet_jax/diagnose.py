"""Where does training blow up? Short runs over learning rate x clipping x variant x activation.

    python -m alexnet_jax.diagnose --config=configs/digits.py --workdir=DIR [--json]

For every (variant, activation) it compiles the real train step once and trains from the same initialisation,
on the same batches, at every learning rate of the grid, with clipping off and on. Learning rate and clipping
threshold are runtime scalars of the optimizer state (stability.controlled), so the grid costs no recompiles.
The schedule is constant with no warmup: warmup hides exactly the early instability this is meant to show.

Per run it reports learning_rate, clip_norm, variant, activation, max_grad_norm (pre-clip), final_loss (mean of
the last 5 steps; a non-finite step makes it non-finite), skipped_steps (steps the guard refused), clip_fraction
and exploded: some step had a non-finite loss, gradient or update, or the final loss ended above
`--diverge_factor` (1.5) times the first step's (about chance level, ln 10, for an untrained net). A table goes
to the console, DIR/diagnose.png plots the gradient norm against the step for every run, DIR/diagnose.json holds
the per-step curves, and `--json` prints {"runs": [...], ...} as the last line.
"""

import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from alexnet_jax import config as config_lib
from alexnet_jax import cli, metrics, optim, sharding, stability, storage, train
from alexnet_jax.data import pipeline, sources

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for diagnose.png and diagnose.json.")
flags.DEFINE_bool("json", False, "Print the results as one JSON object on the last stdout line.")
flags.DEFINE_list("learning_rates", ["0.01", "0.1", "1", "10"], "Learning-rate grid.")
flags.DEFINE_list("variants", ["owt", "bn"], "Model variants.")
flags.DEFINE_list("activations", ["relu", "tanh"], "model.activation values.")
flags.DEFINE_float("clip_norm", 1.0, "Global-norm threshold of the clipped runs.")
flags.DEFINE_integer("steps", 40, "Steps per run.")
flags.DEFINE_float("width", 0.125, "model.width for the runs (small: each run is only a probe).")
flags.DEFINE_float("diverge_factor", 1.5, "A run exploded if a step was non-finite or its final loss is above "
                   "this x its first step's loss.")
flags.mark_flags_as_required(["config", "workdir"])

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


def plot(runs: list[dict], path: str) -> None:
    """One panel per (variant, activation): pre-clip gradient norm against step, log scale, a line per run
    (colour: learning rate; solid: no clipping, dashed: clipped); x marks steps whose gradient was not finite."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in runs))
    activations = list(dict.fromkeys(r["activation"] for r in runs))
    learning_rates = sorted({r["learning_rate"] for r in runs})
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(learning_rates)))
    fig, axes = plt.subplots(len(variants), len(activations), squeeze=False, sharex=True,
                             figsize=(5.5 * len(activations), 3.6 * len(variants)))
    finite_max = max([g for r in runs for g in r["grad_norm_curve"] if math.isfinite(g)] or [1.0])
    for i, variant in enumerate(variants):
        for j, activation in enumerate(activations):
            ax = axes[i][j]
            for r in runs:
                if (r["variant"], r["activation"]) != (variant, activation):
                    continue
                g = np.array(r["grad_norm_curve"])
                steps = np.arange(1, len(g) + 1)
                colour = colours[learning_rates.index(r["learning_rate"])]
                style = "--" if r["clip_norm"] > 0 else "-"
                label = f"lr {r['learning_rate']:g}" + (f", clip {r['clip_norm']:g}" if r["clip_norm"] > 0 else "")
                ax.plot(steps, np.where(np.isfinite(g), g, np.nan), style, color=colour, label=label, lw=1.4)
                bad = ~np.isfinite(g)
                if bad.any():
                    ax.plot(steps[bad], np.full(bad.sum(), finite_max * 3), "x", color=colour, ms=5)
            ax.set_yscale("log")
            ax.set_title(f"{variant}, {activation}")
            ax.grid(True, which="major", alpha=0.3)
            if j == 0:
                ax.set_ylabel("grad norm (pre-clip)")
            if i == len(variants) - 1:
                ax.set_xlabel("step")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, title="x: non-finite")
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    with epath.Path(path).open("wb") as f:  # local or gs://
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


COLUMNS = ("variant", "activation", "learning_rate", "clip_norm", "clip_fraction", "max_grad_norm", "final_loss",
           "skipped_steps", "exploded")


def table(runs: list[dict]) -> str:
    def cell(value):
        if isinstance(value, bool):
            return "YES" if value else "no"
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    rows = [COLUMNS] + [tuple(cell(r[c]) for c in COLUMNS) for r in runs]
    widths = [max(len(row[k]) for row in rows) for k in range(len(COLUMNS))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows)


def _plain(value):
    """JSON-safe: non-finite floats become "nan"/"inf" strings, as in metrics.jsonl."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return metrics.plain(value) if isinstance(value, float) else value


def diagnose(config, workdir: str, *, learning_rates, variants, activations, clip_norm: float, steps: int,
             width: float, diverge_factor: float) -> dict:
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
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    png = storage.join(workdir, "diagnose.png")
    plot(runs, png)
    storage.write_text(storage.join(workdir, "diagnose.json"),
                       json.dumps({"runs": [{k: _plain(v) for k, v in r.items()} for r in runs]}))
    return {"runs": runs, "plot": png}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    metrics.quiet_library_logs()
    config = FLAGS.config
    try:
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
    start = time.perf_counter()
    result = diagnose(config, FLAGS.workdir, learning_rates=learning_rates, variants=FLAGS.variants,
                      activations=FLAGS.activations, clip_norm=FLAGS.clip_norm, steps=FLAGS.steps,
                      width=FLAGS.width, diverge_factor=FLAGS.diverge_factor)
    seconds = time.perf_counter() - start
    print(table(result["runs"]))
    print(f"{len(result['runs'])} runs of {FLAGS.steps} steps in {seconds:.0f} s; plot: {result['plot']}")
    if FLAGS.json:
        runs = [{k: _plain(v) for k, v in r.items() if not k.endswith("_curve")} for r in result["runs"]]
        print(json.dumps({"runs": runs, "plot": result["plot"], "seconds": round(seconds, 1)}))
    return 0


if __name__ == "__main__":
    cli.run(main)
