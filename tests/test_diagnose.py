"""diagnose: a tiny real grid through the command line, as a user runs it."""

import json
import math

from conftest import run_cli


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
    assert len(json.loads((tmp_path / "diagnose.json").read_text())["runs"][0]["grad_norm_curve"]) == 6


def test_diagnose_rejects_a_bad_grid_with_exit_code_2(tmp_path):
    result = run_cli("alexnet_jax.diagnose", "--config=configs/digits.py", f"--workdir={tmp_path / 'd'}",
                     "--learning_rates=0.1,-1")
    assert result.returncode == 2
    assert "--learning_rates" in result.stderr
    assert not (tmp_path / "d").exists()
