"""The exported StableHLO function runs with plain JAX, without alexnet_jax, and reproduces predict."""

import json
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image

from alexnet_jax import checkpointing, export, inference
from conftest import random_model_vars, run_cli, tiny_config


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
                               np.asarray(inference.probabilities_fn(config)(model_vars, pixels)), atol=1e-6)
    with pytest.raises(Exception, match="shape"):
        restored.call(pixels[:1])  # a fixed batch is fixed


def test_export_rejects_an_unknown_platform_and_writes_nothing(bn_checkpoint, tmp_path):
    workdir, _ = bn_checkpoint
    out = tmp_path / "x.bin"
    result = run_cli("alexnet_jax.export", f"--workdir={workdir}", f"--out={out}", "--platforms=cpu,gpu")
    assert result.returncode == 2 and "--platforms" in result.stderr
    assert not out.exists()
