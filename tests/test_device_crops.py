"""data.device_crops: the host ships stored pixels whole with their global stream positions, and the train step
cuts the crop itself. alexnet crops are the host's slices of the same boxes; inception boxes follow the host's
rules and are resampled as Pillow resamples them. The compiled step trains on them as on crops cut outside it,
and a run is the same on any process, device or worker count, and after a resume."""

import json
import os
import shutil
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest
from PIL import Image

from alexnet_jax import optim, precise_bn, sharding, train
from alexnet_jax.data import convert, pipeline, sources, transforms
from conftest import REASSOCIATION, REPO, run_cli, tiny_config
from test_multiprocess import _free_port

IMAGE, RESIZE, REGION = 64, 73, 70  # stored 70x70 at short side 73: offsets 0..6 each way


def _write_folder(root, sizes) -> None:
    """Smooth random pictures of the given (h, w) in two classes."""
    rng = np.random.default_rng(0)
    for k, (h, w) in enumerate(sizes):
        folder = os.path.join(root, f"n0000000{k % 2}")
        os.makedirs(folder, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        coarse.resize((w, h), Image.Resampling.BICUBIC).save(os.path.join(folder, f"img_{k}.png"))


def _convert(src, dst, *options) -> str:
    convert.convert(convert.parse_args([f"--src={src}", f"--dst={dst}", "--shards=2", "--workers=1", *options]))
    return str(dst)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Raw records of 16 pictures larger than --resize, each the central 70x70 of its 73 px short-side resize."""
    src = tmp_path_factory.mktemp("pictures")
    _write_folder(str(src), [(80, 96), (96, 80)] * 8)
    return _convert(src, tmp_path_factory.mktemp("raw"), "--format=raw", f"--resize={RESIZE}",
                    f"--center_crop={REGION}")


def _config(records, **overrides):
    return tiny_config("arrayrecord", **{"data.train_path": records, "data.eval_path": records,
                                         "data.image_size": IMAGE, "data.resize_size": RESIZE,
                                         "data.device_crops": True, "model.num_classes": 2, **overrides})


def _kwargs(**overrides):
    return {"global_batch_size": 8, "seed": 3, "image_size": IMAGE, "resize_size": RESIZE, "device_crops": True,
            **overrides}


def _take(iterator, n):
    batches = [next(iterator) for _ in range(n)]
    iterator.close()
    return batches


def test_the_device_crop_is_the_host_slice_of_the_same_box():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (12, 70, 75, 3), dtype=np.uint8)
    positions = np.arange(1000, 1012, dtype=np.uint32)
    key = transforms.device_crop_key(3)
    bounds = (70 - IMAGE + 1, 75 - IMAGE + 1)
    offsets = np.asarray(jax.jit(transforms.device_crop_offsets, static_argnums=2)(key, positions, bounds))
    assert ((offsets >= 0) & (offsets < bounds)).all()
    assert len({tuple(o) for o in offsets}) > 6, offsets  # the offsets do vary
    # An example's offsets depend on its position alone, not on the rest of its batch.
    np.testing.assert_array_equal(transforms.device_crop_offsets(key, positions[5:7], bounds), offsets[5:7])
    crops = jax.jit(transforms.device_crops, static_argnums=2)(images, offsets, IMAGE)
    np.testing.assert_array_equal(crops, np.stack([image[t:t + IMAGE, l:l + IMAGE]
                                                   for image, (t, l) in zip(images, offsets)]))


def _noisy_picture(rng, h, w):
    """Smooth shapes plus pixel noise: both the antialiasing filter's and the interpolation's errors show."""
    coarse = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    noise = rng.integers(-40, 41, (h, w, 3))
    return np.clip(np.asarray(coarse, np.int64) + noise, 0, 255).astype(np.uint8)


def test_the_device_resample_is_pillows_resample_of_the_same_box():
    """jax's scale_and_translate, the box's corner mapped to 0 and its far corner to the output size, is the
    host's Pillow resample (crop_box_array) to within Pillow's 8-bit rounding of its first pass: measured at most
    1 grey level apart, 0.06-0.25 on average, shrinking (antialiased) up to 4x, enlarging up to 2x and both at
    once, corners on and off the pixel grid."""
    image = _noisy_picture(np.random.default_rng(2), 120, 150)
    boxes = [(0, 0, 150, 120), (3.3, 5.7, 140.2, 116.1), (0.1, 0.2, 149.9, 119.7), (10.5, 20.25, 40.75, 50.5),
             (70, 3, 101, 35), (5, 0, 20, 120), (12.5, 1.5, 148.25, 33.75), (2, 3, 66, 67)]
    for size in (IMAGE, 32):
        device = np.asarray(jax.jit(transforms.device_resample_boxes, static_argnums=2)(
            np.stack([image] * len(boxes)), np.asarray(boxes, np.float32), size))
        for box, got in zip(boxes, device):
            diff = np.abs(got.astype(np.int64) - transforms.crop_box_array(image, box, size))
            assert diff.max() <= 1 and diff.mean() < 0.3, (size, box, diff.max(), diff.mean())
        if size == IMAGE:  # a box that is the output size on the pixel grid: the host's slice, exactly
            np.testing.assert_array_equal(device[-1], image[3:67, 2:66])


def test_the_device_inception_boxes_follow_the_host_rules_and_distribution():
    key, n = transforms.device_crop_key(3), 4000
    boxes_fn = jax.jit(transforms.device_inception_boxes, static_argnums=2)
    height, width = 60, 200
    device = np.asarray(boxes_fn(key, np.arange(n, dtype=np.uint32), (height, width)))
    rng = np.random.default_rng(0)
    host = np.array([transforms.inception_crop_box(width, height, rng) for _ in range(n)])
    fallback = np.array(transforms.inception_fallback_box(width, height))

    def stats(boxes):
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        drawn = ~(boxes == fallback).all(1)
        w, h, left, top = w[drawn], h[drawn], boxes[drawn, 0], boxes[drawn, 1]
        # Within the rules up to rounding each side to whole pixels: sides >= (0.08 * 60 * 200 * 3 / 4) ** 0.5
        # = 26.8, so each is off by under 1.9%.
        area, aspect = w * h / (height * width), w / h
        assert (area >= 0.08 * 0.95).all() and (area <= 1).all(), area.min()
        assert (aspect >= 3 / 4 * 0.96).all() and (aspect <= 4 / 3 / 0.96).all(), (aspect.min(), aspect.max())
        placed = lambda offset, room: (offset / np.maximum(room, 1))[room > 0]
        return np.array([1 - drawn.mean(), area.mean(), np.log(aspect).mean(), placed(left, width - w).mean(),
                         placed(top, height - h).mean()])

    # The same distribution: fallback rate (~5.7% for this shape), mean area, log-aspect and placement, within
    # about 4 standard errors of 4000 draws each.
    got, want = stats(device), stats(host)
    assert (np.abs(got - want) <= [0.022, 0.012, 0.015, 0.03, 0.03]).all(), (got, want)
    # An example's box depends on its position alone.
    np.testing.assert_array_equal(boxes_fn(key, np.arange(5, 9, dtype=np.uint32), (height, width)), device[5:9])
    # A picture no try fits (every box of 8% of its area is wider than it): the host's central clamped box.
    thin = np.asarray(boxes_fn(key, np.arange(50, dtype=np.uint32), (200, 10)))
    host_thin = transforms.inception_crop_box(10, 200, np.random.default_rng(0))
    assert host_thin == transforms.inception_fallback_box(10, 200) == (0, 93, 10, 106)
    np.testing.assert_array_equal(thin, np.tile(host_thin, (50, 1)))


def test_the_host_ships_whole_stored_arrays_with_global_positions_on_any_worker_or_process_count(records):
    source = sources.create_source(_config(records).data, "train", 2, 0)
    single = _take(pipeline.train_batches(source, **_kwargs()), 4)
    stream = grain.MapDataset.range(len(source)).shuffle(seed=3).repeat(None)  # the train stream's indices
    for b, batch in enumerate(single):
        assert batch["image"].shape == (8, REGION, REGION, 3) and batch["image"].dtype == np.uint8
        np.testing.assert_array_equal(batch["position"], np.arange(8 * b, 8 * b + 8))
        read = source.read_pixels([stream[p] for p in range(8 * b, 8 * b + 8)])
        np.testing.assert_array_equal(batch["image"], np.stack(read["images"]))
        np.testing.assert_array_equal(batch["label"], read["labels"])
    workers = _take(pipeline.train_batches(source, workers=2, **_kwargs()), 4)
    halves = [_take(pipeline.train_batches(source, process_index=p, process_count=2, **_kwargs()), 4)
              for p in range(2)]
    for b in range(4):
        for key in ("image", "label", "position"):
            np.testing.assert_array_equal(workers[b][key], single[b][key])
            np.testing.assert_array_equal(np.concatenate([halves[0][b][key], halves[1][b][key]]), single[b][key])


def test_eval_and_statistics_batches_ship_stored_arrays_whose_central_view_is_the_host_view(records):
    """Under data.device_crops the eval and BatchNorm-statistics sets ship the stored arrays whole, a batch per
    read; their central image_size squares are the host's eval views pixel for pixel, with the same labels and
    padding masks, on any worker or process count."""
    config = _config(records)
    source = sources.create_source(config.data, "eval", 2, 0)
    assert pipeline.eval_views_on_device(source, config.data, "eval")
    view = lambda batches: [{**b, "image": np.asarray(transforms.central_view(b["image"], IMAGE))} for b in batches]
    common = {"global_batch_size": 6, "image_size": IMAGE, "resize_size": RESIZE}  # 16 examples, padded to 18
    host = list(pipeline.eval_batches(source, **common))
    stored = list(pipeline.eval_batches(source, on_device=True, **common))
    assert [b["image"].shape for b in stored] == [(6, REGION, REGION, 3)] * 3
    workers = list(pipeline.eval_batches(source, on_device=True, workers=2, **common))
    halves = [list(pipeline.eval_batches(source, on_device=True, process_index=p, process_count=2, **common))
              for p in range(2)]
    assert [int(b["mask"].sum()) for b in host] == [6, 6, 4]
    for b in range(3):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(view(stored)[b][key], host[b][key])
            np.testing.assert_array_equal(workers[b][key], stored[b][key])
            np.testing.assert_array_equal(np.concatenate([halves[0][b][key], halves[1][b][key]]), stored[b][key])
    common = {"num_examples": 8, "global_batch_size": 4, "seed": 5, "image_size": IMAGE, "resize_size": RESIZE}
    host = list(pipeline.stats_dataset(source, **common))
    stored = list(pipeline.stats_dataset(source, on_device=True, **common))
    assert len(stored) == 2 and stored[0]["image"].shape == (4, REGION, REGION, 3)
    for want, got in zip(host, view(stored)):
        np.testing.assert_array_equal(got["image"], want["image"])


def test_views_the_device_cannot_cut_as_the_host_does_stay_on_the_host(records, tmp_path):
    """Stored pixels that do not hold the eval view at the crop's scale (ten crops need the whole 73 px square;
    another data.resize_size makes the view a resample), and encoded images, keep the host's eval views."""
    config = _config(records)
    source = sources.create_source(config.data, "eval", 2, 0)
    assert pipeline.device_eval_problem(source, config.data) is None
    assert "central 73 px square" in pipeline.device_eval_problem(source, _config(records, **{"data.eval_crops": 10}).data)
    assert "short side 73" in pipeline.device_eval_problem(source, _config(records, **{"data.resize_size": 72}).data)
    assert pipeline.device_eval_problem(source, _config(records, **{"data.device_crops": False}).data) == (
        "data.device_crops is off")
    folder = tmp_path / "pictures"
    _write_folder(str(folder), [(80, 96)] * 2)
    jpeg = sources.create_source(tiny_config("imagefolder", **{"data.train_path": str(folder)}).data, "train", 2, 0)
    assert "encoded" in pipeline.device_eval_problem(jpeg, config.data)


def _setup(config):
    mesh = sharding.create_mesh(1)
    lr_fn = optim.create_learning_rate_fn(config.optim, steps_per_epoch=2, num_train_steps=config.num_train_steps)
    tx = train.create_optimizer(config.optim, lr_fn)
    abstract = train.abstract_train_state(config, mesh, tx)
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    step_fn, eval_fn = train.compile_steps(config, mesh, tx, lr_fn, shardings)
    return mesh, step_fn, eval_fn, shardings, lambda: train.create_train_state(config, tx, abstract)


def _close(got, want) -> None:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), **REASSOCIATION),
                 jax.device_get(got), jax.device_get(want))


def _assert_training_alike(config, stored, cropped) -> None:
    """The trainer's jitted, donated step from the same fresh state, run over the `stored` batches (pixels and
    positions, cropped inside it) and over the `cropped` ones (the crops made outside): the same params,
    BatchNorm running averages and metrics at every step. Then the trained weights evaluate alike through the
    compiled eval step whether its views are cut on the device from stored pixels or on the host, and the
    recomputed BatchNorm statistics are the same either way."""
    mesh, step_fn, eval_fn, shardings, fresh = _setup(config)
    trained = []
    for batches in (stored, cropped):
        state, rows = fresh(), []
        for batch in batches:
            state, row = step_fn(state, sharding.host_to_global(batch, mesh))
            rows.append(jax.device_get(row))
        trained.append((state, rows))
    (on_device, device_rows), (on_host, host_rows) = trained
    _close(on_device.params, on_host.params)
    _close(on_device.batch_stats, on_host.batch_stats)
    for device_row, host_row in zip(device_rows, host_rows):
        _close(device_row, host_row)
        assert float(device_row["train_top1"]) == float(host_row["train_top1"])

    host_config = _config(config.data.train_path, **{"data.device_crops": False, "model.variant": config.model.variant,
                                                     "precise_bn_examples": config.precise_bn_examples,
                                                     "batch_size": config.batch_size})
    train_source = sources.create_source(config.data, "train", 2, 0)
    eval_source = sources.create_source(config.data, "eval", 2, 0)
    assert pipeline.device_eval_problem(eval_source, config.data) is None
    model_vars = {"params": on_device.params, "batch_stats": on_device.batch_stats}
    views = {}
    for name, c in (("device", config), ("host", host_config)):
        batches = pipeline.eval_batches(eval_source, global_batch_size=6, image_size=IMAGE, resize_size=RESIZE,
                                        on_device=name == "device")  # 16 examples: the last batch is padded
        views[name] = train.evaluate(eval_fn, model_vars, eval_source, c, mesh, batches=batches)
        batches.close()
    assert views["device"]["eval_examples"] == views["host"]["eval_examples"] == len(eval_source)
    _close(views["device"], views["host"])
    if config.model.variant == "bn":
        statistics = []
        for c in (config, host_config):
            precise = precise_bn.PreciseBatchNorm(c, train_source, mesh, train.model_shardings_of(shardings),
                                                  config.precise_bn_examples)
            statistics.append(precise(on_device.params, on_device.batch_stats))
            precise.close()
        _close(*statistics)


def _host_crops(batch, offsets) -> dict:
    return {"image": np.stack([image[t:t + IMAGE, l:l + IMAGE] for image, (t, l) in zip(batch["image"], offsets)]),
            "label": batch["label"]}


@pytest.mark.parametrize("grad_accum_steps", [1, 2])
def test_the_compiled_step_trains_on_stored_pixels_as_on_the_host_cut_crops(records, grad_accum_steps):
    """The trainer's own jitted step, fed the stored arrays and positions for three steps, trains as on the
    host's numpy slices of the same boxes (params, BatchNorm statistics, metrics); with micro-batches too (the
    crop comes before the split). The weights then evaluate alike from device-cut and host-cut views."""
    config = _config(records, **{"optim.grad_accum_steps": grad_accum_steps, "batch_size": 8, "model.variant": "bn",
                                 "precise_bn_examples": 16})
    source = sources.create_source(config.data, "train", 2, 0)
    stored = list(pipeline.train_dataset(source, **_kwargs(seed=config.seed))[1:4])
    key, bounds = transforms.device_crop_key(config.seed), (REGION - IMAGE + 1, REGION - IMAGE + 1)
    offsets = [np.asarray(transforms.device_crop_offsets(key, batch["position"], bounds)) for batch in stored]
    assert len({tuple(o) for o in offsets[0]}) > 2, offsets[0]
    _assert_training_alike(config, stored, [_host_crops(b, o) for b, o in zip(stored, offsets)])


def test_the_compiled_step_resamples_inception_crops_as_the_device_resample_outside_it(records):
    """augment=inception: the trainer's jitted step, fed the stored arrays and positions, trains as on the crops
    device_inception_crops gives outside it (resampled, not sliced), micro-batched after the crop."""
    config = _config(records, **{"data.augment": "inception", "optim.grad_accum_steps": 2, "batch_size": 8})
    source = sources.create_source(config.data, "train", 2, 0)
    stored = list(pipeline.train_dataset(source, **_kwargs(seed=config.seed, augment="inception"))[1:3])
    key = transforms.device_crop_key(config.seed)
    boxes = np.asarray(transforms.device_inception_boxes(key, stored[0]["position"], (REGION, REGION)))
    assert len({tuple(b[2:] - b[:2]) for b in boxes}) > 4, boxes  # box sizes vary: resampled, not slices
    crop = jax.jit(transforms.device_inception_crops, static_argnums=3)
    host = [{"image": np.asarray(crop(b["image"], key, b["position"], IMAGE)), "label": b["label"]} for b in stored]
    assert host[0]["image"].shape == (8, IMAGE, IMAGE, 3) and host[0]["image"].dtype == np.uint8
    _assert_training_alike(config, stored, host)


STEPS = 4


def _train(workdir, records, processes: int, devices: int, *extra) -> list[str]:
    """`processes` trainers of `devices` CPU devices each (over loopback when more than one); their outputs."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    command = [sys.executable, "-m", "alexnet_jax.main", "--config=configs/digits.py", f"--workdir={workdir}",
               "--config.data.source=arrayrecord", f"--config.data.train_path={records}",
               f"--config.data.eval_path={records}", f"--config.data.image_size={IMAGE}",
               f"--config.data.resize_size={RESIZE}", "--config.data.device_crops=True", "--config.model.width=0.0625",
               "--config.batch_size=8", f"--config.num_train_steps={STEPS}", "--config.log_every_steps=1",
               f"--config.eval_every_steps={STEPS}", "--config.checkpoint_every_steps=2",
               "--config.precise_bn_examples=0", "--config.model.dropout_rate=0.0", *extra]
    cluster = lambda i: ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
                          f"--process_id={i}"] if processes > 1 else [])
    port = _free_port()
    procs = [subprocess.Popen([*command, *cluster(i)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(processes)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def _losses(workdir):
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    losses = {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}  # a resume rewrites its steps' rows
    return [losses[s] for s in range(1, STEPS + 1)]


def test_a_device_crop_run_resumed_on_another_topology_trains_on_the_same_crops(records, tmp_path):
    """2 processes x 2 devices write the step-2 checkpoint; 1 process x 4 devices resumes from it: its steps see
    the crops the 2x2 run saw (the positions are global, the stream starts at the checkpoint's step), so the
    losses are the uninterrupted 2x2 run's (float32 reassociation apart: another split of the same devices)."""
    out = _train(tmp_path / "2x2", records, 2, 2)[0]
    assert f"the train step cuts the {IMAGE} px crops from the stored {REGION}x{REGION} pixels" in out
    assert "data.device_crops: eval views are cut on the device from the stored pixels" in out
    shutil.copytree(tmp_path / "2x2", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / str(STEPS))
    out = _train(tmp_path / "resumed", records, 1, 4)[0]
    assert f"Resumed from {tmp_path / 'resumed' / 'checkpoints'} at step 2" in out, out[-3000:]
    assert _losses(tmp_path / "resumed") == pytest.approx(_losses(tmp_path / "2x2"), rel=1e-5)
    assert _eval_row(tmp_path / "resumed") == pytest.approx(_eval_row(tmp_path / "2x2"), rel=1e-5)


def _eval_row(workdir) -> dict:
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    row = [r for r in rows if "eval_loss" in r and r["step"] == STEPS][-1]
    return {key: row[key] for key in ("eval_loss", "eval_top1", "eval_top5")}


def test_a_device_inception_run_trains(records, tmp_path):
    """The trainer hands the inception crop to the step. That it is the same on any topology follows from the
    tests above: a box depends on its example's position alone, and positions are global (the alexnet run)."""
    out = _train(tmp_path / "1x2", records, 1, 2, "--config.data.augment=inception")[0]
    assert f"the train step resamples the inception {IMAGE} px crops from the stored {REGION}x{REGION} pixels" in out
    assert np.isfinite(_losses(tmp_path / "1x2")).all()
    # The evaluate command cuts its views on the device too (the checkpoint's data config asks for device crops),
    # from the same weights: the run's own eval row.
    result = run_cli("alexnet_jax.evaluate", f"--workdir={tmp_path / '1x2'}", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval views are cut on the device" in result.stderr
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    assert {key: evaluated[key] for key in _eval_row(tmp_path / "1x2")} == pytest.approx(
        _eval_row(tmp_path / "1x2"), rel=1e-5, abs=1e-6)


def test_a_source_that_does_not_qualify_is_refused_in_one_line(records, tmp_path):
    result = run_cli("alexnet_jax.main", "--config=configs/digits.py", f"--workdir={tmp_path / 'run'}",
                     "--config.data.device_crops=True", "--config.data.resize_size=73")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert lines[-1].startswith("error: config: data.device_crops needs the stored pixels at the crop's scale")
    assert "data.resize_size=data.image_size" in lines[-1] and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_what_the_sources_know_decides_the_refusal(records, tmp_path):
    src = tmp_path / "pictures"
    _write_folder(str(src), [(80, 96), (96, 80)] * 2)
    data = _config(records).data
    problem = lambda path, **changes: pipeline.device_crop_problem(
        sources.create_source(_config(path, **changes).data, "train", 2, 0), _config(path, **changes).data)
    whole = _convert(src, tmp_path / "whole", "--format=raw", f"--resize={RESIZE}")
    jpeg = _convert(src, tmp_path / "jpeg", f"--resize={RESIZE}")
    assert problem(records) is None
    assert "--center_crop" in problem(whole)
    assert "holds encoded images" in problem(jpeg)
    # inception resamples a box of the whole stored array, as the host does: any one shape and scale will do.
    inception = {"data.augment": "inception"}
    assert problem(records, **inception) is None and problem(records, **inception, **{"data.resize_size": 80}) is None
    assert "--center_crop" in problem(whole, **inception) and "holds encoded images" in problem(jpeg, **inception)
    at_80 = problem(records, **{"data.resize_size": 80})
    assert "short side 73, not data.resize_size=80" in at_80 and "data.resize_size=73" in at_80
    assert data.device_crops and pipeline.device_crop_problem(sources.create_source(data, "train", 2, 0),
                                                              {**data, "device_crops": False}) is None


def test_pictures_smaller_than_resize_are_scaled_up_so_every_record_has_the_one_shape(tmp_path):
    """With --center_crop a picture smaller than --resize is scaled up to it at conversion (the train view scales
    it up anyway), so a dataset with small pictures in it still qualifies for device crops."""
    src = tmp_path / "pictures"
    _write_folder(str(src), [(80, 96)] * 7 + [(50, 60)])
    path = _convert(src, tmp_path / "raw", "--format=raw", f"--resize={RESIZE}", f"--center_crop={REGION}")
    with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
        assert json.load(f)["shape"] == [REGION, REGION, 3]
    source = sources.create_source(_config(path).data, "train", 2, 0)
    read = source.read_pixels(np.arange(len(source)))
    assert {image.shape for image in read["images"]} == {(REGION, REGION, 3)} and set(read["short_sides"]) == {RESIZE}
    assert pipeline.device_crop_problem(source, _config(path).data) is None
    assert pipeline.train_dataset(source, **_kwargs())[0]["image"].shape == (8, REGION, REGION, 3)


def test_a_record_that_contradicts_its_manifest_stops_the_run_naming_it(tmp_path):
    """Records of each picture's own shape under a manifest that claims one shape (hand-edited, or written by
    another tool): the read tells, and names the record."""
    src = tmp_path / "pictures"
    _write_folder(str(src), [(80, 96)] * 7 + [(50, 60)])
    path = _convert(src, tmp_path / "raw", "--format=raw", f"--resize={RESIZE}")
    manifest_path = os.path.join(path, "manifest.json")
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump({**manifest, "center_crop": 50, "shape": [50, 50, 3]}, f)
    source = sources.create_source(_config(path, **{"data.image_size": 48}).data, "train", 2, 0)
    with pytest.raises(ValueError, match=r"data.device_crops: .*img_\d.png.* is stored \d+x\d+ at short side None, "
                                         r"not 50x50 at 73 as the records' manifest says"):
        pipeline.train_dataset(source, **_kwargs(image_size=48))[0]


def test_bench_loop_runs_with_device_crops():
    result = run_cli("alexnet_jax.bench", "loop", "--json", "--device_crops", "--workers=0", "--steps=2",
                     "--warmup=1", "--config.model.width=0.0625", "--config.batch_size=8",
                     "--config.data.image_size=64", "--config.data.resize_size=72", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["device_crops"] is True and "72 px images, cropped on the device" in report["data"]
    assert report["loop_img_per_s"] > 0 and report["skipped_steps"] == 0
