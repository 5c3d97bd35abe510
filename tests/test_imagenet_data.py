"""ImageNet-shaped input: ImageFolder and flat-val sources, the pipeline over real files (bad ones included),
augmentation bounds, on-device lighting and ten-crop, and the shipped class names. Files are written here."""

import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import REPO

from alexnet_jax.config import base_config
from alexnet_jax.data import classes, imagefolder, pipeline, sources, transforms

IMAGE_SIZE, RESIZE_SIZE = 16, 20


def identity_image(label: int, index: int, size=(24, 30)) -> Image.Image:
    """A constant picture that spells (label, index): R = 40 * label + 20, G/B = index. Lossless (PNG), and every
    crop or resize of a constant picture is that constant, so any view of it tells which file it came from."""
    return Image.new("RGB", size, (40 * label + 20, index % 256, index // 256))


def identity_of(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, indices) of a batch of identity_image views."""
    corner = images[:, 0, 0, :].astype(np.int64)
    assert (images == images[:, :1, :1, :]).all(), "views of constant pictures are constant"
    return (corner[:, 0] - 20) // 40, corner[:, 1] + 256 * corner[:, 2]


def write_identity_folder(root: str, num_classes: int, per_class: int, sizes=((24, 30), (30, 22), (12, 40))):
    """root/class_<c>/img_<i>.png; returns {index: label}. Sizes vary (some smaller than the crop)."""
    truth = {}
    for c in range(num_classes):
        os.makedirs(os.path.join(root, f"class_{c}"), exist_ok=True)
        for j in range(per_class):
            index = c * per_class + j
            identity_image(c, index, sizes[index % len(sizes)]).save(os.path.join(root, f"class_{c}", f"img_{j}.png"))
            truth[index] = c
    return truth


def write_bad_files(root: str) -> list[str]:
    """An empty file, a text file and a truncated JPEG, with image extensions, among the class folders."""
    paths = [os.path.join(root, "class_0", "empty.jpg"), os.path.join(root, "class_1", "notes.JPEG"),
             os.path.join(root, "class_2", "truncated.jpg")]
    open(paths[0], "wb").close()
    with open(paths[1], "w") as f:
        f.write("not a picture\n")
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(buffer, "JPEG")
    with open(paths[2], "wb") as f:
        f.write(buffer.getvalue()[:200])
    return paths


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w:
            np.testing.assert_array_equal(g[key], w[key])


def concat(per_process):
    return [{k: np.concatenate([p[s][k] for p in per_process]) for k in per_process[0][s]}
            for s in range(len(per_process[0]))]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("train"))
    truth = write_identity_folder(root, num_classes=3, per_class=7)
    return root, truth


@pytest.fixture(scope="module")
def folder_with_bad_files(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("train_bad"))
    truth = write_identity_folder(root, num_classes=3, per_class=6)
    return root, truth, write_bad_files(root)


# --- sources -----------------------------------------------------------------------------------------------------

def test_imagefolder_lists_images_sorted_and_ignores_the_rest(tmp_path):
    root = tmp_path
    for folder in ("b_cls", "a_cls", "a_cls/nested", ".hidden_cls", "empty_cls"):
        (root / folder).mkdir()
    Image.new("RGB", (5, 5), (10, 0, 0)).save(root / "b_cls" / "x.JPEG", "JPEG")
    Image.new("RGB", (5, 5), (20, 0, 0)).save(root / "a_cls" / "z.PnG", "PNG")
    Image.new("RGB", (5, 5), (30, 0, 0)).save(root / "a_cls" / "nested" / "y.webp", "WEBP")
    Image.new("RGB", (5, 5), (40, 0, 0)).save(root / "a_cls" / "b.bmp", "BMP")
    Image.new("RGB", (5, 5)).save(root / ".hidden_cls" / "h.png")
    Image.new("RGB", (5, 5)).save(root / "a_cls" / ".hidden.png")
    (root / "a_cls" / "notes.txt").write_text("x")
    (root / "a_cls" / "Thumbs.db").write_bytes(b"\0" * 10)
    (root / "loose.jpg").write_bytes(b"top-level files are not a class")
    src = imagefolder.ImageFolderSource(str(root))
    assert src.class_names == ["a_cls", "b_cls", "empty_cls"]
    assert [src.relative_path(i) for i in range(len(src))] == [
        "a_cls/b.bmp", "a_cls/nested/y.webp", "a_cls/z.PnG", "b_cls/x.JPEG"]
    assert src.labels.tolist() == [0, 0, 0, 1]
    example = src[3]
    assert example["label"] == 1 and example["image"].shape == (5, 5, 3) and example["image"].dtype == np.uint8
    assert src.name(0) == os.path.join(str(root), "a_cls/b.bmp")
    record = src.read_record(2)
    assert record["label"] == 0 and record["index"] == 2 and record["encoded"][:4] == b"\x89PNG"


def test_eval_folder_uses_the_train_classes(tmp_path):
    for c in ("n1", "n2", "n3"):
        (tmp_path / "train" / c).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "train" / c / "a.png")
    (tmp_path / "val" / "n3").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "val" / "n3" / "a.png")
    val = imagefolder.ImageFolderSource(str(tmp_path / "val"), imagefolder.training_class_names(
        str(tmp_path / "train")))
    assert val.class_names == ["n1", "n2", "n3"] and val.labels.tolist() == [2]  # not 0: the train label
    (tmp_path / "val" / "n9").mkdir()
    with pytest.raises(ValueError, match="n9"):
        imagefolder.ImageFolderSource(str(tmp_path / "val"), ["n1", "n2", "n3"])


def test_symlink_loops_are_skipped_once_with_a_warning(tmp_path, caplog):
    root = tmp_path / "folder"
    (root / "a" / "deep").mkdir(parents=True)
    Image.new("RGB", (5, 5)).save(root / "a" / "img.png")
    Image.new("RGB", (5, 5)).save(root / "a" / "deep" / "img.png")
    os.symlink("..", root / "a" / "deep" / "up")  # back to a: a cycle that never ends
    os.symlink("me.png", root / "a" / "me.png")  # points at itself: "Too many levels of symbolic links"
    os.symlink("b", root / "b")  # a class folder that points at itself
    with caplog.at_level(logging.WARNING):
        src = imagefolder.create(str(root))
        again = imagefolder.ImageFolderSource(str(root))
    assert src.class_names == again.class_names == ["a"]
    assert [src.relative_path(i) for i in range(len(src))] == ["a/deep/img.png", "a/img.png"]
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    for loop in ("a/deep/up", "a/me.png", "b"):
        assert sum(m.startswith(f"{root / loop}: skipped") for m in skipped) == 1, skipped
    assert len(skipped) == 3, skipped


UNREADABLE_CHILD = """
import json, logging, sys
from alexnet_jax.data import imagefolder, pipeline
src = imagefolder.ImageFolderSource(sys.argv[1])
named = {}
for i in range(len(src)):
    named[src.relative_path(i)] = pipeline.describe_bad_file(src, i)
    try:
        src[i]
    except ValueError as error:
        named[src.relative_path(i)] += " | " + str(error)
print(json.dumps(named))
list(pipeline.eval_batches(src, global_batch_size=4, image_size=8, resize_size=8))  # logs the bad ones
"""


def test_unreadable_files_and_dangling_symlinks_report_their_os_error(tmp_path):
    """chmod 000 stops no root with CAP_DAC_OVERRIDE, so the reader runs without it (or as the user it is)."""
    root = tmp_path / "folder"
    (root / "c").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "c" / "good.png")
    Image.new("RGB", (8, 8)).save(root / "c" / "locked.png")
    os.chmod(root / "c" / "locked.png", 0)
    os.symlink("gone.png", root / "c" / "dangling.png")
    command = [sys.executable, "-c", UNREADABLE_CHILD, str(root)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv is not installed to drop CAP_DAC_OVERRIDE")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stderr[-3000:]
    named = json.loads(result.stdout.splitlines()[-1])
    assert named["c/locked.png"] == (f"{root}/c/locked.png: Permission denied | "
                                     f"{root}/c/locked.png: Permission denied")
    assert named["c/dangling.png"] == (f"{root}/c/dangling.png: No such file or directory | "
                                       f"{root}/c/dangling.png: No such file or directory")
    assert "empty file" not in result.stderr
    assert f"left out of eval: {root}/c/locked.png: Permission denied" in result.stderr, result.stderr[-3000:]
    assert f"left out of eval: {root}/c/dangling.png: No such file or directory" in result.stderr


def write_flat_val(directory, wnids_of_files: dict[str, str]):
    directory.mkdir(parents=True)
    for stem, wnid in wnids_of_files.items():
        Image.new("RGB", (6, 6), (int(wnid[-2:]), 0, 0)).save(directory / f"{stem}.JPEG", "JPEG", quality=100)


def test_flat_val_with_loc_solution_csv_three_folders_up(tmp_path):
    wnids = ["n00000010", "n00000020", "n00000030"]
    files = {f"ILSVRC2012_val_{i:08d}": wnids[(i * 7) % 3] for i in range(1, 7)}
    val_dir = tmp_path / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    write_flat_val(val_dir, files)
    Image.new("RGB", (6, 6)).save(val_dir / "stray_file.JPEG")  # not in the ground truth: left out, not guessed
    rows = ["ImageId,PredictionString"] + [f"{stem},{wnid} 1 2 3 4 {wnid} 5 6 7 8" for stem, wnid in files.items()]
    rows.append("ILSVRC2012_val_00000099,n00000010 1 2 3 4")  # in the ground truth, no file: fine
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    assert imagefolder.is_flat_image_folder(str(val_dir))
    src = imagefolder.create(str(val_dir), class_names=wnids)
    assert isinstance(src, imagefolder.FlatValSource) and src.ground_truth == str(tmp_path / "LOC_val_solution.csv")
    assert len(src) == 6
    for i in range(len(src)):
        stem = os.path.splitext(src.relative_path(i))[0]
        assert src.class_names[src.label(i)] == files[stem]
    with pytest.raises(ValueError, match="n00000030"):  # a class the model was not trained on
        imagefolder.create(str(val_dir), class_names=wnids[:2])


def test_flat_val_with_devkit_ground_truth_needs_the_devkit_synset_order(tmp_path):
    sorted_wnids = ["n00000010", "n00000020", "n00000030"]
    devkit_order = ["n00000030", "n00000010", "n00000020"]  # ILSVRC2012_ID 1, 2, 3
    ids = [2, 1, 3, 3, 1]  # ground truth of val images 1..5
    files = {f"ILSVRC2012_val_{i:08d}": devkit_order[ids[i - 1] - 1] for i in range(1, 6)}
    write_flat_val(tmp_path / "val", files)
    (tmp_path / "val" / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(map(str, ids)) + "\n")
    with pytest.raises(ValueError, match="labels_file"):
        imagefolder.create(str(tmp_path / "val"), class_names=sorted_wnids)
    synsets = tmp_path / "devkit_synsets.txt"
    synsets.write_text("".join(f"{k} {w} some words, more words\n" for k, w in enumerate(devkit_order, 1)))
    src = imagefolder.create(str(tmp_path / "val"), class_names=sorted_wnids, labels_file=str(synsets))
    got = {os.path.splitext(src.relative_path(i))[0]: src.class_names[src.label(i)] for i in range(len(src))}
    assert got == files


def data_config(**overrides):
    c = base_config().data
    c.image_size, c.resize_size = IMAGE_SIZE, RESIZE_SIZE
    c.update(overrides)
    return c


def test_create_source_imagefolder_and_the_class_count_check(folder, tmp_path):
    root, truth = folder
    val = tmp_path / "val"
    (val / "class_1").mkdir(parents=True)
    identity_image(1, 0).save(val / "class_1" / "a.png")
    c = data_config(source="imagefolder", train_path=root, eval_path=str(val))
    train = sources.create_source(c, "train", num_classes=3, seed=0)
    evaluation = sources.create_source(c, "eval", num_classes=3, seed=0)
    assert len(train) == len(truth) and train.class_names == evaluation.class_names
    assert evaluation.labels.tolist() == [1]
    with pytest.raises(ValueError, match="3 classes.*num_classes is 2"):
        sources.create_source(c, "train", num_classes=2, seed=0)
    with pytest.raises(ValueError, match="eval_path"):
        sources.create_source(data_config(source="imagefolder", train_path=root, eval_path=str(tmp_path / "nope")),
                              "eval", num_classes=3, seed=0)


# --- the pipeline over files ---------------------------------------------------------------------------------------

def train_kwargs(**overrides):
    kwargs = dict(global_batch_size=8, seed=0, image_size=IMAGE_SIZE, resize_size=RESIZE_SIZE)
    kwargs.update(overrides)
    return kwargs


@pytest.mark.parametrize("augment", ["alexnet", "inception"])
def test_train_batches_from_files_are_deterministic_labelled_and_split_across_processes(folder, augment):
    root, truth = folder
    src = imagefolder.ImageFolderSource(root)
    steps = 6  # 21 files, 8 per batch: crosses two epoch boundaries
    single_iterator = pipeline.train_batches(src, **train_kwargs(augment=augment))
    single = take(single_iterator, steps)
    again = take(pipeline.train_batches(src, **train_kwargs(augment=augment)), steps)
    assert_batches_equal(again, single)
    assert single_iterator.bad_files == 0
    for batch in single:
        assert set(batch) == {"image", "label"}  # the bad-file bookkeeping never reaches the device
        assert batch["image"].shape == (8, IMAGE_SIZE, IMAGE_SIZE, 3) and batch["image"].dtype == np.uint8
        labels, indices = identity_of(batch["image"])
        np.testing.assert_array_equal(batch["label"], labels)
        np.testing.assert_array_equal(labels, [truth[i] for i in indices])
    order = np.concatenate([identity_of(b["image"])[1] for b in single])
    assert sorted(order[:21]) == list(range(21)) and sorted(order[21:42]) == list(range(21))
    assert not np.array_equal(order[:21], order[21:42])
    for count in (2, 4):
        per_process = [take(pipeline.train_batches(src, **train_kwargs(augment=augment, process_index=p,
                                                                        process_count=count)), steps)
                       for p in range(count)]
        assert_batches_equal(concat(per_process), single)
    resumed = take(pipeline.train_batches(src, start_step=4, **train_kwargs(augment=augment)), 2)
    assert_batches_equal(resumed, single[4:])


@pytest.mark.parametrize("augment", ["alexnet", "inception"])
def test_no_good_jpeg_is_ever_taken_for_a_bad_one(tmp_path, augment):
    # Photo-like JPEGs smaller than, about and larger than the views, through the train and eval pipelines.
    rng = np.random.default_rng(0)
    for c, sizes in enumerate([((10, 50), (15, 18)), ((20, 21), (25, 40)), ((60, 30), (90, 70))]):
        (tmp_path / f"c{c}").mkdir()
        for j, (h, w) in enumerate(sizes):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / f"c{c}" / f"{j}.jpg", quality=90)
    src = imagefolder.ImageFolderSource(str(tmp_path))
    train = pipeline.train_batches(src, **train_kwargs(global_batch_size=4, augment=augment))
    take(train, 6)
    evaluation = pipeline.eval_batches(src, global_batch_size=4, image_size=IMAGE_SIZE, resize_size=RESIZE_SIZE)
    masks = np.concatenate([b["mask"] for b in evaluation])
    assert train.bad_files == 0 and evaluation.bad_files == 0 and masks.sum() == len(src)


def test_unreadable_train_files_are_replaced_logged_and_counted(folder_with_bad_files, caplog):
    root, truth, bad_paths = folder_with_bad_files
    src = imagefolder.ImageFolderSource(root)
    assert len(src) == len(truth) + 3
    bad_indices = {i for i in range(len(src)) if src.name(i) in bad_paths}
    steps = 3 * len(src) // 8 + 1  # three epochs and a bit
    with caplog.at_level(logging.WARNING):
        iterator = pipeline.train_batches(src, **train_kwargs())
        batches = take(iterator, steps)
    for batch in batches:  # every row is a real picture with its own label: never a wrong one
        labels, indices = identity_of(batch["image"])
        np.testing.assert_array_equal(batch["label"], labels)
        np.testing.assert_array_equal(labels, [truth[i] for i in indices])
    assert iterator.bad_files >= 3 * len(bad_paths)  # each bad file met once an epoch
    named = [r.getMessage() for r in caplog.records if "unreadable image, replaced" in r.getMessage()]
    assert len(named) == len(bad_paths), "one line per bad file, not per encounter"
    for path in bad_paths:
        assert sum(path in line for line in named) == 1
    assert any("epoch 1:" in r.getMessage() and "replaced" in r.getMessage() for r in caplog.records)
    # The substitutes are the same on every run and whatever the process count.
    assert_batches_equal(take(pipeline.train_batches(src, **train_kwargs()), steps), batches)
    halves = [take(pipeline.train_batches(src, **train_kwargs(process_index=p, process_count=2)), steps)
              for p in range(2)]
    assert_batches_equal(concat(halves), batches)
    assert bad_indices


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_over_files_visits_every_good_file_once_and_masks_bad_ones(folder_with_bad_files, caplog,
                                                                         process_count):
    root, truth, bad_paths = folder_with_bad_files
    src = imagefolder.ImageFolderSource(root)
    with caplog.at_level(logging.WARNING):
        iterators = [pipeline.eval_batches(src, global_batch_size=8, image_size=IMAGE_SIZE, resize_size=RESIZE_SIZE,
                                           process_index=p, process_count=process_count)
                     for p in range(process_count)]
        batches = concat([list(it) for it in iterators])
    assert len(batches) == -(-len(src) // 8)
    mask = np.concatenate([b["mask"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])[mask]
    labels = np.concatenate([b["label"] for b in batches])[mask]
    assert mask.sum() == len(truth)
    got_labels, got_indices = identity_of(images)
    assert sorted(got_indices) == sorted(truth)  # each good file exactly once
    np.testing.assert_array_equal(labels, got_labels)
    assert sum(it.bad_files for it in iterators) == len(bad_paths)
    messages = [r.getMessage() for r in caplog.records]
    # Only this eval's lines: an earlier test's endless train iterator may still be prefetching (and logging its
    # own substitutions) in grain's background threads.
    eval_lines = [m for m in messages if "left out of eval" in m]
    for path in bad_paths:
        assert sum(path in m for m in eval_lines) == 1
    assert any("left out of the metrics" in m for m in messages)


def test_worker_processes_give_the_same_batches_from_files(folder_with_bad_files):
    # A real spawned grain worker: the source must pickle, and the decode + substitute logic runs there.
    root, _, _ = folder_with_bad_files
    src = imagefolder.ImageFolderSource(root)
    want = take(pipeline.train_batches(src, start_step=1, **train_kwargs()), 4)
    got = take(pipeline.train_batches(src, start_step=1, workers=1, **train_kwargs()), 4)
    assert_batches_equal(got, want)


def test_ten_crop_eval_ships_the_central_resize_square(folder):
    root, _ = folder
    src = imagefolder.ImageFolderSource(root)
    batch = next(pipeline.eval_batches(src, global_batch_size=4, image_size=IMAGE_SIZE, resize_size=RESIZE_SIZE,
                                       eval_crops=10))
    assert batch["image"].shape == (4, RESIZE_SIZE, RESIZE_SIZE, 3)
    # predict's view of a file is the eval pipeline's, to the pixel.
    with open(src.name(0), "rb") as f:
        data = f.read()
    single = next(pipeline.eval_batches(src, global_batch_size=4, image_size=IMAGE_SIZE, resize_size=RESIZE_SIZE))
    np.testing.assert_array_equal(pipeline.eval_view(data, IMAGE_SIZE, RESIZE_SIZE), single["image"][0])
    np.testing.assert_array_equal(pipeline.eval_view(data, IMAGE_SIZE, RESIZE_SIZE, 10), batch["image"][0])
    with pytest.raises(ValueError, match="eval_crops"):
        pipeline.eval_dataset(src, global_batch_size=4, image_size=IMAGE_SIZE, resize_size=RESIZE_SIZE,
                              eval_crops=5)


def test_inception_augment_on_array_sources():
    src = sources.SyntheticSource(16, 40, num_classes=3, seed=1)
    a = take(pipeline.train_batches(src, **train_kwargs(augment="inception")), 2)
    b = take(pipeline.train_batches(src, **train_kwargs(augment="inception")), 2)
    assert_batches_equal(a, b)
    assert a[0]["image"].shape == (8, IMAGE_SIZE, IMAGE_SIZE, 3)
    with pytest.raises(ValueError, match="augment"):
        pipeline.train_dataset(src, **train_kwargs(augment="mixup"))


# --- augmentation bounds -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(500, 375), (375, 500), (256, 256), (100, 60), (2000, 300)])
def test_alexnet_crop_box_stays_inside_and_reaches_the_edges(size):
    w, h = size
    rng = np.random.default_rng(0)
    boxes = np.array([transforms.alexnet_crop_box(w, h, rng, 224, 256) for _ in range(2000)])
    assert (boxes[:, 0] >= -1e-9).all() and (boxes[:, 1] >= -1e-9).all()
    assert (boxes[:, 2] <= w + 1e-9).all() and (boxes[:, 3] <= h + 1e-9).all()
    side = 224 * min(w, h) / 256  # the crop is 224/256 of the short side, aspect kept (to rounding)
    np.testing.assert_allclose(boxes[:, 2] - boxes[:, 0], side, rtol=0.01)
    np.testing.assert_allclose(boxes[:, 3] - boxes[:, 1], side, rtol=0.01)
    assert boxes[:, 0].min() == 0 and boxes[:, 1].min() == 0
    assert np.isclose(boxes[:, 2].max(), w) and np.isclose(boxes[:, 3].max(), h)


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (60, 40), (1000, 100)])
def test_inception_crop_box_area_and_aspect(size):
    w, h = size
    rng = np.random.default_rng(1)
    boxes = np.array([transforms.inception_crop_box(w, h, rng) for _ in range(3000)], np.float64)
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert (bw >= 1).all() and (bh >= 1).all()
    area = bw * bh / (w * h)
    aspect = bw / bh
    rounding = 2 / min(bw.min(), bh.min())  # integer box sides
    assert (area <= 1 + 1e-9).all() and (area >= 0.08 * (1 - rounding) ** 2).all()
    assert (aspect >= 3 / 4 * (1 - rounding)).all() and (aspect <= 4 / 3 * (1 + rounding)).all()
    if w / h < 2:  # most draws fit: areas spread over the range, not stuck at the fallback
        assert area.min() < 0.15 and area.max() > 0.8


def test_crop_box_array_is_the_box_of_the_picture():
    image = np.arange(30 * 40 * 3, dtype=np.uint8).reshape(30, 40, 3)
    np.testing.assert_array_equal(transforms.crop_box_array(image, (5, 2, 25, 22), 20), image[2:22, 5:25])


# --- on the device -----------------------------------------------------------------------------------------------

def test_pca_lighting_adds_one_offset_per_image_with_the_imagenet_covariance():
    n = 4000
    images = jnp.full((n, 2, 3, 3), 100, jnp.uint8)
    out = np.asarray(jax.jit(transforms.pca_lighting)(images, jax.random.key(0)))
    assert out.dtype == np.float32 and out.shape == images.shape
    offsets = out[:, 0, 0, :] - 100.0
    np.testing.assert_allclose(out - 100.0, np.broadcast_to(offsets[:, None, None, :], out.shape), atol=1e-4)
    eigvec = np.asarray(transforms.IMAGENET_PCA_EIGVEC)
    eigval = np.asarray(transforms.IMAGENET_PCA_EIGVAL)
    want = 255.0 ** 2 * eigvec @ np.diag((0.1 * eigval) ** 2) @ eigvec.T
    np.testing.assert_allclose(np.cov(offsets.T), want, atol=0.1 * want.max())
    assert abs(offsets.mean()) < 0.5
    # The main component moves all three channels the same way (brightness), by ~5.5 levels at one sigma.
    assert np.std(offsets.sum(axis=1)) == pytest.approx(255 * 0.1 * 0.2175 * abs(eigvec[:, 0].sum()), rel=0.1)
    # std=0 is the identity; the result composes with normalize, which takes floats as they are.
    off, normalized = jax.jit(lambda x, k: (transforms.pca_lighting(x, k, 0.0),
                                            transforms.normalize(transforms.pca_lighting(x, k))))(
        images[:4], jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(off), np.asarray(images[:4], np.float32))
    assert normalized.shape == (4, 2, 3, 3) and normalized.dtype == jnp.float32


def test_ten_crop_views_are_the_corners_centre_and_mirrors():
    r, s = 6, 4
    rows, cols = np.meshgrid(np.arange(r), np.arange(r), indexing="ij")
    image = np.stack([rows, cols, rows * 10 + cols], -1).astype(np.uint8)
    images = np.stack([image, image + 100])
    views = np.asarray(transforms.ten_crop(jnp.asarray(images), s))
    assert views.shape == (10, 2, s, s, 3)
    for k, (t, l) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)]):
        np.testing.assert_array_equal(views[k], images[:, t:t + s, l:l + s])
        np.testing.assert_array_equal(views[k + 5], images[:, t:t + s, l:l + s][:, :, ::-1])


def test_ten_crop_probabilities_average_the_softmax_of_the_views_of_an_nnx_model():
    from flax import nnx

    class Tiny(nnx.Module):  # an NNX module called inside lax.map, as eval_step will call AlexNet
        def __init__(self, rngs):
            self.dense = nnx.Linear(3, 5, rngs=rngs)

        def __call__(self, x):
            return self.dense(x.mean(axis=(1, 2)))

    graphdef, state = nnx.split(Tiny(nnx.Rngs(0)))
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 9, 9, 3), dtype=np.uint8))

    def logits(state, views):
        return nnx.merge(graphdef, state)(transforms.normalize(views))

    @jax.jit
    def both(state, images):
        views = transforms.ten_crop(images, 7)
        unrolled = jnp.mean(jnp.stack([jax.nn.softmax(logits(state, views[k])) for k in range(10)]), axis=0)
        return transforms.ten_crop_probabilities(lambda v: logits(state, v), images, 7), unrolled

    got, want = map(np.asarray, both(state, images))
    assert got.shape == (2, 5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)


# --- bench pipeline ------------------------------------------------------------------------------------------------

def test_bench_pipeline_pieces(tmp_path):
    from alexnet_jax.bench import common, pipeline as bench

    paths = common.write_jpegs(str(tmp_path), 8, classes=2)
    assert len(paths) == 8 and all(p.endswith(".JPEG") for p in paths)
    assert Image.open(paths[0]).size == (500, 375)
    baseline = bench.pil_baseline(paths, 224, 256)
    ours = bench.pipeline_throughput(imagefolder.ImageFolderSource(str(tmp_path)), workers=0, batch_size=4,
                                     images=8, image_size=224, resize_size=256)
    assert baseline["img_per_s"] > 0 and ours["img_per_s"] > 0 and ours["cpu_ms_per_img"] > 0


# --- class names -------------------------------------------------------------------------------------------------

def test_imagenet_class_names_ship_with_the_package():
    synsets = classes.imagenet_synsets()
    wnids = classes.imagenet_wnids()
    assert len(synsets) == 1000 and len(set(wnids)) == 1000 and wnids == sorted(wnids)
    assert synsets[0] == ("n01440764", "tench, Tinca tinca")
    assert synsets[999] == ("n15075141", "toilet tissue, toilet paper, bathroom tissue")
    assert all(w.startswith("n") and len(w) == 9 and name for w, name in synsets)
    assert classes.display_name("n01440764") == "tench, Tinca tinca"
    assert classes.display_name("n01440764", short=True) == "tench"
    assert classes.display_name("7") == "7"  # not a wnid: as it is
