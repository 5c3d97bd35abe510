"""The ArrayRecord converter (data/convert.py) and the `arrayrecord` source: round trip, resume, bad files."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from alexnet_jax.config import base_config
from alexnet_jax.data import arrayrecord, convert, decode, pipeline, sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_folder(root) -> dict[str, int]:
    """12 pictures in 3 classes of assorted formats and sizes (one larger than --resize), and 2 bad files.
    Returns {relative path: label} of the good ones."""
    rng = np.random.default_rng(0)
    good = {}
    for c in range(3):
        os.makedirs(os.path.join(root, f"n0000000{c}"))
        for j in range(4):
            h, w = (30, 40) if j != 3 else (90, 60)
            coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
            image = coarse.resize((w, h), Image.Resampling.BICUBIC)  # smooth: JPEG keeps it to a level or two
            name = f"n0000000{c}/img_{j}." + ("png" if j == 1 else "JPEG")
            if j == 2:
                image = image.convert("L")
            image.save(os.path.join(root, name), quality=95)
            good[name] = c
    with open(os.path.join(root, "n00000001", "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really")
    open(os.path.join(root, "n00000002", "empty.png"), "wb").close()
    return good


def args_for(src, dst, *extra):
    return convert.parse_args([f"--src={src}", f"--dst={dst}", *extra])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    src = str(tmp_path_factory.mktemp("src"))
    good = write_folder(src)
    dst = str(tmp_path_factory.mktemp("dst"))
    manifest = convert.convert(args_for(src, dst, "--shards=3", "--resize=32", "--workers=1"))
    return src, dst, good, manifest


def test_round_trip_keeps_every_good_image_with_its_label(converted):
    src, dst, good, manifest = converted
    assert manifest["num_examples"] == len(good) == 12
    assert manifest["class_names"] == ["n00000000", "n00000001", "n00000002"]
    assert manifest["class_counts"] == [4, 4, 4]
    assert sorted(s["file"] for s in manifest["skipped"]) == ["n00000001/broken.jpg", "n00000002/empty.png"]
    assert all(s["error"] for s in manifest["skipped"])
    source = arrayrecord.ArrayRecordSource(dst)
    assert len(source) == 12 and source.class_names == manifest["class_names"]
    seen = {}
    for i in range(len(source)):
        header, _ = arrayrecord.decode_record(source._records[i])
        example = source[i]
        assert example["label"] == good[header["name"]]  # the label travels with the file it belongs to
        with open(os.path.join(src, header["name"]), "rb") as f:
            want = decode.decode_resized(f.read(), 32)
        assert example["image"].shape == want.shape and min(want.shape[:2]) <= 32
        assert np.abs(example["image"].astype(int) - want).mean() < 3  # re-encoded as JPEG
        seen[header["name"]] = i
    assert sorted(seen) == sorted(good)
    shard_labels = [{good[arrayrecord.decode_record(source._records[i])[0]["name"]] for i in range(a, a + 4)}
                    for a in (0, 4, 8)]
    assert any(len(labels) > 1 for labels in shard_labels), "shards mix classes"


def test_manifest_checksums_match_the_shards(converted):
    _, dst, _, manifest = converted
    assert len(manifest["shards"]) == 3
    for shard in manifest["shards"]:
        path = os.path.join(dst, shard["file"])
        assert os.path.getsize(path) == shard["bytes"]
        assert arrayrecord.file_sha256(path) == shard["sha256"]
    assert sum(s["num_records"] for s in manifest["shards"]) == 12
    assert arrayrecord.ArrayRecordSource(dst).verify() == []


def test_resume_skips_finished_shards_and_redoes_the_rest(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    os.makedirs(src)
    write_folder(src)
    first = convert.convert(args_for(src, dst, "--shards=4", "--resize=32", "--workers=1"))
    files = [os.path.join(dst, s["file"]) for s in first["shards"]]
    mtimes = [os.stat(f).st_mtime_ns for f in files]
    # An interruption: shard 2 never finished (no done marker, a half-written temp file lying around).
    os.remove(files[2] + ".done.json")
    os.replace(files[2], files[2] + ".tmp")
    os.remove(os.path.join(dst, arrayrecord.MANIFEST))
    second = convert.convert(args_for(src, dst, "--shards=4", "--resize=32", "--workers=1"))
    assert [os.stat(f).st_mtime_ns for f in files[:2] + files[3:]] == mtimes[:2] + mtimes[3:]
    assert os.path.exists(files[2]) and not os.path.exists(files[2] + ".tmp")
    assert second == first  # same bytes: the same deal of files to shards, the same checksums
    with pytest.raises(ValueError, match="resize"):  # resuming with other options would mix two conversions
        convert.convert(args_for(src, dst, "--shards=4", "--resize=64", "--workers=1"))


def test_raw_format_and_worker_processes(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    os.makedirs(src)
    good = write_folder(src)
    convert.convert(args_for(src, dst, "--shards=2", "--resize=0", "--format=raw", "--workers=2"))
    source = arrayrecord.ArrayRecordSource(dst)
    for i in range(len(source)):
        header, _ = arrayrecord.decode_record(source._records[i])
        with open(os.path.join(src, header["name"]), "rb") as f:
            np.testing.assert_array_equal(source[i]["image"], decode.decode(f.read()))  # raw: exact pixels
        assert source[i]["label"] == good[header["name"]]


def test_arrayrecord_source_in_the_pipeline_and_create_source(converted, tmp_path):
    _, dst, _, _ = converted
    c = base_config().data
    c.update(source="arrayrecord", train_path=dst, eval_path=dst, image_size=16, resize_size=20)
    train = sources.create_source(c, "train", num_classes=3, seed=0)
    kwargs = dict(global_batch_size=4, seed=1, image_size=16, resize_size=20)
    single = [next(it) for it in [pipeline.train_batches(train, **kwargs)] for _ in range(5)]
    halves = [[b for b, _ in zip(pipeline.train_batches(train, process_index=p, process_count=2, **kwargs),
                                 range(5))] for p in range(2)]
    for step in range(5):
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([halves[0][step][key], halves[1][step][key]]),
                                          single[step][key])
    # grain pickles the source into its worker processes: the shard readers must survive that (and reopen).
    clone = pickle.loads(pickle.dumps(train))
    assert len(clone) == len(train) and clone.class_names == train.class_names
    for i in (0, 5, 11):
        np.testing.assert_array_equal(clone[i]["image"], train[i]["image"])
    evaluation = sources.create_source(c, "eval", num_classes=3, seed=0)
    batches = list(pipeline.eval_batches(evaluation, global_batch_size=5, image_size=16, resize_size=20))
    labels = np.concatenate([b["label"] for b in batches])[np.concatenate([b["mask"] for b in batches])]
    np.testing.assert_array_equal(labels, [evaluation[i]["label"] for i in range(len(evaluation))])
    # evaluate checks the eval split against a checkpoint's class names instead: no train split needed.
    c.train_path = ""
    assert sources.create_source(c, "eval", 3, 0, class_names=train.class_names).class_names == train.class_names
    with pytest.raises(ValueError, match="differs from the one the checkpoint was trained with"):
        sources.create_source(c, "eval", 3, 0, class_names=["x", "y", "z"])
    # A shard that does not match its manifest is refused on open, naming it.
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(dst):
        (broken / name).write_bytes(open(os.path.join(dst, name), "rb").read())
    shard = json.loads((broken / arrayrecord.MANIFEST).read_text())["shards"][0]["file"]
    with open(broken / shard, "ab") as f:
        f.write(b"extra")
    with pytest.raises(ValueError, match=shard):
        arrayrecord.ArrayRecordSource(str(broken))


def test_flat_val_folder_converts_with_the_train_classes(tmp_path, capsys):
    val = tmp_path / "val"
    val.mkdir()
    wnids = ["n00000000", "n00000001", "n00000002"]
    rows = ["ImageId,PredictionString"]
    for i in range(1, 5):
        Image.new("RGB", (20, 20), (i, 0, 0)).save(val / f"ILSVRC2012_val_{i:08d}.JPEG")
        rows.append(f"ILSVRC2012_val_{i:08d},{wnids[i % 3]} 0 0 5 5")
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    train = tmp_path / "train"
    for w in wnids:
        (train / w).mkdir(parents=True)
    # Without --classes_from, the made-up wnids are not ImageNet classes: the error says which flag fixes it.
    without = convert.main(["--src", str(val), "--dst", str(tmp_path / "refused"), "--shards=1"])
    assert without == 2 and "pass --classes_from=" in capsys.readouterr().err
    manifest = convert.convert(args_for(str(val), str(tmp_path / "out"), "--shards=1", "--workers=1",
                                        f"--classes_from={train}"))
    assert manifest["class_names"] == wnids and manifest["num_examples"] == 4
    source = arrayrecord.ArrayRecordSource(str(tmp_path / "out"))
    for i in range(4):
        header, _ = arrayrecord.decode_record(source._records[i])
        number = int(header["name"][len("ILSVRC2012_val_"):-len(".JPEG")])
        assert source[i]["label"] == number % 3


def test_records_are_self_describing_not_pickles():
    record = arrayrecord.encode_record(7, "a/b.jpg", b"\x01\x02", "jpeg")
    header, payload = arrayrecord.decode_record(record)
    assert header == {"label": 7, "name": "a/b.jpg", "format": "jpeg"} and bytes(payload) == b"\x01\x02"
    with pytest.raises(ValueError, match="magic"):
        arrayrecord.decode_record(b"\x80\x04K\x01.")


def test_cli_progress_bad_files_and_usage_errors(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_folder(str(src))
    run = lambda *a: subprocess.run([sys.executable, "-m", "alexnet_jax.data.convert", *a], cwd=REPO,
                                    capture_output=True, text=True, timeout=300)
    done = run(f"--src={src}", f"--dst={tmp_path / 'out'}", "--shards=2", "--resize=32", "--workers=1")
    assert done.returncode == 0, done.stderr
    assert "12/14 images" in done.stderr or "14/14 images" in done.stderr  # the progress line
    assert f"skipped unreadable file {src / 'n00000001' / 'broken.jpg'}" in done.stderr
    assert "wrote 12 examples of 3 classes in 2 shards" in done.stderr
    again = run(f"--src={src}", f"--dst={tmp_path / 'out'}", "--shards=2", "--resize=32", "--workers=1")
    assert again.returncode == 0 and "2 of 2 shards already done" in again.stderr
    missing = run(f"--src={tmp_path / 'nope'}", f"--dst={tmp_path / 'o2'}", "--shards=2")
    assert missing.returncode == 2 and "nope" in missing.stderr
    too_many = run(f"--src={src}", f"--dst={tmp_path / 'o3'}", "--shards=99")
    assert too_many.returncode == 2 and "--shards=99" in too_many.stderr
    assert not os.path.exists(tmp_path / "o3")
    usage = run(f"--src={src}")
    assert usage.returncode == 2 and "--dst" in usage.stderr


def test_center_crop_raw_records_keep_the_central_region_and_crop_like_the_whole_picture(tmp_path):
    """--center_crop=N stores only the central N x N of the resized picture, with the picture's short side; at
    data.resize_size equal to the stored short side the eval crop is pixel for pixel the one from whole-picture
    raw records, and train crops come out at the configured size."""
    src = str(tmp_path / "src")
    write_folder(src)
    whole, region = str(tmp_path / "whole"), str(tmp_path / "region")
    convert.convert(args_for(src, whole, "--shards=1", "--resize=28", "--format=raw", "--workers=1"))
    manifest = convert.convert(args_for(src, region, "--shards=1", "--resize=28", "--format=raw", "--workers=1",
                                        "--center_crop=24"))
    assert manifest["center_crop"] == 24
    full, cut = arrayrecord.ArrayRecordSource(whole), arrayrecord.ArrayRecordSource(region)
    for i in range(len(cut)):
        record, picture = cut.read_record(i), full.read_record(i)
        h, w = picture["image"].shape[:2]
        assert record["image"].shape == (24, 24, 3) and record["short_side"] == min(h, w) == 28
        top, left = (h - 24) // 2, (w - 24) // 2
        np.testing.assert_array_equal(record["image"], picture["image"][top:top + 24, left:left + 24])
        assert "short_side" not in picture

    config = base_config().data
    config.source, config.image_size, config.resize_size = "arrayrecord", 16, 28  # 24 - 16 even: same centre
    config.train_path = config.eval_path = region
    eval_kwargs = dict(global_batch_size=4, image_size=16, resize_size=28)
    region_batches = list(pipeline.eval_batches(sources.create_source(config, "eval", 3, 0), **eval_kwargs))
    whole_batches = list(pipeline.eval_batches(full, **eval_kwargs))
    for a, b in zip(region_batches, whole_batches, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    train = next(pipeline.train_batches(sources.create_source(config, "train", 3, 0), global_batch_size=4, seed=0,
                                        image_size=16, resize_size=28))
    assert train["image"].shape == (4, 16, 16, 3)

    config.resize_size = 18  # 24 px of a 28 px short side is 15.4 px at 18: too little for a 16 px crop
    with pytest.raises(ValueError, match=r"data.train_path .* raise data.resize_size to at least 19"):
        sources.create_source(config, "train", 3, 0)
    with pytest.raises(SystemExit):
        args_for(src, str(tmp_path / "x"), "--shards=1", "--center_crop=24")  # JPEG records: refused


class CountingRecords(arrayrecord.ArrayRecordSource):
    reads = 0

    def read_pixels(self, indices):
        type(self).reads += 1
        return super().read_pixels(indices)


@pytest.mark.parametrize("center_crop, resize_size", [(0, 28), (0, 32), (24, 28), (24, 32)],
                         ids=["whole-slice", "whole-resampled", "region-slice", "region-resampled"])
def test_raw_records_read_a_batch_at_a_time_give_the_per_example_crops(tmp_path, center_crop, resize_size):
    """Raw records are read one local batch per grain element (array_record's batched read); the train
    batches are pixel for pixel those of the per-example path: slices where the records are at data.resize_size
    (whole pictures of short side 28, or their central region), resampled where they are not."""
    src = str(tmp_path / "src")
    write_folder(src)
    dst = str(tmp_path / "raw")
    extra = [f"--center_crop={center_crop}"] if center_crop else []
    convert.convert(args_for(src, dst, "--shards=2", "--resize=28", "--format=raw", "--workers=1", *extra))
    source = CountingRecords(dst)
    assert source.holds_pixels
    read = source.read_pixels([5, 0, 11])
    assert [int(x) for x in read["labels"]] == [int(source.read_record(i)["label"]) for i in (5, 0, 11)]
    CountingRecords.reads = 0
    for process_count in (1, 2):
        for p in range(process_count):
            kwargs = dict(global_batch_size=4, seed=1, image_size=16, resize_size=resize_size, process_index=p,
                          process_count=process_count)
            batched = pipeline.train_dataset(source, **kwargs)
            per_example = pipeline.train_dataset(source, batch_reads=False, **kwargs)
            for b in range(7):  # past the 12-example epoch
                got, want = batched[b], per_example[b]
                np.testing.assert_array_equal(got["image"], want["image"])
                np.testing.assert_array_equal(got["label"], want["label"])
    assert CountingRecords.reads == 3 * 7  # one read per local batch of the batched path
