"""The markdown table of launch/gpu_bench.sh: JAX `bench loop` runs next to the PyTorch reference on the same device.

    python -m alexnet_jax.bench.table --logs=DIR [--out=FILE]

DIR holds jax_<variant>_<batch>.txt and torch_<variant>_<batch>.txt, each the stdout of one run whose last line
is its JSON object. A run that failed leaves its cells as "-". Prints the table and writes it to --out.
"""

import glob
import json
import os
import re
import sys

from absl import flags

from alexnet_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Called only when run as a command: importing this module defines no flags."""
    flags.DEFINE_string("logs", None, "Folder of the runs' outputs.", required=True)
    flags.DEFINE_string("out", "", "Also write the table to this file.")


HEADER = ("device", "model", "batch", "dtype", "JAX step img/s", "JAX loop img/s", "MFU", "PyTorch img/s",
          "JAX/PyTorch")


def last_json(path: str) -> dict | None:
    """The JSON object on the last line of a run's output; None when the run left none."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().strip().splitlines()
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


def _cell(value, fmt: str = "{:.0f}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else "-"


def table(logs: str) -> str:
    rows = []
    for path in sorted(glob.glob(os.path.join(logs, "jax_*_*.txt")),
                       key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"_|\.", p)]):
        variant, batch = re.fullmatch(r"jax_(\w+?)_(\d+)\.txt", os.path.basename(path)).groups()
        ours = last_json(path) or {}
        theirs = last_json(os.path.join(logs, f"torch_{variant}_{batch}.txt")) or {}
        step = ours.get("step_img_per_s")
        reference = theirs.get("img_per_s")
        mfu = ours.get("step_mfu")
        rows.append((ours.get("device_kind") or theirs.get("device", "-"), variant, batch, ours.get("dtype", "-"),
                     _cell(step), _cell(ours.get("loop_img_per_s")),
                     f"{100 * mfu:.1f}%" if isinstance(mfu, float) else (mfu or "-"), _cell(reference),
                     _cell(step / reference if step and reference else None, "{:.2f}x")))
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return cli.EXIT_BAD_USAGE
    if not os.path.isdir(FLAGS.logs):
        print(f"error: --logs: no such directory: {FLAGS.logs}", file=sys.stderr)
        return cli.EXIT_BAD_USAGE
    text = table(FLAGS.logs)
    print(text, end="")
    if FLAGS.out:
        with open(FLAGS.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
