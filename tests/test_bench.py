"""`python -m alexnet_jax.bench step|loop|e2e|pipeline` as a user runs them, on a tiny config: the JSON line's
keys and that every measured number is a positive finite number. No thresholds on wall-clock numbers: they depend on the
machine and its load.

The three runs share the session's JAX compilation cache (conftest; the same train step at the same shapes), so
only the first pays XLA:CPU's compile; compile_s is still measured (cache load) and positive.
"""

import json
import math

import pytest

from conftest import run_cli

TINY = ["--config.model.width=0.0625", "--config.data.image_size=64", "--config.data.resize_size=72",
        "--config.batch_size=8", "--steps=3", "--warmup=1"]

TIMINGS = ("img_per_s", "ms_per_step", "ms_per_step_synced_median", "img_per_s_synced_median", "compile_s", "init_s")
COMMON = (*TIMINGS, "bench", "host_ms_per_step", "device", "device_kind", "platform", "device_count", "jax",
          "variant", "width", "dtype", "image_size", "global_batch", "steps", "warmup", "final_loss",
          "load_average_1m", "cpu_count", "mfu", "peak_tflops", "step_gflops")
# loop and e2e time the bare step in the same process as the fed loop
FED = ("workers", "first_batch_s", "resize_size", "augment", "data", "step_img_per_s", "loop_img_per_s",
       "loop_to_step", "step_mfu")

CASES = {
    "step": ([], ()),
    "loop": (["--workers=0"], FED),
    "e2e": (["--workers=1", "--images=16"], (*FED, "images", "mean_file_kb")),
}


@pytest.mark.parametrize("bench", list(CASES))  # step first: it fills the compilation cache for the other two
def test_bench_reports_positive_finite_numbers_with_their_device(bench):
    args, extra_keys = CASES[bench]
    result = run_cli("alexnet_jax.bench", bench, "--json", *TINY, *args, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Unable to initialize backend" not in result.stderr  # JAX probing for a TPU reads like an error
    lines = result.stdout.strip().splitlines()
    report = json.loads(lines[-1])

    assert report["bench"] == bench
    missing = [k for k in (*COMMON, *extra_keys) if k not in report]
    assert not missing, missing
    for key in TIMINGS:
        value = report[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)
    assert math.isfinite(report["host_ms_per_step"]) and report["host_ms_per_step"] >= 0
    assert math.isfinite(report["final_loss"]) and report["skipped_steps"] == 0
    assert report["device_count"] >= 1 and report["device_kind"] and report["platform"]
    assert report["device"] == f"{report['platform']}: {report['device_kind']} x {report['device_count']}"
    assert (report["variant"], report["width"], report["dtype"]) == ("owt", 0.0625, "float32")
    assert (report["image_size"], report["global_batch"], report["steps"], report["warmup"]) == (64, 8, 3, 1)
    # The img/s and ms/step of one run describe the same steps.
    assert report["img_per_s"] == pytest.approx(8 * 1000 / report["ms_per_step"], rel=1e-2)

    # Every printed measurement names the device it came from.
    measured = [line for line in lines[:-1] if "img/s" in line or "ms/step" in line or "compile" in line]
    assert measured and all(report["device"] in line for line in measured), lines[:-1]

    # No peak FLOP/s is known for a CPU, so no MFU; the FLOPs come from the compiled step all the same.
    assert report["peak_tflops"] == "unknown" and report["mfu"] == "unknown"
    assert report["step_gflops"] > 0

    if bench != "step":
        assert report["loop_img_per_s"] == report["img_per_s"]
        assert report["step_img_per_s"] > 0
        assert report["loop_to_step"] == pytest.approx(report["loop_img_per_s"] / report["step_img_per_s"], abs=2e-3)
        assert report["first_batch_s"] > 0 and report["workers"] == (1 if bench == "e2e" else 0)
    if bench == "e2e":
        assert report["images"] == 16 and report["mean_file_kb"] > 10  # photo-like JPEGs, not flat colour


def test_help_names_the_subcommands_and_the_flags():
    result = run_cli("alexnet_jax.bench", "--help")  # absl's --help exits 1, as for every other command
    for word in ("step", "loop", "pipeline", "e2e", "layers", "--config.KEY=VALUE", "--steps", "--warmup",
                 "--workers", "--images", "--json", "--torch"):
        assert word in result.stdout, word


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_step_with_torch_times_the_pytorch_reference_in_the_same_process():
    pytest.importorskip("torch")
    result = run_cli("alexnet_jax.bench", "step", "--torch", "--json", *TINY, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert _positive(report["torch_img_per_s"]) and _positive(report["torch_ms_per_step"])
    assert report["jax_to_torch"] == pytest.approx(report["img_per_s"] / report["torch_img_per_s"], abs=2e-3)
    assert report["torch_device"] == "cpu: cpu" and report["torch"]
    torch_lines = [line for line in lines[:-1] if line.lstrip().startswith("torch ")]
    assert len(torch_lines) == 1 and "ours/torch" in torch_lines[0] and "[cpu: cpu]" in torch_lines[0]


def test_layers_times_every_convolution_and_pool_beside_pytorch():
    """bench layers at the tiny model's shapes: the five convolutions (their inputs follow the model's pooling)
    and three pools, each op timed; PyTorch's results on the same inputs match ours, so the rows compare the same
    work; the step total is the sum the docstring describes (conv1's input gradient left out)."""
    pytest.importorskip("torch")
    result = run_cli("alexnet_jax.bench", "layers", "--torch", "--json", *TINY, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    convs, pools = report["convolutions"], report["pools"]
    assert [c["layer"] for c in convs] == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    # width 1/16 of 64-192-384-256-256 at 64 px, batch 8: 64 -> conv1 15 -> pool 7 -> conv2 7 -> pool 3
    assert [c["input"] for c in convs] == [[8, 64, 64, 3], [8, 7, 7, 4], [8, 3, 3, 12], [8, 3, 3, 24], [8, 3, 3, 16]]
    assert convs[0]["kernel"] == [11, 11, 3, 4] and convs[0]["stride"] == 4
    assert [p["input"] for p in pools] == [[8, 15, 15, 4], [8, 7, 7, 12], [8, 3, 3, 16]]
    for row in convs:
        for key in ("fwd_ms", "dx_ms", "dw_ms", "torch_fwd_ms", "torch_dx_ms", "torch_dw_ms"):
            assert _positive(row[key]), (row["layer"], key)
        for op in ("fwd", "dx", "dw"):
            assert row[f"{op}_rel_diff"] < 1e-4, (row["layer"], op, row[f"{op}_rel_diff"])
    for row in pools:
        for key in ("fwd_ms", "grad_xla_ms", "grad_slices_ms", "torch_fwd_ms", "torch_grad_ms"):
            assert _positive(row[key]), (row["layer"], key)
    assert report["max_pool_grad"] == "slices"  # model.max_pool_grad=auto on a CPU
    expected = (sum(c["fwd_ms"] + c["dw_ms"] for c in convs) + sum(c["dx_ms"] for c in convs[1:])
                + sum(p["fwd_ms"] + p["grad_slices_ms"] for p in pools))
    assert report["train_ops_ms"] == pytest.approx(expected, abs=0.01)
    assert _positive(report["torch_train_ops_ms"])
    assert report["device"] in lines[0] and "load average" in lines[0] and report["device"] in lines[-2]


PIPELINE_KEYS = ("pipeline_img_per_s", "pipeline_1worker_img_per_s", "pil_baseline_img_per_s",
                 "pil_baseline_parallel_img_per_s", "raw_records_1worker_img_per_s", "raw_records_img_per_s",
                 "memcpy_gb_per_s", "raw_records_1worker_memcpy_fraction", "raw_records_memcpy_fraction",
                 "stored_pixels_1worker_img_per_s", "stored_pixels_1worker_memcpy_fraction",
                 "pixel_shards_1worker_img_per_s", "pixel_shards_img_per_s", "pixel_shards_1worker_memcpy_fraction",
                 "pixel_shards_memcpy_fraction", "pixel_shards_1worker_cpu_ms_per_img", "pixel_shards_cpu_ms_per_img",
                 "pixel_shards_in_process_img_per_s", "pixel_shards_in_process_memcpy_fraction")


def test_pipeline_reports_jpeg_and_raw_record_rates_with_its_device():
    result = run_cli("alexnet_jax.bench", "pipeline", "--json", "--config.data.image_size=64",
                     "--config.data.resize_size=72", "--config.batch_size=8", "--images=16", "--workers=1",
                     timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    for key in (*PIPELINE_KEYS, "pipeline_cpu_ms_per_img", "raw_records_1worker_cpu_ms_per_img"):
        assert isinstance(report[key], float) and math.isfinite(report[key]) and report[key] > 0, key
    assert (report["images"], report["workers"], report["batch_size"]) == (16, 1, 8)
    assert (report["image_size"], report["resize_size"]) == (64, 72)
    # Raw records hold the pixels at short side 72: about 72 x 96 x 3 bytes for a 4:3 photo, plus a header.
    assert 15 < report["raw_record_kb"] < 40 and report["mean_file_kb"] > 10
    # raw_record_bytes counts the stored pixels alone: h x w x 3 with the short side 72, no header
    assert isinstance(report["raw_record_bytes"], int)
    assert 72 * 72 * 3 <= report["raw_record_bytes"] < report["raw_record_kb"] * 1024
    for n in ("1worker_", ""):
        assert report[f"raw_records_{n}memcpy_fraction"] == pytest.approx(
            report[f"raw_records_{n}img_per_s"] * report["raw_record_bytes"] / (report["memcpy_gb_per_s"] * 1e9),
            rel=0.02, abs=1e-4)
    # --center_crop records at short side 72 are 72 x 72 x 3 each, shipped whole
    assert report["stored_pixel_bytes"] == 72 * 72 * 3
    assert report["stored_pixels_1worker_memcpy_fraction"] == pytest.approx(
        report["stored_pixels_1worker_img_per_s"] * 72 * 72 * 3 / (report["memcpy_gb_per_s"] * 1e9), rel=0.02, abs=1e-4)
    # pixel shards hold the same 72 x 72 x 3 pixels a record; records and shards are timed in an epoch of ImageNet's
    # train split's size
    assert report["raw_records_epoch_examples"] == 1_281_167
    for n in ("1worker_", "", "in_process_"):
        assert report[f"pixel_shards_{n}memcpy_fraction"] == pytest.approx(
            report[f"pixel_shards_{n}img_per_s"] * 72 * 72 * 3 / (report["memcpy_gb_per_s"] * 1e9), rel=0.02, abs=1e-4)
    assert report["device"] in lines[0] and "load average" in lines[0]


@pytest.mark.parametrize("args, named", [
    (["step", "--config.model.no_such_key=1"], "model.no_such_key"),
    (["loop", "--config.batch_size=abc"], "config.batch_size"),
    (["e2e", "--steps=0"], "--steps"),
    (["pipeline", "--data=/no/such/dir"], "--data"),
    (["train"], "step | loop | pipeline | e2e | layers"),
    ([], "step | loop | pipeline | e2e | layers"),
    (["step", "--torch", "--config.model.variant=original"], "model.variant=original"),
    (["step", "--config=configs/no_such_file.py"], "no_such_file.py"),
])
def test_bad_usage_exits_2_naming_the_flag(args, named):
    result = run_cli("alexnet_jax.bench", *args)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0], result.stderr


def test_mfu_uses_the_peak_of_the_device_kind_and_is_unknown_elsewhere():
    from alexnet_jax import bench

    # device_kind strings as jax reports them
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops("NVIDIA H200") == 989.0
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_tflops("TPU v4") == 275.0
    assert bench.peak_tflops("TPU v5 lite") == 197.0
    assert bench.peak_tflops("TPU v5") == 459.0
    assert bench.peak_tflops("TPU v6 lite") == 918.0
    assert bench.peak_tflops("cpu") is None
    # 494.5 TFLOP in a 1 s step on a 989 TFLOP/s chip: half its peak
    assert bench.mfu(494.5e12, 1.0, "NVIDIA H100 80GB HBM3") == 0.5
    assert bench.mfu(494.5e12, 1.0, "cpu") == "unknown"
    assert bench.mfu(None, 1.0, "TPU v4") == "unknown"


def test_the_default_config_is_added_only_when_none_is_named():
    from alexnet_jax.bench import common as bench

    assert bench.with_default_config(["bench", "step"]) == ["bench", f"--config={bench.DEFAULT_CONFIG}", "step"]
    for named in (["bench", "step", "--config=configs/digits.py"], ["bench", "--config", "c.py", "loop"]):
        assert bench.with_default_config(named) == named
    assert bench.with_default_config(["bench", "step", "--config.batch_size=8"])[1].startswith("--config=")
