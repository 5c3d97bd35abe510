"""Pixel shards (data.convert --format=pixels, data/pixelshards.py): the pixels, labels and order of the raw
--center_crop records of the same pictures, read by os.preadv straight into the batch; the same train batches
on any worker count; damage found on open or by verify(), one line naming the file."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

from alexnet_jax.data import arrayrecord, convert, pipeline, pixelshards, sources
from conftest import REPO, tiny_config

IMAGE, RESIZE, REGION = 64, 72, 68  # the central 68x68 at short side 72: crop offsets 0..4 each way
STEPS = 3


def _write_folder(root) -> None:
    """24 smooth pictures of 40-80 px in 3 classes (most smaller than --resize: scaled up), and one bad file."""
    rng = np.random.default_rng(0)
    sizes = [(40, 56), (80, 60), (50, 50), (72, 80), (64, 44), (45, 78)]
    for k in range(24):
        folder = os.path.join(root, f"n0000000{k % 3}")
        os.makedirs(folder, exist_ok=True)
        h, w = sizes[k % len(sizes)]
        coarse = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8))
        coarse.resize((w, h), Image.Resampling.BICUBIC).save(os.path.join(folder, f"img_{k}.png"))
    with open(os.path.join(root, "n00000001", "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really")


def _convert(src, dst, fmt, *extra) -> str:
    convert.convert(convert.parse_args([f"--src={src}", f"--dst={dst}", "--shards=3", "--workers=1",
                                        f"--format={fmt}", f"--resize={RESIZE}", f"--center_crop={REGION}", *extra]))
    return str(dst)


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The same folder converted to raw records and to pixel shards: (raw dir, pixels dir)."""
    src = tmp_path_factory.mktemp("pictures")
    _write_folder(str(src))
    return (_convert(src, tmp_path_factory.mktemp("raw"), "raw"),
            _convert(src, tmp_path_factory.mktemp("pixels"), pixelshards.ENCODING))


def _file_part(name: str) -> str:
    return name.split("] ", 1)[1]  # "<root>[i] (<file>)": the roots differ


def test_pixel_shards_hold_the_raw_records_pixels_labels_and_order(both):
    raw_dir, pixels_dir = both
    raw, shards = sources.open_converted(raw_dir), sources.open_converted(pixels_dir)
    assert isinstance(shards, pixelshards.PixelShardSource) and isinstance(raw, arrayrecord.ArrayRecordSource)
    manifest = shards.manifest
    assert manifest["encoding"] == "pixels" and manifest["shape"] == [REGION, REGION, 3]
    assert (manifest["resize"], manifest["center_crop"]) == (RESIZE, REGION)
    assert [s["file"] for s in manifest["skipped"]] == ["n00000001/broken.jpg"]
    for key in ("class_names", "class_counts", "num_examples"):
        assert manifest[key] == raw.manifest[key], key
    assert [s["error"] for s in manifest["skipped"]] == [s["error"] for s in raw.manifest["skipped"]]
    for shard in manifest["shards"]:  # flat files of fixed-size records, the sidecar checksummed beside them
        path = os.path.join(pixels_dir, shard["file"])
        assert shard["file"].endswith(".pixels") and os.path.getsize(path) == shard["bytes"]
        assert shard["bytes"] == shard["num_records"] * REGION * REGION * 3
        assert arrayrecord.file_sha256(path + ".index.json") == shard["index_sha256"]
    assert shards.verify() == []
    assert len(shards) == len(raw) == 24 and shards.class_names == raw.class_names
    assert shards.holds_pixels and shards.uniform_pixels == raw.uniform_pixels == (REGION, REGION, RESIZE)
    for i in range(len(raw)):
        want, got = raw.read_record(i), shards.read_record(i)
        assert sorted(got) == sorted(want) == ["image", "index", "label", "short_side"]
        np.testing.assert_array_equal(got["image"], want["image"])
        assert (got["label"], got["index"], got["short_side"]) == (want["label"], want["index"], want["short_side"])
        assert _file_part(shards.name(i)) == _file_part(raw.name(i))
        assert shards[i]["label"] == raw[i]["label"]
    order = np.random.default_rng(1).permutation(len(raw))  # across shards, in no order
    out = np.empty((len(order), REGION, REGION, 3), np.uint8)
    labels = shards.read_pixels_into(order, out)
    want = raw.read_pixels(order)
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, want["labels"])
    np.testing.assert_array_equal(out, np.stack(want["images"]))
    read = shards.read_pixels(order[:5])
    np.testing.assert_array_equal(np.stack(read["images"]), out[:5])
    # a grain worker's path: the kernel writes the same records back to back into a file (shared memory there)
    with tempfile.TemporaryFile() as sent:
        np.testing.assert_array_equal(shards.send_pixels_to(order, sent.fileno()), labels)
        sent.seek(0)
        np.testing.assert_array_equal(np.frombuffer(sent.read(), np.uint8).reshape(out.shape), out)
    assert read["short_sides"] == want["short_sides"][:5] == [RESIZE] * 5
    # grain pickles the source into its workers: no descriptor travels, the copy opens its own
    shards.read_record(0)
    clone = pickle.loads(pickle.dumps(shards))
    assert shards._fds and not clone._fds
    np.testing.assert_array_equal(clone.read_record(7)["image"], want["images"][list(order).index(7)])
    with pytest.raises(IndexError, match="index 24 out of range"):
        shards.read_record(24)


def test_a_resumed_pixel_conversion_redoes_only_the_unfinished_shard(both, tmp_path):
    _, pixels_dir = both
    copy = shutil.copytree(pixels_dir, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    unfinished = copy / manifest["shards"][1]["file"]
    for path in (unfinished, f"{unfinished}.done.json", f"{unfinished}.index.json", copy / "manifest.json"):
        os.remove(path)
    kept = os.stat(copy / manifest["shards"][0]["file"]).st_mtime_ns
    _convert(manifest["source"], copy, pixelshards.ENCODING)
    assert json.loads((copy / "manifest.json").read_text()) == manifest and os.stat(copy / manifest["shards"][0]["file"]).st_mtime_ns == kept


def _first_batches(source, workers: int = 0, device_crops: bool = True) -> list[dict]:
    """The first 4 train batches of 8 (past the end of the 24-example epoch)."""
    iterator = pipeline.train_batches(source, workers=workers, global_batch_size=8, seed=3, image_size=IMAGE,
                                      resize_size=RESIZE, device_crops=device_crops)
    try:
        return [next(iterator) for _ in range(4)]
    finally:
        iterator.close()


def test_train_batches_on_any_worker_count_are_the_raw_records_batches(both):
    """data.device_crops ships the stored pixels whole: read_pixels_into with 0 and 2 grain workers gives the
    batches the raw records of the same conversion give, pixel for pixel; and so do the crops cut on the host."""
    raw_dir, pixels_dir = both
    config = tiny_config("arrayrecord", **{"data.train_path": pixels_dir, "data.eval_path": pixels_dir,
                                           "data.image_size": IMAGE, "data.resize_size": RESIZE,
                                           "data.device_crops": True, "model.num_classes": 3})
    shards = sources.create_source(config.data, "train", 3, 0)
    assert isinstance(shards, pixelshards.PixelShardSource)
    assert pipeline.device_crop_problem(shards, config.data) is None
    want = _first_batches(sources.open_converted(raw_dir))
    for workers in (0, 2):
        got = _first_batches(shards, workers)
        for b in range(4):
            assert got[b]["image"].shape == (8, REGION, REGION, 3)
            for key in ("image", "label", "position"):
                np.testing.assert_array_equal(got[b][key], want[b][key], err_msg=f"{workers} workers, {key}")
    host = _first_batches(shards, device_crops=False)
    for got, want in zip(host, _first_batches(sources.open_converted(raw_dir), device_crops=False), strict=True):
        assert got["image"].shape == (8, IMAGE, IMAGE, 3)
        for key in ("image", "label"):
            np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.skipif(not os.path.isdir(pipeline.SHM_DIR), reason="no /dev/shm (not Linux)")
def test_a_worker_whose_read_fails_frees_its_shared_memory_and_names_the_shard(both, tmp_path):
    """A grain worker sends its batch's records into a new shared-memory block; when a read fails there (the
    shards shrank after the source was opened), the error reaches the trainer and the block is not left behind."""
    _, pixels_dir = both
    copy = shutil.copytree(pixels_dir, tmp_path / "copy")
    source = pixelshards.PixelShardSource(str(copy))
    for shard in source.manifest["shards"]:
        os.truncate(copy / shard["file"], 0)
    pipeline.release_orphaned_shared_memory(str(tmp_path / "run"))  # names this test's blocks from here on
    tag = pipeline._shm_tag
    with pytest.raises(ValueError, match="short read"):
        _first_batches(source, workers=1)
    assert [name for name in os.listdir(pipeline.SHM_DIR) if name.startswith(tag)] == []


def test_the_eval_split_is_checked_against_the_train_classes(both, tmp_path):
    raw_dir, pixels_dir = both
    data = tiny_config("arrayrecord", **{"data.train_path": raw_dir, "data.eval_path": pixels_dir,
                                         "data.image_size": IMAGE, "data.resize_size": RESIZE}).data
    evaluation = sources.create_source(data, "eval", 3, 0)
    assert isinstance(evaluation, pixelshards.PixelShardSource)
    with pytest.raises(ValueError, match="differs from the one the checkpoint was trained with"):
        sources.create_source(data, "eval", 3, 0, class_names=["a", "b", "c"])
    other = shutil.copytree(pixels_dir, tmp_path / "other")
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "class_names": ["x", "y", "z"]}))
    data.train_path = str(other)
    with pytest.raises(ValueError, match="differs from data.train_path's"):
        sources.create_source(data, "eval", 3, 0)


def _one_line_naming(error, path) -> None:
    message = str(error.value)
    assert str(path) in message and "\n" not in message, message


def test_damage_is_one_line_naming_the_file(both, tmp_path):
    _, pixels_dir = both
    copy = shutil.copytree(pixels_dir, tmp_path / "copy")
    files = [copy / s["file"] for s in json.loads((copy / "manifest.json").read_text())["shards"]]
    # corrupted, same size: opens (the sizes agree), verify() names the shard, and a damaged sidecar
    with open(files[1], "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with open(f"{files[2]}.index.json", "a", encoding="ascii") as f:
        f.write(" ")
    assert pixelshards.PixelShardSource(str(copy)).verify() == [str(files[1]), f"{files[2]}.index.json"]
    # shrunk after open: the read that runs off its end names it
    opened = pixelshards.PixelShardSource(str(copy))
    with open(files[0], "r+b") as f:
        f.truncate(os.path.getsize(files[0]) - 1)
    last = opened.manifest["shards"][0]["num_records"] - 1
    with pytest.raises(ValueError, match="short read") as error:
        opened.read_record(last)
    _one_line_naming(error, files[0])
    with tempfile.TemporaryFile() as sent, pytest.raises(ValueError, match="short read") as error:
        opened.send_pixels_to([0, last], sent.fileno())
    _one_line_naming(error, files[0])
    # truncated on disk: refused on open
    with pytest.raises(ValueError, match="truncated or replaced") as error:
        pixelshards.PixelShardSource(str(copy))
    _one_line_naming(error, files[0])
    os.remove(files[0])
    with pytest.raises(ValueError, match="missing") as error:
        pixelshards.PixelShardSource(str(copy))
    _one_line_naming(error, files[0])
    with pytest.raises(ValueError, match="gcsfuse") as error:
        pixelshards.PixelShardSource("gs://some-bucket/pixels")
    _one_line_naming(error, "gs://some-bucket/pixels")


@pytest.mark.parametrize("flags, named", [
    (["--resize=72"], "--format=pixels needs --resize and --center_crop"),
    (["--resize=0", "--center_crop=68"], "--format=pixels needs --resize and --center_crop"),
    (["--resize=64", "--center_crop=68"], "--center_crop=68 is more than the short side --resize=64"),
])
def test_bad_converter_flags_are_a_parser_error(tmp_path, capsys, flags, named):
    with pytest.raises(SystemExit) as exit_info:
        convert.parse_args([f"--src={tmp_path}", f"--dst={tmp_path / 'out'}", "--shards=1", "--format=pixels",
                            *flags])
    assert exit_info.value.code == 2 and named in capsys.readouterr().err


def _train(workdir, records, workers: int = 0) -> tuple[list[float], dict]:
    """A short device-crop training run through the CLI on `records` with `workers` grain worker processes: its
    train losses and its eval row."""
    command = [sys.executable, "-m", "alexnet_jax.main", "--config=configs/digits.py", f"--workdir={workdir}",
               "--config.data.source=arrayrecord", f"--config.data.train_path={records}",
               f"--config.data.eval_path={records}", f"--config.data.image_size={IMAGE}",
               f"--config.data.resize_size={RESIZE}", "--config.data.device_crops=True", "--config.model.num_classes=3",
               "--config.model.width=0.0625", "--config.batch_size=8", f"--config.num_train_steps={STEPS}",
               "--config.log_every_steps=1", f"--config.eval_every_steps={STEPS}", "--config.precise_bn_examples=0",
               f"--config.data.workers={workers}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    losses = {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}
    (evaluation,) = [r for r in rows if "eval_loss" in r]
    return [losses[s] for s in range(1, STEPS + 1)], evaluation


def test_a_training_run_on_pixel_shards_is_the_run_on_raw_records(both, tmp_path):
    """The same pixels in the same order: the same batches, so the same losses and eval metrics, exactly; the
    pixel shards read by 2 grain workers (each batch sent by the kernel into shared memory), the raw records in
    the trainer's process."""
    raw_dir, pixels_dir = both
    losses, evaluation = _train(tmp_path / "pixels", pixels_dir, workers=2)
    assert np.isfinite(losses).all() and evaluation["eval_examples"] == 24
    assert (losses, evaluation) == _train(tmp_path / "raw", raw_dir)
