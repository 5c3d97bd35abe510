"""The exported StableHLO function runs with plain JAX, without alexnet_jax, and reproduces predict."""

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image

from alexnet_jax import checkpointing, export, inference
from conftest import REASSOCIATION, REPO, random_model_vars, run_cli, tiny_config


@pytest.fixture(scope="module")
def bn_checkpoint(tmp_path_factory):
    """A BatchNorm model with random weights *and* non-trivial statistics, so both must survive the export."""
    workdir = tmp_path_factory.mktemp("export") / "run"
    config = tiny_config(variant="bn")
    model_vars = random_model_vars(config.model)
    class_names = [f"class_{i}" for i in range(config.model.num_classes)]
    checkpointing.save_for_inference(str(workdir), model_vars, config, class_names, step=5)
    return workdir, config


def _images(tmp_path, count):
    """64 px JPEGs (the model's image_size = resize_size, so predict's crop is the identity) and their pixels
    as predict decodes them."""
    paths, pixels = [], []
    rng = np.random.default_rng(1)
    for i in range(count):
        path = tmp_path / f"image_{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(str(path))
        pixels.append(inference.load_image(str(path), 64, 64))
    return paths, np.stack(pixels)


def test_exported_file_reproduces_predict_without_the_package(bn_checkpoint, tmp_path):
    workdir, _ = bn_checkpoint
    out = tmp_path / "exported" / "alexnet.bin"
    result = run_cli("alexnet_jax.export", f"--workdir={workdir}", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    sidecar = json.loads((tmp_path / "exported" / "alexnet.bin.json").read_text())
    assert sidecar["class_names"] == [f"class_{i}" for i in range(10)]
    assert sidecar["input"]["shape"] == ["b", 64, 64, 3] and sidecar["input"]["dtype"] == "uint8"
    assert sidecar["checkpoint"]["step"] == 5 and sidecar["normalization"]["applied_inside"] is True
    assert sidecar["output"]["shape"] == ["b", 10] and sidecar["output"]["named_outputs"] == 10
    assert set(sidecar["platforms"]) == {"cpu", "cuda", "tpu"}

    paths, _ = _images(tmp_path, 3)
    result = run_cli("alexnet_jax.predict", f"--workdir={workdir}", "--json", "--top_k=10", *paths)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = np.zeros((3, 10))
    for i, pred in enumerate(json.loads(result.stdout.strip().splitlines()[-1])["predictions"]):
        for t in pred["top"]:
            expected[i, t["label"]] = t["probability"]

    # A consumer with plain JAX + Pillow: alexnet_jax cannot even be imported there.
    consumer = textwrap.dedent(f"""
        import json, sys
        sys.modules["alexnet_jax"] = None  # any import of the package now fails
        import numpy as np
        from PIL import Image
        from jax import export
        with open({str(out)!r}, "rb") as f:
            fn = export.deserialize(f.read())
        images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in {paths!r}])
        three = np.asarray(fn.call(images))
        one = np.asarray(fn.call(images[1:2]))  # the batch dimension is symbolic
        print(json.dumps({{"three": three.tolist(), "one": one.tolist(), "dtype": str(three.dtype),
                          "package_loaded": "alexnet_jax" in sys.modules and sys.modules["alexnet_jax"] is not None}}))
    """)
    run = subprocess.run([sys.executable, "-c", consumer], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={"PATH": "/usr/bin:/bin", "XLA_FLAGS": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert not got["package_loaded"] and got["dtype"] == "float32"
    np.testing.assert_allclose(got["three"], expected, atol=1e-5)
    np.testing.assert_allclose(got["one"][0], expected[1], atol=1e-5)
    assert np.abs(expected[0] - expected[1]).max() > 1e-3  # different images, different outputs


def test_fixed_batch_export_equals_predicts_function(bn_checkpoint, tmp_path):
    workdir, _ = bn_checkpoint
    config, _, model_vars, _ = checkpointing.load_for_inference(str(workdir))
    exported = export.export_model(config, model_vars, batch=2)
    assert exported.in_avals[0].shape == (2, 64, 64, 3) and exported.out_avals[0].shape == (2, 10)
    restored = jax.export.deserialize(exported.serialize())
    _, pixels = _images(tmp_path, 2)
    np.testing.assert_allclose(np.asarray(restored.call(pixels)),
                               np.asarray(inference.probabilities_fn(config)(model_vars, pixels)), **REASSOCIATION)
    with pytest.raises(Exception, match="shape"):
        restored.call(pixels[:1])  # a fixed batch is fixed


def test_export_rejects_an_unknown_platform_and_writes_nothing(bn_checkpoint, tmp_path):
    workdir, _ = bn_checkpoint
    out = tmp_path / "x.bin"
    result = run_cli("alexnet_jax.export", f"--workdir={workdir}", f"--out={out}", "--platforms=cpu,gpu")
    assert result.returncode == 2 and "--platforms" in result.stderr
    assert not out.exists()


def _readme_loader() -> str:
    """The standalone loader the README shows, verbatim."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    [loader] = [b for b in blocks if "export.deserialize" in b]
    return loader


def test_readme_loader_reproduces_predict_from_the_metadata_alone(tmp_path):
    """10 outputs but 3 class names, a 72 px resize and 64 px crop: the JSON describes what the function really
    returns, and the README's loader (Pillow + numpy + jax.export, nothing else) gives predict's probabilities
    for a JPEG that needs both the resize and the crop."""
    workdir, consumer = tmp_path / "run", tmp_path / "consumer"
    config = tiny_config(variant="bn", **{"data.resize_size": 72})
    names = ["cat", "dog", "n01440764"]
    checkpointing.save_for_inference(str(workdir), random_model_vars(config.model, 2), config, names, step=3)
    result = run_cli("alexnet_jax.export", f"--workdir={workdir}", f"--out={consumer / 'alexnet.jaxexport'}",
                     "--platforms=cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((consumer / "alexnet.jaxexport.json").read_text())
    assert meta["output"]["shape"] == ["b", 10] and meta["output"]["num_outputs"] == 10
    assert meta["output"]["named_outputs"] == 3 and meta["class_names"] == names
    assert meta["preprocessing"] == {"resize_short_side": 72, "resample": "bilinear", "crop": "center",
                                     "crop_size": 64}
    assert meta["input"] == {"shape": ["b", 64, 64, 3], "dtype": "uint8", "layout": "NHWC",
                             "channel_order": "RGB", "value_range": [0, 255]}
    assert meta["normalization"]["mean_rgb"] == pytest.approx([123.675, 116.28, 103.53])
    assert meta["normalization"]["std_rgb"] == pytest.approx([58.395, 57.12, 57.375])

    rng = np.random.default_rng(6)
    gradient = np.linspace(0, 255, 130)[None, :, None] * np.array([1.0, 0.6, 0.3])
    pixels = np.clip(gradient + rng.normal(0, 30, (95, 130, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(consumer / "photo.jpg", quality=92)  # 95 px short side: resized, then cropped
    script = ('import sys\nsys.modules["alexnet_jax"] = None  # any import of the package now fails\n'
              + _readme_loader() + '\nprint(json.dumps(probs.tolist()))\n')
    run = subprocess.run([sys.executable, "-c", script], cwd=consumer, capture_output=True, text=True,
                         timeout=300, env={"PATH": "/usr/bin:/bin", "XLA_FLAGS": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    *printed, probs = run.stdout.strip().splitlines()
    expected = inference.load(workdir).probabilities(str(consumer / "photo.jpg"))[0]
    np.testing.assert_allclose(json.loads(probs), expected, atol=1e-5)
    order = np.argsort(-expected)[:5]
    assert [line.rsplit(" ", 1)[0] for line in printed] == [
        names[i] if i < 3 else f"class {i}" for i in order]
