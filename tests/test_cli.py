"""The command lines as a user runs them: config errors, a tiny real training run, predict on a JPEG, summary."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from alexnet_jax import checkpointing
from conftest import run_cli

TINY = ["--config.model.width=0.0625", "--config.batch_size=16", "--config.num_train_steps=3",
        "--config.log_every_steps=1", "--config.eval_every_steps=3"]


@pytest.mark.parametrize("override, key", [
    ("--config.model.variant=vgg", "model.variant"),
    ("--config.optim.learning_rate=-0.1", "optim.learning_rate"),
    ("--config.data.source=imagefolder", "data.train_path"),
    ("--config.batch_size=63", "batch_size"),
    ("--config.data.worker_threads=-1", "data.worker_threads"),
    ("--config.data.workers=-2", "data.workers"),  # -1 is auto, other negatives mean nothing
    ("--config.data.worker_buffer=0", "data.worker_buffer"),
    ("--config.model.max_pool_grad=fast", "model.max_pool_grad"),
])
def test_bad_config_exits_2_naming_the_key_and_writes_nothing(tmp_path, override, key):
    workdir = tmp_path / "run"
    # Two simulated devices, so an odd batch cannot be split over the 'data' axis.
    result = run_cli("alexnet_jax.main", "--config=configs/digits.py", f"--workdir={workdir}", override,
                     env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and key in error_lines[0], result.stderr[-2000:]
    assert not workdir.exists()


@pytest.mark.parametrize("overrides, key", [
    (["--config.optim.grad_accum_steps=0"], "optim.grad_accum_steps"),
    # 64 examples over 2 devices: 32 each, which 3 micro-batches cannot split.
    (["--config.optim.grad_accum_steps=3"], "optim.grad_accum_steps"),
    (["--config.optim.label_smoothing=1.0"], "optim.label_smoothing"),
    (["--config.optim.optimizer=lars", "--config.optim.lars_trust_coefficient=0"], "optim.lars_trust_coefficient"),
    (["--config.optim.schedule=polynomial", "--config.optim.polynomial_power=-2"], "optim.polynomial_power"),
])
def test_bad_large_batch_settings_exit_2_naming_the_key(tmp_path, overrides, key):
    workdir = tmp_path / "run"
    result = run_cli("alexnet_jax.main", "--config=configs/digits.py", f"--workdir={workdir}", *overrides,
                     env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and key in error_lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not workdir.exists()


def test_lars_recipe_trains_with_micro_batches_and_label_smoothing(tmp_path):
    """configs/imagenet_lars.py shrunk to a tiny synthetic run on 2 devices, each step as 2 micro-batches."""
    workdir = tmp_path / "run"
    result = run_cli("alexnet_jax.main", "--config=configs/imagenet_lars.py", f"--workdir={workdir}", *TINY,
                     "--config.data.source=synthetic", "--config.data.synthetic_examples=64",
                     "--config.data.image_size=64", "--config.data.resize_size=64", "--config.data.workers=0",
                     "--config.model.num_classes=10", "--config.optim.warmup_steps=2",
                     "--config.optim.grad_accum_steps=2", "--config.optim.label_smoothing=0.1",
                     env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train_rows = [r for r in rows if "train_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]  # one logged step per global batch
    # Linear warmup over 2 steps to 14, then (1 - t/T)^2 decay: steps 1..3 use the rates at 0, 1 and 2.
    assert [r["learning_rate"] for r in train_rows] == pytest.approx([0.0, 7.0, 14.0])
    assert all(np.isfinite(r["train_loss"]) and r["skipped_steps"] == 0 for r in train_rows)
    assert os.listdir(workdir / "checkpoints") == ["3"]


def test_missing_data_path_is_named(tmp_path):
    result = run_cli("alexnet_jax.main", "--config=configs/imagenet.py", f"--workdir={tmp_path / 'run'}",
                     "--config.data.train_path=/nonexistent/train", f"--config.data.eval_path={tmp_path}")
    assert result.returncode == 2
    assert "data.train_path" in result.stderr and "/nonexistent/train" in result.stderr


def test_train_then_predict_a_written_jpeg(tmp_path):
    workdir = tmp_path / "run"
    result = run_cli("alexnet_jax.main", "--config=configs/digits.py", f"--workdir={workdir}", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "img/s" in result.stderr and "ETA" in result.stderr
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train_rows = [r for r in rows if "train_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for key in ("train_loss", "train_top1", "learning_rate", "grad_norm", "img_per_s", "skipped_steps"):
        assert key in train_rows[0]
    assert {"eval_loss", "eval_top1", "eval_top5"} <= set(rows[-1])
    assert os.listdir(workdir / "checkpoints") == ["3"]

    from sklearn.datasets import load_digits

    digits = load_digits()
    image = Image.fromarray(np.round(digits.images[0] * 255 / 16).astype(np.uint8)).resize((64, 64))
    good, bad = tmp_path / "digit.jpg", tmp_path / "broken.jpg"
    image.save(good)
    bad.write_bytes(b"not a jpeg")
    result = run_cli("alexnet_jax.predict", f"--workdir={workdir}", "--json", str(good), str(bad))
    assert result.returncode == 1  # one file failed
    assert "broken.jpg" in result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["checkpoint_step"] == 3
    [pred] = out["predictions"]
    assert len(pred["top"]) == 5 and pred["file"] == str(good)
    assert sum(t["probability"] for t in pred["top"]) <= 1.0 + 1e-6
    assert out["errors"][0]["file"] == str(bad)

    # Rerunning the same command with more steps resumes instead of starting over.
    result = run_cli("alexnet_jax.main", "--config=configs/digits.py", f"--workdir={workdir}", *TINY[:-3],
                     "--config.num_train_steps=4", "--config.log_every_steps=1", "--config.eval_every_steps=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed" in result.stderr
    steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl") if "train_loss" in line]
    assert steps == [1, 2, 3, 4]


def test_predict_on_a_trained_digits_model_returns_the_digit(tmp_path):
    """A short but real digits training; every digit written as a JPEG must come back as its class."""
    workdir = tmp_path / "run"
    result = run_cli("alexnet_jax.main", "--config=configs/digits.py", f"--workdir={workdir}",
                     "--config.model.width=0.125", "--config.num_train_steps=120", "--config.log_every_steps=40",
                     "--config.eval_every_steps=120")
    assert result.returncode == 0, result.stderr[-3000:]
    from alexnet_jax.data.sources import DigitsSource

    held_out = DigitsSource("eval", 64)
    paths, labels = [], []
    for i in range(10):  # held-out examples: not seen in training
        example = held_out[i]
        path = tmp_path / f"held_out_{i}.jpg"
        Image.fromarray(example["image"]).save(path, quality=95)
        paths.append(str(path))
        labels.append(str(example["label"]))
    result = run_cli("alexnet_jax.predict", f"--workdir={workdir}", "--json", *paths)
    assert result.returncode == 0, result.stderr[-3000:]
    preds = json.loads(result.stdout.strip().splitlines()[-1])["predictions"]
    predicted = [p["top"][0]["class"] for p in preds]
    assert sum(p == t for p, t in zip(predicted, labels)) >= 9, (predicted, labels)


def test_help_lists_the_flags():
    result = run_cli("alexnet_jax.main", "--help")  # absl exits 1 after printing help; the text is what matters
    assert "Train AlexNet" in result.stdout
    for flag in ("--config", "--workdir", "--coordinator_address", "--num_processes", "--process_id"):
        assert flag in result.stdout


@pytest.mark.parametrize("args, named", [
    (["--config=configs/nope.py"], "configs/nope.py"),
    (["--config=configs/digits.py", "--config.model.foo=1"], "no config key model.foo"),
    (["--config=configs/digits.py", "--config.batch_size=abc"], "batch_size"),
    (["--config=configs/digits.py", "--no_workdir_given"], "no_workdir_given"),
    (["--config=configs/digits.py", "--distributed"], "cannot start the multi-process runtime"),  # no cluster here
    (["--config=configs/digits.py", "stray"], "unexpected arguments: stray"),  # not the whole help, exit 1
])
def test_bad_usage_exits_2_with_one_error_line(tmp_path, args, named):
    workdir = [] if "--no_workdir_given" in args else [f"--workdir={tmp_path / 'run'}"]
    result = run_cli("alexnet_jax.main", *args, *workdir)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_unknown_config_key_is_named_in_full_with_a_suggestion_and_keys_can_be_listed(tmp_path):
    result = run_cli("alexnet_jax.main", "--config=configs/digits.py", f"--workdir={tmp_path / 'run'}",
                     "--config.model.widht=0.25")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "error: no config key model.widht (did you mean model.width?)", result.stderr
    assert "--show_config" in lines[1] and not (tmp_path / "run").exists()
    shown = run_cli("alexnet_jax.main", "--config=configs/digits.py", "--show_config", "--config.model.width=0.5")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "width: 0.5" in shown.stdout and "spike_window" in shown.stdout and "train_path" in shown.stdout


def test_class_count_comes_from_the_training_folder(tmp_path):
    """configs/imagenet.py says 1000 classes; a 3-class folder trains a 3-way head, says so in one line, and the
    checkpoint predicts only classes that exist."""
    from test_imagenet_data import write_identity_folder

    write_identity_folder(str(tmp_path / "train"), num_classes=3, per_class=4)
    write_identity_folder(str(tmp_path / "val"), num_classes=3, per_class=2)
    workdir = tmp_path / "run"
    result = run_cli("alexnet_jax.main", "--config=configs/imagenet.py", f"--workdir={workdir}",
                     f"--config.data.train_path={tmp_path / 'train'}", f"--config.data.eval_path={tmp_path / 'val'}",
                     "--config.model.width=0.0625", "--config.data.image_size=64", "--config.data.resize_size=64",
                     "--config.data.workers=0", "--config.batch_size=6", "--config.num_train_steps=2",
                     "--config.log_every_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model.num_classes=1000 but" in result.stderr and "training a 3-way classifier" in result.stderr
    first_loss = json.loads(open(workdir / "metrics.jsonl").readline())["train_loss"]
    assert abs(first_loss - np.log(3)) < 0.5  # chance level of 3 classes, not of 1000 (6.9)
    image = tmp_path / "val" / sorted(os.listdir(tmp_path / "val"))[0]
    image = next(image.iterdir())
    predicted = run_cli("alexnet_jax.predict", f"--workdir={workdir}", "--json", str(image))
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    [prediction] = json.loads(predicted.stdout.strip().splitlines()[-1])["predictions"]
    assert len(prediction["top"]) == 3  # top-5 of a 3-way head: the three classes there are


def test_resize_size_follows_image_size_unless_set():
    import importlib.util

    from alexnet_jax import config as config_lib

    spec = importlib.util.spec_from_file_location("imagenet_config", "configs/imagenet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert config.data.resize_size == 256
    config.data.image_size = 64  # what --config.data.image_size=64 does
    assert config.data.resize_size == 73
    config.data.resize_size = 256  # set explicitly: a 64-px crop of a 256-px resize is a quarter of the side
    config.data.source = "synthetic"  # so the first problem reported is the crop, not the missing ImageNet
    with pytest.raises(config_lib.ConfigError, match="data.image_size=64 crops under half of data.resize_size"):
        config_lib.validate(config, 1)


def test_a_command_line_image_size_moves_resize_size_by_the_files_own_ratio(tmp_path):
    """configs/digits.py sets resize_size to a plain 64 (ratio 1): --config.data.image_size=96 alone trains at
    96/96, saying so in one line; configs/imagenet.py keeps 256/224; a command-line resize_size is kept."""
    workdir = tmp_path / "run"
    result = run_cli("alexnet_jax.main", "--config=configs/digits.py", f"--workdir={workdir}",
                     "--config.data.image_size=96", "--config.model.width=0.0625", "--config.batch_size=16",
                     "--config.num_train_steps=2", "--config.precise_bn_examples=0")
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stderr.splitlines() if "follows data.image_size" in line]
    assert len(notes) == 1 and "data.resize_size=96 follows data.image_size=96" in notes[0], result.stderr[-3000:]
    config, _, _, _ = checkpointing.load_for_inference(str(workdir))
    assert (config.data.image_size, config.data.resize_size) == (96, 96)

    def shown(*args):
        result = run_cli("alexnet_jax.main", *args, "--show_config")
        assert result.returncode == 0, result.stderr[-2000:]
        return int(re.search(r"resize_size: (\d+)", result.stdout).group(1))

    assert shown("--config=configs/imagenet.py", "--config.data.image_size=112") == 128
    assert shown("--config=configs/digits.py", "--config.data.image_size=96", "--config.data.resize_size=120") == 120
    assert shown("--config=configs/digits.py", "--config.data.resize_size=80") == 80


def test_profile_steps_writes_a_trace_into_the_workdir(tmp_path):
    workdir = tmp_path / "run"
    result = run_cli("alexnet_jax.main", "--config=configs/digits.py", f"--workdir={workdir}", *TINY,
                     "--config.profile_steps=1:3")
    assert result.returncode == 0, result.stderr[-3000:]
    traces = list((workdir / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0
    bad = run_cli("alexnet_jax.main", "--config=configs/digits.py", f"--workdir={workdir}",
                  "--config.profile_steps=3:1")
    assert bad.returncode == 2 and "error: config: profile_steps" in bad.stderr


@pytest.mark.parametrize("name, text, says", [
    ("raises.py", "import os\nraise RuntimeError('no data here')\n", "line 2: RuntimeError: no data here"),
    ("syntax.py", "def get_config(:\n    pass\n", "syntax error at line 1"),
    ("empty.py", "x = 1\n", "defines no get_config()"),
    ("config.yaml", "model:\n  width: 0.5\n", "config files are Python modules"),
    ("value.py", "def get_config():\n    raise ValueError('bad width')\n", "line 2: ValueError: bad width"),
    ("missing.py", None, "no such file"),
])
def test_a_config_file_that_fails_to_load_is_one_line_naming_it(tmp_path, name, text, says):
    config = tmp_path / name
    if text is not None:
        config.write_text(text)
    result = run_cli("alexnet_jax.main", f"--config={config}", f"--workdir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: config file {config}: "), result.stderr[-2000:]
    assert says in lines[0] and "Traceback" not in result.stderr and "config key" not in result.stderr
    assert not (tmp_path / "run").exists()
