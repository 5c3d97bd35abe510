"""alexnet_jax.inference: load a checkpoint and classify from Python with evaluation's own view and function;
the predict command on top of it; checkpoints that name fewer classes than the model has outputs."""

import io
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from alexnet_jax import checkpointing, inference, models, train
from alexnet_jax.data import imagefolder, pipeline, transforms
from conftest import REASSOCIATION, REPO, random_model_vars, run_cli, tiny_config

CLASSES = ["cat", "dog", "n01440764"]  # a WordNet id gets its words as "name"


def _checkpoint(workdir, class_names, *, resize_size=72, seed=0):
    """A random BatchNorm model (64 px crops of a 72 px short side, so the eval view really resizes and crops)."""
    config = tiny_config(variant="bn", **{"data.resize_size": resize_size})
    checkpointing.save_for_inference(str(workdir), random_model_vars(config.model, seed), config, class_names,
                                     step=7)
    return config


@pytest.fixture(scope="module")
def named_run(tmp_path_factory):
    """10 outputs, 10 names."""
    workdir = tmp_path_factory.mktemp("api") / "run"
    _checkpoint(workdir, [f"c{i}" for i in range(10)])
    return workdir


@pytest.fixture(scope="module")
def short_names_run(tmp_path_factory):
    """10 outputs but only 3 class names: a 1000-way head trained on a 3-class folder, in small."""
    workdir = tmp_path_factory.mktemp("short") / "run"
    _checkpoint(workdir, CLASSES, seed=1)
    return workdir


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An ImageFolder of PNGs (lossless: every way of handing one over gives the same pixels) of unequal sizes."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(3)
    paths = []
    for i, (h, w) in enumerate([(90, 120), (150, 100), (72, 72), (64, 200)]):
        (root / f"k{i % 2}").mkdir(exist_ok=True)
        path = root / f"k{i % 2}" / f"{i}.png"
        # Smooth pictures (a gradient plus noise), so resampling matters but the classes still differ.
        base = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.2, 1, (1, 1, 3))
        pixels = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return root, sorted(paths)


def _same_rows(probabilities, expected):
    """The same rows from forward passes of another batch size. The summation order changes with the batch
    shape, which moves the logits (here up to ~60 in size) by float32 rounding, i.e. by an absolute amount: an
    exp then turns that into a relative one. So they are compared as log-probabilities, to 1e-4: a row of
    another image is off by whole units."""
    np.testing.assert_allclose(np.log(probabilities), np.log(expected), rtol=REASSOCIATION["rtol"], atol=1e-4)


def test_predict_sees_what_evaluation_sees(named_run, folder):
    """Every kind of image gives the eval pipeline's own view and evaluation's log-probabilities, and
    `model.model` is the NNX module in eval mode computing the same thing."""
    root, paths = folder
    model = inference.load(named_run)
    assert model.step == 7 and model.class_names == [f"c{i}" for i in range(10)] and model.num_outputs == 10
    assert model.config.data.image_size == 64 and model.config.data.resize_size == 72

    source = imagefolder.ImageFolderSource(str(root))
    assert [source.name(i) for i in range(len(source))] == paths
    batch = next(pipeline.eval_batches(source, global_batch_size=len(paths), image_size=64, resize_size=72))
    for i, path in enumerate(paths):
        view = model.preprocess(path)
        np.testing.assert_array_equal(view, batch["image"][i])
        picture = Image.open(path)
        np.testing.assert_array_equal(model.preprocess(picture), view)
        np.testing.assert_array_equal(model.preprocess(np.asarray(picture)), view)
        with open(path, "rb") as f:
            np.testing.assert_array_equal(model.preprocess(f.read()), view)

    _, eval_def = models.model_graphdefs(model.config.model)
    log_probs = jax.jit(lambda v, x: train.eval_log_probs(v, x, graphdef=eval_def, dtype=np.float32))(
        model.model_vars, batch["image"])
    expected = np.exp(np.asarray(log_probs))
    got = model.probabilities(paths)
    assert got.shape == (4, 10) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, **REASSOCIATION)  # another jitted program
    assert np.abs(got[0] - got[1]).max() > 1e-3  # the pictures are told apart
    logits = model.model(transforms.normalize(batch["image"]))  # eval mode: stored BatchNorm statistics
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(logits)), expected, atol=1e-5)

    pictures = np.stack([np.asarray(Image.open(p)) for p in paths[2:3]] * 2)  # a uint8 NHWC batch of 2
    _same_rows(model.probabilities(pictures), expected[[2, 2]])
    small = inference.load(named_run, batch_size=3)  # forward passes of 3 + 1 images: the same rows
    _same_rows(small.probabilities(paths), got)

    [top] = model.predict(paths[0], top_k=3)  # one image alone: still one list per image
    assert [t["label"] for t in top] == list(np.argsort(-got[0])[:3])
    assert top[0] == {"label": top[0]["label"], "class": f"c{top[0]['label']}", "name": f"c{top[0]['label']}",
                      "probability": pytest.approx(float(got[0].max()), rel=REASSOCIATION["rtol"],
                                                   abs=REASSOCIATION["atol"])}  # a batch of 1 against one of 4


def test_exif_orientation_counts_for_files_and_pil_images(named_run, tmp_path):
    """A portrait photo stored sideways with EXIF orientation 6 is classified upright, from the file and from
    the PIL image opened from it, exactly like the upright picture."""
    model = inference.load(named_run)
    upright = np.random.default_rng(4).integers(0, 256, (100, 80, 3), dtype=np.uint8)
    sideways = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # what a camera writes
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "sideways.png"
    sideways.save(path, exif=exif)
    view = model.preprocess(np.asarray(upright))
    np.testing.assert_array_equal(model.preprocess(str(path)), view)
    np.testing.assert_array_equal(model.preprocess(Image.open(path)), view)


def test_loading_from_a_python_program_prints_no_orbax_warning(named_run):
    """Opening a checkpoint read-only is what inference asks for: Orbax's warning about it is noise there."""
    script = ("import logging, alexnet_jax.inference as i; logging.basicConfig(); "
              f"print(i.load({str(named_run)!r}).step)")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "7", result.stderr[-3000:]
    assert "read only" not in result.stderr, result.stderr


def test_unreadable_images_are_named(named_run, tmp_path):
    model = inference.load(named_run)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(inference.UnreadableImage, match="broken.jpg"):
        model.predict([str(broken)])
    with pytest.raises(inference.UnreadableImage, match="missing.png: No such file"):
        model.preprocess(tmp_path / "missing.png")
    with pytest.raises(inference.UnreadableImage, match="uint8"):
        model.preprocess(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(checkpointing.CheckpointNotFound):
        inference.load(tmp_path / "nothing here")


def test_outputs_without_a_class_name_are_labelled_not_indexed(short_names_run, folder):
    """10 outputs, 3 names: every output can rank, the unnamed ones as "class <label>" with class None."""
    _, paths = folder
    model = inference.load(short_names_run)
    assert model.class_names == CLASSES and model.num_outputs == 10
    [top] = model.predict(paths[:1], top_k=10)
    assert sorted(t["label"] for t in top) == list(range(10))
    by_label = {t["label"]: t for t in top}
    assert by_label[0]["class"] == by_label[0]["name"] == "cat"
    assert by_label[2]["class"] == "n01440764" and by_label[2]["name"] == "tench, Tinca tinca"
    for label in range(3, 10):
        assert by_label[label]["class"] is None and by_label[label]["name"] == f"class {label}"
    assert inference.output_names(CLASSES, 5) == ["cat", "dog", "n01440764", "class 3", "class 4"]

    result = run_cli("alexnet_jax.predict", f"--workdir={short_names_run}", "--json", "--top_k=10", paths[0])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "10 outputs but the checkpoint names 3 classes" in result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["predictions"][0]["top"] == [dict(t, probability=pytest.approx(t["probability"], abs=1e-6))
                                            for t in top]
    lines = result.stdout.splitlines()
    assert any(line.strip().endswith(f"{by_label[9]['probability']:.4f}") and "class 9" in line for line in lines)
    assert any("tench (n01440764)" in line for line in lines)


def test_predict_command_names_bad_files_and_classifies_the_rest(named_run, folder, tmp_path):
    _, paths = folder
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"")
    result = run_cli("alexnet_jax.predict", f"--workdir={named_run}", "--checkpoint=7", "--json", paths[1],
                     str(broken), str(tmp_path / "missing.jpg"))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot read image {broken}: empty file",
                      f"error: cannot read image {tmp_path / 'missing.jpg'}: No such file or directory"]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["checkpoint_step"] == 7 and [p["file"] for p in out["predictions"]] == [paths[1]]
    assert [e["file"] for e in out["errors"]] == [str(broken), str(tmp_path / "missing.jpg")]
    expected = inference.load(named_run).predict(paths[1])[0]
    assert [t["label"] for t in out["predictions"][0]["top"]] == [t["label"] for t in expected]

    result = run_cli("alexnet_jax.predict", f"--workdir={tmp_path / 'none'}", paths[0])
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: no checkpoints")


def test_predict_on_a_folder_classifies_the_images_in_it(named_run, folder, tmp_path):
    root, paths = folder
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    result = run_cli("alexnet_jax.predict", f"--workdir={named_run}", "--json", str(root), str(tmp_path / "empty"))
    assert result.returncode == 1, result.stderr[-3000:]  # the folder without images
    assert "Is a directory" not in result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert [p["file"] for p in out["predictions"]] == paths  # sub-folders included, in sorted order
    expected = inference.load(named_run).predict(paths)
    assert [[t["label"] for t in p["top"]] for p in out["predictions"]] == [[t["label"] for t in e] for e in expected]
    assert out["errors"] == [{"file": str(tmp_path / "empty"), "error": "no image files in this folder"}]


def test_bytes_from_memory_are_an_image_too(named_run):
    model = inference.load(named_run)
    picture = Image.fromarray(np.random.default_rng(5).integers(0, 256, (80, 96, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    np.testing.assert_array_equal(model.preprocess(buffer.getvalue()), model.preprocess(picture))


def test_no_images_no_predictions(named_run):
    model = inference.load(named_run)
    assert model.predict([]) == [] and model.probabilities([]).shape == (0, 10)


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch):
    """The README's Python example, verbatim, in a folder holding what it names."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    [example] = [b for b in blocks if "alexnet_jax.inference.load" in b]
    config = tiny_config(variant="bn", source="digits")
    checkpointing.save_for_inference(str(tmp_path / "runs" / "digits"), random_model_vars(config.model), config,
                                     [str(d) for d in range(10)], step=1)
    rng = np.random.default_rng(2)
    for name in ("digit.jpg", "a.jpg", "b.png"):
        Image.fromarray(rng.integers(0, 256, (70, 64, 3), dtype=np.uint8)).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(example, namespace)
    assert namespace["probs"].shape == (2, 10)
    assert namespace["probs"].sum(axis=1) == pytest.approx([1.0, 1.0], abs=1e-5)
    # The comments and the prose around the example name attributes too: each must exist on what load() returns.
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        section = f.read().split("### From Python", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    named = set(re.findall(r"\bmodel\.(\w+)\b(?!=)", section))  # `model.num_classes=1000` is a config key
    assert {"num_outputs", "class_names", "config", "step"} <= named
    assert [name for name in sorted(named) if not hasattr(namespace["model"], name)] == []
