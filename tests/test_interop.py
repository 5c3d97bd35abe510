"""torchvision-layout weights give PyTorch's logits; the import command writes a checkpoint predict accepts.

The PyTorch reference is built from plain torch.nn layers in torchvision's exact `alexnet` layout (torchvision
itself is not needed), randomly initialised with a fixed seed, in eval mode.
"""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from alexnet_jax import checkpointing, evaluate, import_torchvision, inference, interop, models
from alexnet_jax.data import sources, transforms
from conftest import run_cli, tiny_config

torch = pytest.importorskip("torch")
nn = torch.nn

TORCHVISION_CHANNELS = (64, 192, 384, 256, 256)


def torchvision_alexnet(width=1.0, num_classes=1000, seed=0):
    """torchvision.models.alexnet's module tree (features / avgpool / classifier), channels scaled like ours."""
    c1, c2, c3, c4, c5 = (models.scaled_channels(c, width) for c in TORCHVISION_CHANNELS)
    hidden = models.scaled_channels(4096, width)
    torch.manual_seed(seed)

    class AlexNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, c1, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2),
                nn.Conv2d(c1, c2, kernel_size=5, padding=2), nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2),
                nn.Conv2d(c2, c3, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(c3, c4, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(c4, c5, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2))
            self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
            self.classifier = nn.Sequential(
                nn.Dropout(p=0.5), nn.Linear(c5 * 6 * 6, hidden), nn.ReLU(inplace=True),
                nn.Dropout(p=0.5), nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
                nn.Linear(hidden, num_classes))

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    return AlexNet().eval()


def abstract_owt(width=1.0, num_classes=1000):
    return nnx.eval_shape(lambda: models.AlexNet("owt", num_classes, width=width, rngs=nnx.Rngs(0)))


def assert_same_logits(ours, reference, nchw):
    with torch.no_grad():
        expected = reference(torch.from_numpy(nchw)).numpy()
    got = np.asarray(ours(jax.numpy.asarray(nchw.transpose(0, 2, 3, 1))))
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-4 * scale, (np.abs(got - expected).max(), scale)


def test_torchvision_alexnet_state_dict_gives_pytorch_logits_at_224_and_160_px():
    reference = torchvision_alexnet()
    state_dict = reference.state_dict()
    assert list(state_dict) == [f"{p}.{n}" for p in ("features.0", "features.3", "features.6", "features.8",
                                                     "features.10", "classifier.1", "classifier.4",
                                                     "classifier.6") for n in ("weight", "bias")]
    assert sum(v.numel() for v in state_dict.values()) == 61_100_840  # torchvision's alexnet
    model = abstract_owt()
    interop.load_torchvision_state_dict(model, state_dict)  # torch tensors as they come
    model.eval()
    rng = np.random.default_rng(0)
    for size in (224, 160):  # 160 px reaches the adaptive pool at 4x4: bins repeat rows
        assert_same_logits(model, reference, rng.standard_normal((2, 3, size, size), dtype=np.float32))


@pytest.mark.parametrize("height, width", [(64, 64), (96, 96), (80, 112)])
def test_scaled_layout_matches_at_other_sizes(height, width):
    reference = torchvision_alexnet(width=0.0625, num_classes=10, seed=1)
    model = abstract_owt(width=0.0625, num_classes=10)
    # numpy values this time: the loader needs no torch
    interop.load_torchvision_state_dict(model, {k: v.numpy() for k, v in reference.state_dict().items()})
    model.eval()
    x = np.random.default_rng(height + width).standard_normal((3, 3, height, width), dtype=np.float32)
    assert_same_logits(model, reference, x)


def test_fc6_rows_are_permuted_from_chw_to_hwc():
    """fc6 input row (h, w, c) of ours must hold torch's column c*36 + h*6 + w; a plain transpose would not."""
    reference = torchvision_alexnet(width=0.0625, num_classes=10)
    state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
    model = abstract_owt(width=0.0625, num_classes=10)
    interop.load_torchvision_state_dict(model, state_dict)
    kernel = np.asarray(model.fc6.kernel[...])
    channels = models.scaled_channels(256, 0.0625)
    torch_weight = state_dict["classifier.1.weight"]
    for h, w, c in [(0, 0, 1), (2, 5, 0), (5, 3, channels - 1)]:
        np.testing.assert_array_equal(kernel[(h * 6 + w) * channels + c], torch_weight[:, c * 36 + h * 6 + w])


def test_bad_state_dicts_are_named_and_leave_the_model_alone():
    state_dict = {k: v.numpy() for k, v in torchvision_alexnet(width=0.0625, num_classes=10).state_dict().items()}
    model = abstract_owt(width=0.0625, num_classes=10)
    interop.load_torchvision_state_dict(model, state_dict)  # a concrete model, without eager random init
    before = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    state_dict = {k: v * 2 for k, v in state_dict.items()}  # so a partial load would show

    missing = dict(state_dict)
    del missing["classifier.4.bias"]
    with pytest.raises(ValueError, match=r"missing 'classifier\.4\.bias'"):
        interop.load_torchvision_state_dict(model, missing)
    with pytest.raises(ValueError, match=r"unexpected key 'features\.1\.weight'"):
        interop.load_torchvision_state_dict(model, {**state_dict, "features.1.weight": np.zeros(3)})
    wrong = {**state_dict, "classifier.6.weight": np.zeros((1000, state_dict["classifier.6.weight"].shape[1]))}
    with pytest.raises(ValueError, match=r"classifier\.6\.weight.*shape \(1000, "):
        interop.load_torchvision_state_dict(model, wrong)
    # The last key checked is bad, so a loader that wrote as it went would have changed everything before it.
    bad_last = {**state_dict, "classifier.6.bias": np.zeros(11, np.float32)}
    with pytest.raises(ValueError, match=r"classifier\.6\.bias"):
        interop.load_torchvision_state_dict(model, bad_last)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param))),
                 before)

    with pytest.raises(ValueError, match="owt"):
        interop.load_torchvision_state_dict(
            nnx.eval_shape(lambda: models.AlexNet("bn", 10, width=0.0625, rngs=nnx.Rngs(0))), state_dict)
    # DataParallel's "module." prefix is unwrapped
    interop.load_torchvision_state_dict(model, {f"module.{k}": v for k, v in state_dict.items()})
    np.testing.assert_array_equal(np.asarray(model.fc8.bias[...]), state_dict["classifier.6.bias"])


def test_import_command_writes_a_checkpoint_predict_accepts(tmp_path):
    """torch.save'd weights -> import_torchvision -> predict on a JPEG gives PyTorch's probabilities."""
    reference = torchvision_alexnet(width=0.0625, num_classes=10, seed=2)
    weights = tmp_path / "alexnet.pth"
    torch.save(reference.state_dict(), weights)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"flower {i}" for i in range(10)) + "\n")
    out = tmp_path / "imported"
    result = run_cli("alexnet_jax.import_torchvision", str(weights), f"--out={out}", f"--class_names={names}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"meta", "model"} <= set(os.listdir(out / "checkpoints" / "0"))
    assert not (out / "checkpoints" / "0" / "train").exists()  # an inference checkpoint: no optimizer state

    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 260, 3), dtype=np.uint8)).save(photo)
    result = run_cli("alexnet_jax.predict", f"--workdir={out}", "--json", "--top_k=10", str(photo))
    assert result.returncode == 0, result.stderr[-3000:]
    pred = json.loads(result.stdout.strip().splitlines()[-1])["predictions"][0]
    assert pred["top"][0]["class"].startswith("flower ")

    config, class_names, _, step = checkpointing.load_for_inference(str(out))
    assert step == 0 and class_names[3] == "flower 3" and config.model.variant == "owt"
    assert config.model.width == 0.0625 and config.data.image_size == 224
    crop = inference.load_image(str(photo), 224, 256)  # the same decode and crop predict used
    normalized = (crop.astype(np.float32) - np.array(transforms.MEAN_RGB, np.float32)) / np.array(
        transforms.STDDEV_RGB, np.float32)
    with torch.no_grad():
        expected = torch.softmax(reference(torch.from_numpy(normalized.transpose(2, 0, 1)[None].copy())), -1)[0]
    got = np.zeros(10)
    for t in pred["top"]:
        got[t["label"]] = t["probability"]
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)

    # evaluate accepts it too: its loss on a tiny synthetic split is PyTorch's cross-entropy on the same pixels.
    data_config = tiny_config(**{"data.synthetic_examples": 40})  # eval split: 10 examples of 64 px
    # The imported checkpoint says 224 px; asking for 64 px explicitly wins over it.
    result, _, _ = evaluate.evaluate_checkpoint(str(out), data_config,
                                                overrides=("data.image_size", "data.resize_size"))
    eval_source = sources.create_source(data_config.data, "eval", 10, data_config.seed)
    images = np.stack([eval_source[i]["image"] for i in range(len(eval_source))]).astype(np.float32)
    labels = torch.tensor([eval_source[i]["label"] for i in range(len(eval_source))])
    normalized = (images - np.array(transforms.MEAN_RGB, np.float32)) / np.array(transforms.STDDEV_RGB, np.float32)
    with torch.no_grad():
        logits = reference(torch.from_numpy(normalized.transpose(0, 3, 1, 2).copy()))
    assert result["eval_examples"] == 10 and result["image_size"] == 64
    assert result["note"] == ("evaluated with data.image_size=64, data.resize_size=64; the checkpoint was trained "
                              "with data.image_size=224, data.resize_size=256")
    assert result["eval_loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, labels)), abs=1e-5)
    assert result["eval_top1"] == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))


def test_import_refuses_pickled_code_and_mismatched_classes(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pth"
    torch.save({"features.0.weight": Payload()}, evil)
    result = run_cli("alexnet_jax.import_torchvision", str(evil), f"--out={tmp_path / 'out'}")
    assert result.returncode == 2 and "evil.pth" in result.stderr, result.stderr[-2000:]
    assert not marker.exists() and not (tmp_path / "out" / "checkpoints").exists()

    state_dict = torchvision_alexnet(width=0.0625, num_classes=10).state_dict()
    with pytest.raises(ValueError, match="num_classes=1000.*10 rows"):
        import_torchvision.import_state_dict(state_dict, str(tmp_path / "x"), num_classes=1000)
    with pytest.raises(ValueError, match="3 class names"):
        import_torchvision.import_state_dict(state_dict, str(tmp_path / "x"), class_names=["a", "b", "c"])
