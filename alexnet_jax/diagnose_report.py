"""How diagnose's results read: the console table, the Markdown of docs/diagnose.md and the plot, all drawn from
the result dict that diagnose.json saves, so a saved run can be rendered again without training (and a test
can check that the committed docs are the rendering of the committed JSON). No flags and no JAX here."""

import math

import numpy as np
from etils import epath

# Learning rates in ascending order as blue, green, orange, red, ...: distinct hues that still read cool to hot.
_LR_COLOURS = [0, 2, 1, 3, 4, 5, 6, 8, 9, 7]  # indices into matplotlib's tab10


def _floats(curve) -> np.ndarray:
    return np.array([float(v) for v in curve], np.float64)  # a saved curve holds "nan"/"inf" as strings


def plot(result: dict, path: str) -> None:
    """One panel per (variant, activation): pre-clip gradient norm against step, log scale, a line per run
    (colour: learning rate; solid: no clipping, dashed: clipped). An exploded run is marked where it exploded:
    x at its last finite gradient norm when later steps were not finite, a dot at the first step whose loss passed
    the divergence threshold when it only diverged in loss. The title says what ran and what "exploded" means, so the picture reads without the docs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    runs, setup = result["runs"], result.get("setup", {})
    factor = setup.get("diverge_factor", 1.5)
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    activations = list(dict.fromkeys(r["activation"] for r in runs))
    learning_rates = sorted({r["learning_rate"] for r in runs})
    palette = plt.get_cmap("tab10").colors
    colours = {lr: palette[_LR_COLOURS[k % len(_LR_COLOURS)]] for k, lr in enumerate(learning_rates)}
    fig, axes = plt.subplots(len(variants), len(activations), squeeze=False, sharex=True,
                             figsize=(5.6 * len(activations), 3.5 * len(variants) + 1.6))
    for i, variant in enumerate(variants):
        for j, activation in enumerate(activations):
            ax = axes[i][j]
            for r in runs:
                if (r["variant"], r["activation"]) != (variant, activation):
                    continue
                g = _floats(r["grad_norm_curve"])
                steps = np.arange(1, len(g) + 1)
                colour = colours[r["learning_rate"]]
                ax.plot(steps, np.where(np.isfinite(g), g, np.nan), "--" if r["clip_norm"] > 0 else "-",
                        color=colour, lw=1.4)
                bad = ~np.isfinite(g)
                if bad.any():
                    first = int(np.argmax(bad))
                    note = f"non-finite from step {first + 1} ({int(bad.sum())} of {len(g)} steps)"
                    if first > 0:
                        ax.plot(steps[first - 1], g[first - 1], "x", color=colour, ms=9, mew=2.2)
                        right_half = first > len(g) / 2  # then the note goes left of the mark, inside the axes
                        ax.annotate(note, (steps[first - 1], g[first - 1]), xytext=(-7 if right_half else 7, -3),
                                    textcoords="offset points", color=colour, fontsize=7.5, va="top",
                                    ha="right" if right_half else "left")
                    else:  # not even the first step was finite: there is no value to put the mark at
                        ax.text(0.02, 0.96, "x " + note, transform=ax.transAxes, color=colour, fontsize=7.5,
                                va="top")
                elif r["exploded"]:  # diverged in loss: marked at the first step above the threshold
                    loss = _floats(r["loss_curve"])
                    above = np.flatnonzero(loss > factor * loss[0])
                    at = int(above[0]) if len(above) else len(g) - 1
                    ax.plot(steps[at], g[at], "o", color=colour, ms=6.5, mec="white", mew=0.8)
            ax.set_yscale("log")
            ax.set_title(f"{variant}, {activation}", fontsize=10)
            ax.grid(True, which="major", alpha=0.3)
            if j == 0:
                ax.set_ylabel("grad norm (pre-clip)")
            if i == len(variants) - 1:
                ax.set_xlabel("step")
    clip = setup.get("clip_norm", max(r["clip_norm"] for r in runs))
    handles = [Line2D([], [], color=colours[lr], lw=2.5, label=f"lr {lr:g}") for lr in learning_rates] + [
        Line2D([], [], color="0.3", ls="-", label="no clipping"),
        Line2D([], [], color="0.3", ls="--", label=f"clip at global norm {clip:g}"),
        Line2D([], [], color="0.3", ls="", marker="x", ms=8, mew=2, label="exploded: non-finite after this step"),
        Line2D([], [], color="0.3", ls="", marker="o", ms=6,
               label=f"exploded: first step whose loss passed {factor:g}× step 1's")]
    # Two rows, filled column by column: the learning rates, then line styles, then the two explosion marks.
    fig.legend(handles=handles, loc="lower center", ncol=math.ceil(len(handles) / 2), fontsize=8.5, frameon=False)
    fig.suptitle(_title(result), fontsize=9.5)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    with epath.Path(path).open("wb") as f:  # local or gs://
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def _title(result: dict) -> str:
    setup = result.get("setup")
    if not setup:  # a diagnose.json from before setups were saved
        return "diagnose: pre-clip gradient norm per step"
    return (f"diagnose: {setup['config']} ({setup['source']} data), {setup['steps']} steps per run, batch "
            f"{setup['batch_size']}, model.width {setup['width']:g}, constant learning rate, no warmup.\n"
            "Pre-clip global gradient norm. Within a panel every run starts from the same initialisation and "
            "sees the same batches.\nExploded: some step had a non-finite loss, gradient or update, or the final "
            f"loss (mean of the last {setup['final_steps']} steps) is above {setup['diverge_factor']:g}× the "
            "first step's.")


HEADERS = ("variant", "activation", "lr", "clip", "clip_fraction", "max_grad_norm", "final_loss", "skipped",
           "exploded")


def number(value) -> str:
    """3 significant digits, trailing zeros kept (2.30), powers from 1000 up written 1.31e3; nan and inf as is."""
    value = float(value)  # a saved value may be the string "nan" or "inf"
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{float(mantissa):g}e{int(exponent)}"
    return f"{value:#.3g}".rstrip(".")


def _cells(r: dict) -> tuple:
    return (r["variant"], r["activation"], f"{r['learning_rate']:g}",
            f"{r['clip_norm']:g}" if r["clip_norm"] > 0 else "off", f"{float(r['clip_fraction']):.3g}",
            number(r["max_grad_norm"]), number(r["final_loss"]), str(r["skipped_steps"]),
            "YES" if r["exploded"] else "no")


def table(runs: list[dict]) -> str:
    rows = [HEADERS] + [_cells(r) for r in runs]
    widths = [max(len(row[k]) for row in rows) for k in range(len(HEADERS))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows)


def summary(result: dict) -> str:
    """What ran where, and how long it took: the line above the table in docs/diagnose.md."""
    setup, host = result["setup"], result["machine"]
    cpu = ", ".join(filter(None, (host["cpu"], host.get("vector"), f"{host['cores']} cores")))
    return (f"{len(result['runs'])} runs of {setup['steps']} steps ({setup['config']}, batch {setup['batch_size']}, "
            f"model.width {setup['width']:g}) took {result['seconds']:.0f} s on {host['device']} ({cpu}, load "
            f"average {host['load_average']:.1f} at the start; the run itself kept "
            f"{result['cpu_seconds'] / result['seconds']:.2f} cores busy on average), jax {host['jax']}.")


def markdown(result: dict) -> str:
    """The summary line and the table as docs/diagnose.md shows them."""
    rows = [HEADERS, ("---",) * 2 + ("---:",) * 6 + ("---",)]
    for r in result["runs"]:
        cells = _cells(r)
        rows.append(cells[:-1] + ("**YES**" if r["exploded"] else "no",))
    return summary(result) + "\n\n" + "\n".join("| " + " | ".join(row) + " |" for row in rows)
