"""evaluate as a user runs it: only the eval data, the checkpoint's own view of an image unless the command line
says otherwise, and the same exact metrics from two processes as from one."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from alexnet_jax import checkpointing, inference
from conftest import REASSOCIATION, REPO, random_model_vars, run_cli, tiny_config

NAMES = ["apple", "bus", "cloud"]


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A checkpoint "trained" on a 3-class ImageFolder at 64 px (resize 72) with a 10-way head, and an eval
    ImageFolder of PNGs of unequal sizes. There is no train data anywhere."""
    base = tmp_path_factory.mktemp("folder_eval")
    config = tiny_config(source="imagefolder", variant="bn", **{"data.resize_size": 72})
    config.data.train_path = str(base / "train_data_gone")  # as saved by a run on another machine
    checkpointing.save_for_inference(str(base / "run"), random_model_vars(config.model, 7), config, NAMES,
                                     step=4)
    rng = np.random.default_rng(8)
    paths, labels = [], []
    for label, name in enumerate(NAMES):
        (base / "val" / name).mkdir(parents=True)
        for i, (h, w) in enumerate([(80, 110), (130, 90), (72, 72)]):
            tint = rng.uniform(0.2, 1.0, 3)
            pixels = np.clip(np.linspace(0, 255, w)[None, :, None] * tint + rng.normal(0, 30, (h, w, 3)), 0, 255)
            path = base / "val" / name / f"{i}.png"
            Image.fromarray(pixels.astype(np.uint8)).save(path)
            paths.append(str(path))
            labels.append(label)
    return base / "run", base / "val", paths, np.array(labels)


def _imagenet_config_args(folder_run, workers=0):
    """workers=None: configs/imagenet.py's own (-1, auto)."""
    workdir, val, _, _ = folder_run
    return ["--config=configs/imagenet.py", f"--workdir={workdir}", f"--config.data.eval_path={val}",
            *([] if workers is None else [f"--config.data.workers={workers}"]), "--config.batch_size=4", "--json"]


@pytest.fixture(scope="module")
def imagenet_config_eval(folder_run):
    """With grain worker processes, as a large split gets them."""
    return run_cli("alexnet_jax.evaluate", *_imagenet_config_args(folder_run, workers=2), "--per-class")


def test_imagenet_config_evaluates_an_image_folder_without_train_data(folder_run, imagenet_config_eval):
    """configs/imagenet.py (224 px, no train_path) on a checkpoint trained at 64 px: it needs only the eval
    folder, labels it with the checkpoint's class names and evaluates at the checkpoint's 64 px. The numbers are
    those of the Python API on the same files."""
    workdir, _, paths, labels = folder_run
    result = imagenet_config_eval
    assert result.returncode == 0, result.stderr[-3000:]
    out = _last_json(result.stdout)
    assert out["image_size"] == 64 and out["resize_size"] == 72 and "note" not in out
    assert out["checkpoint_step"] == 4 and out["eval_examples"] == 9
    probs = inference.load(workdir).probabilities(paths)
    # Batches of 4 there, of 9 here: float32 reassociation.
    assert out["eval_loss"] == pytest.approx(-np.mean(np.log(probs[np.arange(9), labels])),
                                             rel=REASSOCIATION["rtol"], abs=REASSOCIATION["atol"])
    assert out["eval_top1"] == pytest.approx(np.mean(probs.argmax(-1) == labels), abs=1e-9)

    # A 10-way head with 3 class names: every output has a row, the unnamed ones by number.
    confusion = np.load(out["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == 9
    np.testing.assert_array_equal(confusion.sum(axis=1), [3, 3, 3] + [0] * 7)
    np.testing.assert_array_equal(confusion.sum(axis=0), np.bincount(probs.argmax(-1), minlength=10))
    rows = out["per_class"]
    assert [r["class"] for r in rows] == NAMES + [f"class {i}" for i in range(3, 10)]
    with open(out["confusion_matrix_csv"], encoding="utf-8") as f:
        assert f.readline().strip().split(",")[1:] == NAMES + [f"class {i}" for i in range(3, 10)]
    assert "at 64 px" in result.stdout
    # The workers' batches are freed before exit: no "resource_tracker: ... leaked shared_memory objects".
    assert "leaked" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    hidden = sum(1 for r in rows if not r["support"] and not r["predicted"])
    assert f"({hidden} classes with no examples and no predictions not shown)" in result.stdout
    assert hidden == 7 - len(set(probs.argmax(-1).tolist()) - {0, 1, 2})


def test_explicit_command_line_overrides_win_over_the_checkpoints_view(folder_run, imagenet_config_eval):
    at_64 = _last_json(imagenet_config_eval.stdout)
    result = run_cli("alexnet_jax.evaluate", *_imagenet_config_args(folder_run), "--config.data.image_size=96",
                     "--config.data.resize_size=110")
    assert result.returncode == 0, result.stderr[-3000:]
    out = _last_json(result.stdout)
    assert out["image_size"] == 96 and out["resize_size"] == 110
    assert out["note"] == ("evaluated with data.image_size=96, data.resize_size=110; the checkpoint was trained "
                           "with data.image_size=64, data.resize_size=72")
    assert out["eval_loss"] != pytest.approx(at_64["eval_loss"], abs=1e-6)  # really another view
    assert "note: evaluated with data.image_size=96" in result.stdout


def test_the_readme_evaluate_example_moves_resize_size_with_image_size(tmp_path, folder_run):
    """`evaluate --config=configs/digits.py --workdir=runs/digits --config.data.image_size=96` as the README writes
    it: the checkpoint's resize_size (64, ratio 1) follows to 96; another checkpoint's ratio (72/64) is its own."""
    config = tiny_config(source="digits", variant="bn")
    workdir = tmp_path / "runs" / "digits"
    checkpointing.save_for_inference(str(workdir), random_model_vars(config.model, 3), config,
                                     [str(d) for d in range(10)], step=2)
    result = run_cli("alexnet_jax.evaluate", "--config=configs/digits.py", f"--workdir={workdir}",
                     "--config.data.image_size=96", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    out = _last_json(result.stdout)
    assert (out["image_size"], out["resize_size"], out["eval_examples"]) == (96, 96, 359)  # 20 % of 1,797
    notes = [line for line in result.stderr.splitlines() if "follows data.image_size" in line]
    assert len(notes) == 1 and "at the checkpoint's ratio 64/64" in notes[0], result.stderr[-3000:]

    result = run_cli("alexnet_jax.evaluate", *_imagenet_config_args(folder_run, workers=None),
                     "--config.data.image_size=96")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _last_json(result.stdout)["resize_size"] == 96 * 72 // 64
    # imagenet.py's data.workers=-1 starts no worker process for 9 images (8 of them took a minute to start).
    auto = [line for line in result.stderr.splitlines() if "data.workers=-1 (auto)" in line]
    assert len(auto) == 1 and "0 worker process(es) for eval: 9 images to decode" in auto[0], result.stderr[-3000:]


def test_converted_records_read_as_image_folders_say_what_they_are(tmp_path, folder_run):
    """configs/imagenet.py reads image folders; an eval_path of converted records gets one line saying so."""
    _, val, _, _ = folder_run
    converted = run_cli("alexnet_jax.data.convert", f"--src={val}", f"--dst={tmp_path / 'val-ar'}", "--shards=1",
                        "--resize=72", "--workers=1")
    assert converted.returncode == 0, converted.stderr[-3000:]
    result = run_cli("alexnet_jax.evaluate", *_imagenet_config_args(folder_run),
                     f"--config.data.eval_path={tmp_path / 'val-ar'}")
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: config: data.eval_path: {tmp_path / 'val-ar'} holds records written by "
                      "alexnet_jax.data.convert (manifest.json), not image folders: set data.source=arrayrecord"]
    fixed = run_cli("alexnet_jax.evaluate", *_imagenet_config_args(folder_run),
                    f"--config.data.eval_path={tmp_path / 'val-ar'}", "--config.data.source=arrayrecord")
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert _last_json(fixed.stdout)["eval_examples"] == 9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_metrics_of_one(tmp_path):
    """The digits held-out split (359 examples: the last global batch is padded) over 2 processes with one
    device each, joined over loopback: the same sums, so the same metrics and confusion matrix as 1 process."""
    config = tiny_config(source="digits", variant="bn")
    checkpointing.save_for_inference(str(tmp_path / "run"), random_model_vars(config.model, 9), config,
                                     [str(d) for d in range(10)], step=2)
    args = ["--config=configs/digits.py", "--config.batch_size=16", "--per-class", "--json"]
    single_dir, multi_dir = tmp_path / "single", tmp_path / "multi"
    for d in (single_dir, multi_dir):  # each its own copy: confusion files land beside the checkpoints
        subprocess.run(["cp", "-r", str(tmp_path / "run"), str(d)], check=True)
    one_device = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "alexnet_jax.evaluate", f"--workdir={multi_dir}", *args,
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        cwd=REPO, env=one_device, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]
    assert "eval_loss" not in outputs[1][0] and "eval_loss" in outputs[0][0]  # one process reports
    multi = _last_json(outputs[0][0])
    single = _last_json(run_cli("alexnet_jax.evaluate", f"--workdir={single_dir}", *args, env={
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}).stdout)
    assert multi["processes"] == 2 and multi["devices"] == 2 and single["processes"] == 1
    assert multi["eval_examples"] == single["eval_examples"] == 359
    for key in ("eval_top1", "eval_top5"):
        assert multi[key] == single[key]  # counts over the same examples: exactly equal
    assert multi["eval_loss"] == pytest.approx(single["eval_loss"], rel=REASSOCIATION["rtol"])  # 2 devices vs 1
    np.testing.assert_array_equal(np.load(multi["confusion_matrix"]), np.load(single["confusion_matrix"]))
    assert multi["confusion_matrix"] == str(multi_dir / "confusion_2.npy")
