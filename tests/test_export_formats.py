"""export --format=onnx and --format=torchvision, checked in the real runtimes: onnxruntime, and torchvision's own
AlexNet module.

The torchvision tests need torchvision itself, whose PyPI wheels need PyPI's torch build beside them (not the
CPU-only build the main CI venv has): they are marked `torchvision` and .ci/run runs them in a venv of their own
(the [interop] extra); elsewhere they are skipped with the reason.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from alexnet_jax import checkpointing, inference, interop
from alexnet_jax.data import transforms
from conftest import REPO, random_model_vars, run_cli, tiny_config
from test_export import _readme_loader


def _torchvision():
    try:
        import torchvision
    except Exception as error:  # noqa: BLE001 - beside a CPU-only torch it fails with a RuntimeError, not ImportError
        pytest.skip(f"torchvision cannot be imported here ({type(error).__name__}: {str(error)[:80]}); "
                    ".ci/run runs these tests in a venv with the [interop] extra")
    return torchvision


def _photos(directory, count=7):
    """Real files of different sizes and formats, each needing predict's resize and crop."""
    rng = np.random.default_rng(7)
    paths = []
    for i in range(count):
        height, width = 70 + 9 * i, 100 - 5 * i
        gradient = np.linspace(0, 255, width)[None, :, None] * rng.uniform(0.2, 1.0, 3)
        pixels = np.clip(gradient + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
        path = directory / (f"photo_{i}.jpg" if i % 2 == 0 else f"photo_{i}.png")
        Image.fromarray(pixels).save(path, **({"quality": 90} if i % 2 == 0 else {}))
        paths.append(str(path))
    return paths


def _checkpoint(directory, step=4, seed=0, **config_overrides):
    config = tiny_config(**{"data.resize_size": 72, **config_overrides})
    names = [f"kind {i}" for i in range(config.model.num_classes)]
    checkpointing.save_for_inference(str(directory), random_model_vars(config.model, seed), config, names, step=step)
    return config, names


@pytest.mark.parametrize("variant", ["owt", "bn", "original"])
def test_onnx_export_gives_predicts_probabilities_in_onnxruntime(variant, tmp_path):
    pytest.importorskip("jax2onnx", reason="needs jax2onnx (see the [onnx] extra)")
    ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime (the [onnx] extra)")
    workdir, out = tmp_path / "run", tmp_path / "exported" / "alexnet.onnx"
    _, names = _checkpoint(workdir, variant=variant)
    result = run_cli("alexnet_jax.export", f"--workdir={workdir}", "--format=onnx", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "onnx" in result.stdout and not (tmp_path / "exported" / "alexnet.onnx.json").exists()

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    assert meta["class_names"] == names and meta["checkpoint"]["step"] == 4
    assert meta["model"]["variant"] == variant
    shared = transforms.eval_preprocessing(64, 72, normalization_inside=True)
    assert meta["preprocessing"] == shared["preprocessing"] and meta["normalization"] == shared["normalization"]
    [images] = session.get_inputs()
    assert images.name == "images" and images.type == "tensor(uint8)" and images.shape == ["b", 64, 64, 3]
    assert session.get_outputs()[0].shape == ["b", 10]

    classifier = inference.load(workdir)
    paths = _photos(tmp_path)
    expected = classifier.probabilities(paths)
    views = np.stack([classifier.preprocess(p) for p in paths])
    for batch in (slice(0, 7), slice(3, 4)):  # the batch dimension is dynamic
        [got] = session.run(None, {"images": views[batch]})
        assert got.shape == (len(views[batch]), 10) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected[batch], atol=1e-4)
        np.testing.assert_array_equal(np.argsort(-got, kind="stable")[:, :5],
                                      np.argsort(-expected[batch], kind="stable")[:, :5])
    assert np.abs(expected[0] - expected[1]).max() > 1e-3  # different images, different outputs


def test_readme_onnx_snippet_classifies_with_onnxruntime_alone(tmp_path):
    """The README's onnxruntime lines, with its `view` from the StableHLO loader, in a process where
    alexnet_jax cannot be imported, give predict's probabilities."""
    pytest.importorskip("jax2onnx", reason="needs jax2onnx (see the [onnx] extra)")
    pytest.importorskip("onnxruntime", reason="needs onnxruntime (the [onnx] extra)")
    import re

    workdir, consumer = tmp_path / "run", tmp_path / "consumer"
    _checkpoint(workdir, variant="bn", seed=3)
    result = run_cli("alexnet_jax.export", f"--workdir={workdir}", "--format=onnx",
                     f"--out={consumer / 'alexnet.onnx'}")
    assert result.returncode == 0, result.stderr[-3000:]
    [photo] = _photos(consumer, count=1)
    with open(f"{REPO}/README.md", encoding="utf-8") as f:
        [snippet] = [b for b in re.findall(r"```python\n(.*?)```", f.read(), re.S) if "onnxruntime" in b]
    [view] = re.findall(r"\ndef view\(path\):.*?\n\n", _readme_loader(), re.S)
    script = ('import sys\nsys.modules["alexnet_jax"] = None\nsys.modules["jax"] = None\n'
              'import numpy as np\nfrom PIL import Image, ImageOps\n' + view + snippet.replace("photo.jpg", photo)
              + '\nimport json\nprint(json.dumps(probs.tolist()))\n')
    run = subprocess.run([sys.executable, "-c", script], cwd=consumer, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}})
    assert run.returncode == 0, run.stderr[-3000:]
    *printed, probs = run.stdout.strip().splitlines()
    expected = inference.load(workdir).probabilities(photo)[0]
    np.testing.assert_allclose(json.loads(probs), expected, atol=1e-4)
    assert printed and "kind " in printed[0]


def _blocked(module, *args):
    """python -m alexnet_jax.export ARGS in a process where `import MODULE` fails, as it does when the package
    is not installed."""
    code = (f"import sys, runpy; sys.modules[{module!r}] = None; sys.argv = ['export', *{list(args)!r}]; "
            "runpy.run_module('alexnet_jax.export', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_bad_formats_variants_and_missing_converters_are_one_line_with_exit_2(tmp_path):
    workdir, out = tmp_path / "run", tmp_path / "out" / "model"
    _checkpoint(workdir, variant="original")

    cases = [
        (run_cli("alexnet_jax.export", f"--workdir={workdir}", "--format=tflite", f"--out={out}"),
         "--format='tflite' is not one of stablehlo, onnx, torchvision"),
        # LRN and grouped convolutions: torchvision's AlexNet has neither (and refusing it needs no torch)
        (run_cli("alexnet_jax.export", f"--workdir={workdir}", "--format=torchvision", f"--out={out}"),
         "model.variant='original'"),
        (_blocked("jax2onnx", f"--workdir={workdir}", "--format=onnx", f"--out={out}"),
         "--format=onnx needs jax2onnx: pip install 'alexnet_jax[onnx]' && pip install --no-deps 'jax2onnx"),
        (_blocked("flatbuffers", f"--workdir={workdir}", f"--out={out}"),
         "--format=stablehlo needs flatbuffers: pip install flatbuffers"),
        (run_cli("alexnet_jax.export", f"--workdir={workdir}", "--format=onnx", "--platforms=cpu", f"--out={out}"),
         "--platforms applies to --format=stablehlo only"),
    ]
    for result, message in cases:
        assert result.returncode == 2, (message, result.stderr[-2000:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "out").exists()

    # The other refusals, by the function the command asks (no checkpoint of torchvision's size needed)
    def why(variant="owt", **overrides):
        return interop.torchvision_incompatibility(tiny_config(variant=variant, **overrides).model)

    assert why().startswith("model.width=0.0625: ")
    assert why(**{"model.width": 1.0, "model.activation": "tanh"}).startswith("model.activation='tanh': ")
    assert why("bn", **{"model.width": 1.0}).startswith("model.variant='bn': ")
    assert why(**{"model.width": 1.0}) is None
    assert why(**{"model.width": 1.0, "model.space_to_depth": True}) is None  # the same conv1 kernel, computed
    assert why(**{"model.width": 1.0, "model.num_classes": 3}) is None  # any number of classes


@pytest.fixture(scope="module")
def torchvision_sized_checkpoint(tmp_path_factory):
    """owt at width 1 (torchvision's shape) with 10 classes, random weights, 64 px images."""
    workdir = tmp_path_factory.mktemp("tv") / "run"
    config, names = _checkpoint(workdir, step=9, seed=5, **{"model.width": 1.0})
    return workdir, config, names


def test_missing_torch_is_one_line_with_the_install(torchvision_sized_checkpoint, tmp_path):
    workdir, _, _ = torchvision_sized_checkpoint
    result = _blocked("torch", f"--workdir={workdir}", "--format=torchvision", f"--out={tmp_path / 'a.pt'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == ("error: --format=torchvision needs torch: pip install 'alexnet_jax[torch]'")
    assert not (tmp_path / "a.pt").exists()


def test_inverse_mapping_is_the_exact_inverse_without_torch():
    """ours -> torchvision -> ours is bit-exact and keeps torchvision's key order (no torch needed)."""
    import jax
    from flax import nnx

    from alexnet_jax import models

    config = tiny_config()
    params = random_model_vars(config.model, 4)["params"]
    state_dict = interop.to_torchvision_state_dict(params)
    assert list(state_dict) == list(interop.torchvision_key_map())
    assert state_dict["features.0.weight"].shape == (4, 3, 11, 11)  # OIHW
    model = nnx.eval_shape(lambda: models.create_model(config.model, rngs=nnx.Rngs(0)))
    interop.load_torchvision_state_dict(model, state_dict)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param))),
                 jax.device_get(params))


@pytest.mark.torchvision
def test_torchvision_alexnet_loads_the_export_strictly_and_gives_our_logits(torchvision_sized_checkpoint,
                                                                             tmp_path):
    torchvision = _torchvision()
    import torch

    workdir, config, names = torchvision_sized_checkpoint
    out = tmp_path / "alexnet.pt"
    result = run_cli("alexnet_jax.export", f"--workdir={workdir}", "--format=torchvision", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    sidecar = json.loads((tmp_path / "alexnet.pt.json").read_text())
    assert sidecar["class_names"] == names and sidecar["checkpoint"]["step"] == 9
    assert sidecar == {**sidecar, **transforms.eval_preprocessing(64, 72, normalization_inside=False)}

    net = torchvision.models.alexnet(num_classes=len(names))
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    net.eval()

    classifier = inference.load(workdir)
    views = np.stack([classifier.preprocess(p) for p in _photos(tmp_path)])  # real JPEGs and PNGs
    # The consumer's side, from the sidecar alone: normalise, NCHW.
    norm = sidecar["normalization"]
    normalised = (views.astype(np.float32) - np.float32(norm["mean_rgb"])) / np.float32(norm["std_rgb"])
    with torch.no_grad():
        theirs = net(torch.from_numpy(normalised.transpose(0, 3, 1, 2).copy())).numpy()
    ours = np.asarray(classifier.model(transforms.normalize(views)))
    scale = np.abs(ours).max()
    assert np.abs(theirs - ours).max() <= 1e-4 * scale, (np.abs(theirs - ours).max(), scale)
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(theirs), -1).numpy(),
                               classifier.probabilities_of_views(views), atol=1e-5)


@pytest.mark.torchvision
def test_torchvision_to_ours_to_torchvision_is_exact():
    torchvision = _torchvision()
    import torch
    from flax import nnx

    from alexnet_jax import models

    torch.manual_seed(3)
    original = torchvision.models.alexnet(num_classes=17).state_dict()
    model = nnx.eval_shape(lambda: models.AlexNet("owt", 17, rngs=nnx.Rngs(0)))
    interop.load_torchvision_state_dict(model, original)
    back = interop.to_torchvision_state_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert list(back) == list(original)
    for key, value in original.items():
        assert torch.equal(torch.from_numpy(back[key]), value), key
    # and torchvision takes it back strictly
    torchvision.models.alexnet(num_classes=17).load_state_dict(
        {k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
