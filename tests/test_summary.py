"""The summary table is read off the real model: totals, MACs, row order and the CLI's JSON line."""

import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import ml_collections
import pytest
from flax import nnx

from alexnet_jax.models import VARIANTS, create_model
from alexnet_jax.summary import layer_table, summarize

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def model_config(variant="owt", width=1.0, num_classes=1000):
    return ml_collections.ConfigDict(
        {"variant": variant, "num_classes": num_classes, "width": width, "dtype": "float32"}
    )


def real_param_count(config) -> int:
    model = nnx.eval_shape(lambda: create_model(config, rngs=nnx.Rngs(0)))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("width", [1.0, 0.25])
def test_totals_equal_the_models_parameter_count(variant, width):
    config = model_config(variant, width)
    rows = layer_table(config, 224)
    summary = summarize(config, 224)
    assert sum(row["params"] for row in rows) == real_param_count(config) == summary["total_params"]
    assert summary["total_macs"] == sum(row["macs"] for row in rows)


def test_owt_macs_at_224_match_the_hand_count():
    rows = {row["name"]: row for row in layer_table(model_config("owt"), 224)}
    assert rows["conv1"]["output_shape"] == [55, 55, 64]
    assert rows["conv1"]["macs"] == 55 * 55 * 64 * 11 * 11 * 3
    hand_count = (
        55 * 55 * 64 * 11 * 11 * 3
        + 27 * 27 * 192 * 5 * 5 * 64
        + 13 * 13 * 384 * 3 * 3 * 192
        + 13 * 13 * 256 * 3 * 3 * 384
        + 13 * 13 * 256 * 3 * 3 * 256
        + 6 * 6 * 256 * 4096
        + 4096 * 4096
        + 4096 * 1000
    )
    assert sum(row["macs"] for row in rows.values()) == hand_count
    assert 710e6 < hand_count < 720e6  # torchvision: 0.71 GFLOPS (counting MACs)


def test_grouped_convolutions_count_half_the_macs():
    rows = {row["name"]: row for row in layer_table(model_config("original"), 224)}
    # Each of conv2's 256 outputs sees only its own group's 48 of conv1's 96 channels.
    assert rows["conv2"]["macs"] == 27 * 27 * 256 * 5 * 5 * 48
    assert rows["conv3"]["macs"] == 13 * 13 * 384 * 3 * 3 * 256


def test_rows_follow_the_forward_pass_and_norms_cost_no_macs():
    rows = layer_table(model_config("bn", width=0.25), 96)
    names = [row["name"] for row in rows]
    assert names == ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "conv4", "bn4", "conv5", "bn5",
                     "fc6", "bn6", "fc7", "bn7", "fc8"]
    by_name = {row["name"]: row for row in rows}
    assert by_name["bn1"]["macs"] == 0 and by_name["bn1"]["params"] == 2 * 16
    assert by_name["bn1"]["output_shape"] == by_name["conv1"]["output_shape"] == [23, 23, 16]
    assert by_name["fc8"]["output_shape"] == [1000]


def write_config(tmp_path, image_size_line="config.data.image_size = 160"):
    path = tmp_path / "summary_config.py"
    path.write_text(textwrap.dedent(f"""
        import ml_collections

        def get_config():
            config = ml_collections.ConfigDict()
            config.model = ml_collections.ConfigDict(
                {{"variant": "owt", "num_classes": 1000, "width": 1.0, "dtype": "float32"}})
            config.data = ml_collections.ConfigDict()
            {image_size_line}
            return config
    """))
    return path


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "alexnet_jax.summary", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )


def test_cli_json_last_line(tmp_path):
    config_path = write_config(tmp_path)
    result = run_cli(f"--config={config_path}", "--config.model.variant=original", "--json")
    assert result.returncode == 0, result.stderr
    assert "Unable to initialize backend" not in result.stderr  # JAX probing for a TPU reads like an error
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["variant"] == "original" and report["image_size"] == 160
    assert report["total_params"] == 60_965_224
    assert [row["name"] for row in report["layers"]][:2] == ["conv1", "conv2"]
    assert set(report["layers"][0]) == {"name", "output_shape", "params", "macs"}
    assert report["total_macs"] == sum(row["macs"] for row in report["layers"])
    config = model_config("original")
    assert report["layers"] == layer_table(config, 160)
    assert "total" in result.stdout  # the human-readable table precedes the JSON


def test_cli_defaults_to_224_and_rejects_bad_config_with_exit_2(tmp_path):
    config_path = write_config(tmp_path, image_size_line="pass")
    result = run_cli(f"--config={config_path}", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["image_size"] == 224

    result = run_cli(f"--config={config_path}", "--config.model.variant=vgg")
    assert result.returncode == 2
    assert "model.variant" in result.stderr
