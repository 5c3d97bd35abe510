"""Inference anywhere: a checkpoint trained on 4 devices (fc6/fc7 split over 'model') evaluates and predicts on 1.

One real training run (4 simulated CPU devices, mesh 2x2, BatchNorm variant so statistics matter) is shared by
the tests; evaluation and prediction run in separate 1-device processes, as a user would run them.
"""

import base64
import csv
import functools
import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from alexnet_jax import checkpointing, evaluate, inference, models
from alexnet_jax import config as config_lib
from alexnet_jax.data import sources
from conftest import REPO, run_cli

NUM_EVAL = 359  # digits held-out split
ONE_DEVICE = {"XLA_FLAGS": ""}  # whatever the caller's environment forces, these processes see one CPU device
# Four simulated devices for training. LLVM optimisation off: XLA:CPU spends ~20 s optimising the one-off random
# initialisation of even a tiny AlexNet; at -O0 it takes ~2 s, and results match to float rounding, which the
# 1e-5 comparison against the default-optimised 1-device evaluation below absorbs.
FOUR_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"}


@pytest.fixture(scope="module")
def four_device_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("four_devices") / "run"
    result = run_cli(
        "alexnet_jax.main", "--config=configs/digits.py", f"--workdir={workdir}", "--config.model.width=0.0625",
        "--config.batch_size=16", "--config.num_train_steps=3", "--config.mesh.model=2",
        "--config.log_every_steps=1", "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2",
        env=FOUR_DEVICES)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 4 devices" in result.stderr and "'model': 2" in result.stderr, result.stderr[-3000:]
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    eval_rows = {r["step"]: r for r in rows if "eval_loss" in r}
    assert sorted(eval_rows) == [2, 3] and sorted(os.listdir(workdir / "checkpoints")) == ["2", "3"]
    return workdir, eval_rows


def _digits_config():
    spec = importlib.util.spec_from_file_location("digits_config", os.path.join(REPO, "configs", "digits.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.batch_size = 16
    return config


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_the_training_run_really_split_the_classifier_over_the_model_axis(four_device_run):
    workdir, _ = four_device_run
    with open(workdir / "checkpoints" / "3" / "model" / "_sharding") as f:
        stored = {base64.b64decode(k).decode(): json.loads(v) for k, v in json.load(f).items()}
    fc6 = stored["params.fc6.kernel"]
    assert fc6["shape"] == [2, 2] and fc6["partition_spec"] == [None, "model"], fc6
    assert stored["batch_stats.bn6.mean"]["partition_spec"] == ["model"]


def test_four_device_checkpoint_evaluates_identically_on_one_device(four_device_run):
    """A separate 1-device process, --checkpoint=2, --per-class: the headline numbers equal the training run's
    eval row for step 2, and the confusion matrix's rows are the true labels of the split."""
    workdir, eval_rows = four_device_run
    result = run_cli("alexnet_jax.evaluate", "--config=configs/digits.py", f"--workdir={workdir}",
                     "--config.batch_size=16", "--checkpoint=2", "--json", "--per-class", env=ONE_DEVICE)
    assert result.returncode == 0, result.stderr[-3000:]
    out = _last_json(result.stdout)
    assert out["devices"] == 1 and out["checkpoint_step"] == 2 and out["eval_examples"] == NUM_EVAL
    for key in ("eval_loss", "eval_top1", "eval_top5"):
        assert out[key] == pytest.approx(eval_rows[2][key], abs=1e-5), key
        assert f"{key} " in result.stdout  # the human-readable lines too
    # Step 2 and step 3 differ, so matching step 2's row shows --checkpoint picked it.
    assert out["eval_loss"] != pytest.approx(eval_rows[3]["eval_loss"], abs=1e-5)

    confusion = np.load(out["confusion_matrix"])
    assert out["confusion_matrix"] == str(workdir / "confusion_2.npy")
    held_out = sources.DigitsSource("eval", 8)
    labels = np.array([held_out[i]["label"] for i in range(len(held_out))])
    np.testing.assert_array_equal(confusion.sum(axis=1), np.bincount(labels, minlength=10))
    assert confusion.sum() == NUM_EVAL
    assert np.trace(confusion) / NUM_EVAL == pytest.approx(out["eval_top1"], abs=1e-12)
    rows = out["per_class"]
    assert [r["class"] for r in rows] == [str(d) for d in range(10)]
    for i, r in enumerate(rows):
        assert r["recall"] == pytest.approx(confusion[i, i] / confusion[i].sum())
        predicted = confusion[:, i].sum()
        assert r["precision"] == pytest.approx(confusion[i, i] / predicted if predicted else 0.0)
    assert out["mean_recall"] == pytest.approx(np.mean([r["recall"] for r in rows]))
    assert out["mean_precision"] == pytest.approx(np.mean([r["precision"] for r in rows]))
    with open(out["confusion_matrix_csv"], newline="") as f:
        table = list(csv.reader(f))
    assert table[0][1:] == [str(d) for d in range(10)]
    assert np.array([[int(v) for v in row[1:]] for row in table[1:]]).tolist() == confusion.tolist()


def test_newest_checkpoint_evaluates_in_process_like_the_training_run(four_device_run):
    """The default (newest) checkpoint, through evaluate_checkpoint and train.evaluate's plain path."""
    workdir, eval_rows = four_device_run
    data_config = _digits_config()
    result, confusion, class_names = evaluate.evaluate_checkpoint(str(workdir), data_config)
    assert confusion is None and class_names == [str(d) for d in range(10)]
    assert result["checkpoint_step"] == 3 and result["devices"] == jax.device_count()
    for key in ("eval_loss", "eval_top1", "eval_top5"):
        assert result[key] == pytest.approx(eval_rows[3][key], abs=1e-5), key
    data_config.data.source = "imagefolder"  # with no eval_path: named, before anything compiles
    with pytest.raises(config_lib.ConfigError, match="data.eval_path"):
        evaluate.evaluate_checkpoint(str(workdir), data_config)


def test_masked_predictions_mark_padding_rows(four_device_run):
    workdir, _ = four_device_run
    config, _, model_vars, _ = checkpointing.load_for_inference(str(workdir))
    _, eval_def = models.model_graphdefs(config.model)
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8), "label": np.zeros(6, np.int32),
             "mask": np.array([True, True, False, True, False, False])}
    fn = jax.jit(functools.partial(evaluate.masked_predictions, graphdef=eval_def, dtype=np.float32))
    got = np.asarray(fn(model_vars, batch))
    probs = np.asarray(inference.probabilities_fn(config)(model_vars, batch["image"]))
    np.testing.assert_array_equal(got, np.where(batch["mask"], probs.argmax(-1), -1))


def test_per_class_metrics_handle_absent_and_never_predicted_classes():
    confusion = np.array([[3, 1, 0],    # class 0: 4 examples, 3 right
                          [0, 0, 2],    # class 1: 2 examples, never predicted
                          [0, 0, 0]])   # class 2: absent from the split, predicted twice
    report = evaluate.per_class_metrics(confusion, ["a", "b", "c"])
    rows = report["per_class"]
    assert rows[0]["precision"] == 1.0 and rows[0]["recall"] == 0.75
    assert rows[1]["precision"] == 0.0 and rows[1]["recall"] == 0.0
    assert rows[2]["precision"] == 0.0 and rows[2]["recall"] is None and rows[2]["support"] == 0
    assert report["mean_recall"] == pytest.approx(0.375)  # over the two classes present
    assert report["mean_precision"] == pytest.approx(0.5)


def test_checkpoint_loads_replicated_on_this_machine(four_device_run):
    workdir, _ = four_device_run
    config, class_names, model_vars, step = checkpointing.load_for_inference(str(workdir), 2)
    assert step == 2 and class_names == [str(d) for d in range(10)] and config.mesh.model == 2
    assert set(model_vars) == {"params", "batch_stats"}  # no optimizer state read
    for leaf in jax.tree.leaves(model_vars):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == jax.device_count()
    with pytest.raises(checkpointing.CheckpointNotFound, match=r"step 7 .*have: \[2, 3\]"):
        checkpointing.load_for_inference(str(workdir), 7)


def test_predict_checkpoint_flag_picks_that_step(four_device_run, tmp_path):
    workdir, _ = four_device_run
    image = sources.DigitsSource("eval", 64)[0]["image"]
    path = tmp_path / "digit.png"  # lossless, so the in-process reference sees the same pixels
    Image.fromarray(image).save(path)
    result = run_cli("alexnet_jax.predict", f"--workdir={workdir}", "--checkpoint=2", "--top_k=10", "--json",
                     str(path), env=ONE_DEVICE)
    assert result.returncode == 0, result.stderr[-3000:]
    out = _last_json(result.stdout)
    assert out["checkpoint_step"] == 2
    got = {t["label"]: t["probability"] for t in out["predictions"][0]["top"]}
    assert len(got) == 10

    expected, probabilities = {}, None
    for step in (2, 3):
        config, _, model_vars, _ = checkpointing.load_for_inference(str(workdir), step)
        probabilities = probabilities or inference.probabilities_fn(config)
        loaded = inference.load_image(str(path), config.data.image_size, config.data.resize_size)
        expected[step] = np.asarray(probabilities(model_vars, loaded[None]))[0]
    np.testing.assert_allclose([got[i] for i in range(10)], expected[2], atol=1e-6)
    assert np.abs(expected[2] - expected[3]).max() > 1e-4  # the two steps are distinguishable
