"""diagnose: a tiny real grid through the command line, as a user runs it; and the docs, which must be the
rendering of the committed run (docs/diagnose.json), not numbers typed in by hand."""

import json
import math
import pathlib
import re

import pytest
from conftest import REPO, run_cli

from alexnet_jax.diagnose_report import markdown, number


def test_diagnose_json_reports_every_run_and_writes_the_plot(tmp_path):
    result = run_cli("alexnet_jax.diagnose", "--config=configs/digits.py", f"--workdir={tmp_path}", "--json",
                     "--learning_rates=0.01,100", "--variants=owt", "--activations=relu", "--steps=6",
                     "--width=0.0625", "--config.batch_size=16")
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    runs = out["runs"]
    assert [(r["learning_rate"], r["clip_norm"]) for r in runs] == [(0.01, 0.0), (100.0, 0.0), (0.01, 1.0),
                                                                    (100.0, 1.0)]
    for r in runs:
        assert {"learning_rate", "clip_norm", "variant", "activation", "max_grad_norm", "final_loss",
                "exploded"} <= set(r)
        assert (r["variant"], r["activation"]) == ("owt", "relu")
    calm, wild = runs[0], runs[1]
    assert not calm["exploded"] and math.isfinite(calm["final_loss"]) and calm["skipped_steps"] == 0
    assert wild["exploded"]
    # owt's gradient norm on digits is ~0.3: a clip of 1 never engages at 0.01, and does once 100 blows it up.
    assert runs[2]["clip_fraction"] == 0.0 and runs[3]["clip_fraction"] > 0
    assert "variant" in result.stdout and "exploded" in result.stdout  # the console table
    png = tmp_path / "diagnose.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    saved = json.loads((tmp_path / "diagnose.json").read_text())
    assert len(saved["runs"][0]["grad_norm_curve"]) == 6
    assert saved["setup"]["config"] == "configs/digits.py" and saved["setup"]["steps"] == 6
    assert saved["setup"]["batch_size"] == 16 and saved["machine"]["cores"] >= 1 and saved["seconds"] > 0

    # The saved JSON alone renders the same table again, without training: what the docs' table is made from.
    redrawn = run_cli("alexnet_jax.diagnose", f"--from_json={tmp_path / 'diagnose.json'}",
                      f"--workdir={tmp_path / 'redrawn'}", "--markdown")
    assert redrawn.returncode == 0, redrawn.stderr[-3000:]
    assert redrawn.stdout == markdown(saved) + "\n"
    rows = [line for line in redrawn.stdout.splitlines() if line.startswith("| owt |")]
    assert len(rows) == 4 and "**YES**" in rows[1] and "**YES**" not in rows[0]
    assert (tmp_path / "redrawn" / "diagnose.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diagnose_rejects_a_bad_grid_with_exit_code_2(tmp_path):
    result = run_cli("alexnet_jax.diagnose", "--config=configs/digits.py", f"--workdir={tmp_path / 'd'}",
                     "--learning_rates=0.1,-1")
    assert result.returncode == 2
    assert "--learning_rates" in result.stderr
    assert not (tmp_path / "d").exists()


def test_from_json_refuses_a_file_without_runs_in_one_line(tmp_path):
    bad = tmp_path / "diagnose.json"
    bad.write_text("{}")
    result = run_cli("alexnet_jax.diagnose", f"--from_json={bad}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: --from_json {bad}: no runs in it"]
    assert not (tmp_path / "diagnose.png").exists()


@pytest.mark.parametrize("value, text", [(2.3, "2.30"), (0.257, "0.257"), (785.3, "785"), (1310.0, "1.31e3"),
                                         (2.6e19, "2.6e19"), (0.0, "0"), ("nan", "nan"), (float("inf"), "inf")])
def test_numbers_read_as_the_docs_write_them(value, text):
    assert number(value) == text


GENERATED = re.compile(r"<!-- generated: (.+?) -->\n(.*?)\n<!-- end generated -->", re.DOTALL)


def test_the_docs_are_the_rendering_of_the_committed_run():
    """docs/diagnose.md's table is `--from_json=docs/diagnose.json --markdown` verbatim, and every number its
    prose and the README quote from the grid is the committed run's. After a rerun of the grid, regenerate the
    block with the command the marker names and fix the prose this test then points at."""
    result = json.loads(pathlib.Path(REPO, "docs", "diagnose.json").read_text())
    doc = pathlib.Path(REPO, "docs", "diagnose.md").read_text()
    readme = pathlib.Path(REPO, "README.md").read_text()
    (command, block), = GENERATED.findall(doc)
    assert command == "python -m alexnet_jax.diagnose --from_json=docs/diagnose.json --markdown"
    assert block == markdown(result)
    assert result["setup"]["config"] == "configs/digits.py" and not result["setup"]["overrides"]
    assert len(result["runs"]) == 32 and result["setup"]["steps"] == 40

    def run(variant, activation, lr, clip):
        (found,) = [r for r in result["runs"] if (r["variant"], r["activation"], r["learning_rate"],
                                                  r["clip_norm"]) == (variant, activation, lr, clip)]
        return found

    def loss(*key):
        return number(run(*key)["final_loss"])

    def peak(variant, activation, lr):
        """'475 at step 11': the highest finite pre-clip gradient norm of the unclipped run, and its step."""
        curve = [float(v) for v in run(variant, activation, lr, 0.0)["grad_norm_curve"]]
        value, step = max((v, i + 1) for i, v in enumerate(curve) if math.isfinite(v))
        return f"{number(value)} at step {step}"

    quoted = {  # what docs/diagnose.md and the README say, built from the committed run
        "tanh_lr1": f"{loss('owt', 'tanh', 1.0, 0.0)} → {loss('owt', 'tanh', 1.0, 1.0)}",
        "bn_relu_lr10": f"{loss('bn', 'relu', 10.0, 0.0)} → {loss('bn', 'relu', 10.0, 1.0)}",
        "owt_relu_lr10": f"{loss('owt', 'relu', 10.0, 0.0)} → {loss('owt', 'relu', 10.0, 1.0)}",
        "tanh_lr01": f"{loss('owt', 'tanh', 0.1, 0.0)} → {loss('owt', 'tanh', 0.1, 1.0)}",
        "bn_lr001": f"{loss('bn', 'relu', 0.01, 0.0)} → {loss('bn', 'relu', 0.01, 1.0)}",
        "skipped": f"refused {run('owt', 'relu', 10.0, 0.0)['skipped_steps']} of the 40 steps",
        "owt_relu_peak": peak('owt', 'relu', 10.0),
        "owt_tanh_peak": peak('owt', 'tanh', 1.0),
    }
    doc, readme = " ".join(doc.split()), " ".join(readme.split())  # a quote may wrap across lines
    for name, text in quoted.items():
        assert text in doc, f"docs/diagnose.md should quote {name} as {text!r}"
    for name in ("tanh_lr1", "owt_relu_peak", "skipped"):
        assert quoted[name] in readme, f"README should quote {name} as {quoted[name]!r}"
    seconds = f"{result['seconds']:.0f} s"
    assert f"in {seconds} on" in readme, f"README should give the committed run's time, {seconds}"
