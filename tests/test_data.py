"""Sources, host transforms, on-device transforms and grain pipelines: real grain, real scikit-learn digits."""

import itertools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax.data import pipeline, sources, transforms
from conftest import REPO, tiny_config

IMAGE_SIZE = 16  # small crops keep every test fast; the pipelines do not care about the size
RESIZE_SIZE = 20


class IndexSource:
    """Element i is a constant image that spells i in its first two channels, so any crop still tells its index."""

    def __init__(self, num_examples: int, image_size: int = RESIZE_SIZE, num_classes: int = 10):
        assert num_examples < 256 * 256
        self._num_examples = num_examples
        self._image_size = image_size
        self._num_classes = num_classes
        self.class_names = [str(c) for c in range(num_classes)]

    def __len__(self):
        return self._num_examples

    def __getitem__(self, index):
        image = np.zeros((self._image_size, self._image_size, 3), np.uint8)
        image[..., 0], image[..., 1] = index % 256, index // 256
        return {"image": image, "label": index % self._num_classes}


def indices_of(images: np.ndarray) -> np.ndarray:
    """The IndexSource indices of a uint8 NHWC batch."""
    corner = images[:, 0, 0, :].astype(np.int64)
    assert (images == images[:, :1, :1, :]).all(), "IndexSource images are constant"
    return corner[:, 0] + 256 * corner[:, 1]


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def train_kwargs(**overrides):
    kwargs = dict(global_batch_size=8, seed=0, image_size=IMAGE_SIZE, resize_size=RESIZE_SIZE)
    kwargs.update(overrides)
    return kwargs


def eval_kwargs(**overrides):
    kwargs = dict(global_batch_size=8, image_size=IMAGE_SIZE, resize_size=RESIZE_SIZE)
    kwargs.update(overrides)
    return kwargs


def assert_batches_equal(got, want):
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys(), step
        for key in w:
            np.testing.assert_array_equal(g[key], w[key], err_msg=f"step {step}, key {key}")


def concat_processes(per_process_batches):
    """[process][step] -> [step]: each global batch rebuilt by concatenating the processes' local batches."""
    steps = [len(b) for b in per_process_batches]
    assert len(set(steps)) == 1, f"processes disagree on the number of batches: {steps}"
    return [{key: np.concatenate([batches[step][key] for batches in per_process_batches])
                     for key in per_process_batches[0][step]}
                    for step in range(steps[0])]


@pytest.fixture(scope="module")
def digits_train():
    return sources.DigitsSource("train", IMAGE_SIZE + 4)


@pytest.fixture(scope="module")
def digits_eval():
    return sources.DigitsSource("eval", IMAGE_SIZE + 4)


# --- sources -----------------------------------------------------------------------------------------------------

def digit_indices(source) -> list[int]:
    """Maps each example of a DigitsSource back to its row in load_digits() (the 1,797 images are all distinct)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    size = source[0]["image"].shape[0]
    row_of = {}
    for row, gray in enumerate(digits.images):
        scaled = np.round(gray * (255.0 / 16.0)).astype(np.uint8)
        row_of[sources.upscale_gray(scaled, size).tobytes()] = row
    rows = []
    for i in range(len(source)):
        example = source[i]
        row = row_of[example["image"].tobytes()]
        assert example["label"] == digits.target[row]
        rows.append(row)
    return rows


def test_digits_split_is_fixed_disjoint_and_complete(digits_train, digits_eval):
    train_rows, eval_rows = digit_indices(digits_train), digit_indices(digits_eval)
    assert len(train_rows) + len(eval_rows) == 1797
    assert len(eval_rows) == round(1797 * sources.HELD_OUT_FRACTION)
    assert len(set(train_rows)) == len(train_rows) and len(set(eval_rows)) == len(eval_rows)
    assert not set(train_rows) & set(eval_rows)
    assert set(train_rows) | set(eval_rows) == set(range(1797))
    # Deterministic: a fresh source (another run, another process) holds the same examples in the same order.
    assert digit_indices(sources.DigitsSource("eval", IMAGE_SIZE + 4)) == eval_rows
    assert digit_indices(sources.DigitsSource("train", IMAGE_SIZE + 4)) == train_rows
    # A different split seed is a different split.
    assert digit_indices(sources.DigitsSource("eval", IMAGE_SIZE + 4, split_seed=1)) != eval_rows


def test_digits_examples_are_uint8_rgb(digits_train):
    for size in (IMAGE_SIZE, 64):
        source = sources.DigitsSource("eval", size)
        example = source[3]
        assert example["image"].dtype == np.uint8 and example["image"].shape == (size, size, 3)
        assert isinstance(example["label"], int) and 0 <= example["label"] < 10
        # Grey: the three channels are copies.
        np.testing.assert_array_equal(example["image"][..., 0], example["image"][..., 2])
    assert digits_train.class_names == [str(d) for d in range(10)]
    labels = {digits_train[i]["label"] for i in range(len(digits_train))}
    assert labels == set(range(10))


def test_synthetic_source_is_a_pure_function_of_seed_and_index():
    a = sources.SyntheticSource(10, 12, num_classes=5, seed=3)
    b = sources.SyntheticSource(10, 12, num_classes=5, seed=3)
    c = sources.SyntheticSource(10, 12, num_classes=5, seed=4)
    for i in (0, 7):
        assert a[i]["image"].dtype == np.uint8 and a[i]["image"].shape == (12, 12, 3)
        np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
        assert a[i]["label"] == b[i]["label"]
        assert not np.array_equal(a[i]["image"], c[i]["image"])
    assert not np.array_equal(a[0]["image"], a[1]["image"])


# --- host transforms ---------------------------------------------------------------------------------------------

def coordinate_image(h: int, w: int) -> np.ndarray:
    """Every pixel distinct: channel 0 is the row, channel 1 the column."""
    assert h <= 256 and w <= 256
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([rows, cols, (rows + cols) % 256], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("shape", [(20, 20), (20, 37), (45, 20), (16, 16), (23, 31)])
def test_random_crop_is_a_sub_array_inside_the_image(shape):
    image = coordinate_image(*shape)
    rng = np.random.default_rng(0)
    size, resize = 16, min(shape)  # resize == short side: no resampling, so the crop must be a literal sub-array
    tops, lefts = set(), set()
    for _ in range(200):
        crop = transforms.random_crop(image, rng, size, resize)
        assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
        top, left = int(crop[0, 0, 0]), int(crop[0, 0, 1])
        assert 0 <= top <= shape[0] - size and 0 <= left <= shape[1] - size
        np.testing.assert_array_equal(crop, image[top:top + size, left:left + size])
        tops.add(top)
        lefts.add(left)
    # Every placement is reachable, including both edges.
    assert tops == set(range(shape[0] - size + 1))
    assert lefts == set(range(shape[1] - size + 1))


def png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("shape", [(40, 40), (30, 90), (120, 50)])
def test_random_crop_of_an_array_is_the_crop_of_its_encoded_picture(shape):
    """Arrays and encoded pictures share one crop path: the same box, resampled once -- pixel for pixel the
    same crop from the pixels as from their (lossless) PNG, with the same random draws."""
    from alexnet_jax.data import decode

    image = coordinate_image(*shape)
    data = png(image)
    rng_array, rng_encoded = np.random.default_rng(1), np.random.default_rng(1)
    for _ in range(20):
        crop = transforms.random_crop(image, rng_array, 16, 24)
        assert crop.shape == (16, 16, 3) and crop.dtype == np.uint8
        from_png = decode.decode_crop(data, lambda w, h: transforms.alexnet_crop_box(w, h, rng_encoded, 16, 24),
                                      (16, 16))
        np.testing.assert_array_equal(crop, from_png)


@pytest.mark.parametrize("shape", [(20, 20), (21, 20), (20, 37), (44, 25)])
def test_center_crop_picks_the_centre(shape):
    image = coordinate_image(*shape)
    size = 16
    crop = transforms.center_crop(image, size, min(shape))
    top, left = (shape[0] - size) // 2, (shape[1] - size) // 2
    np.testing.assert_array_equal(crop, image[top:top + size, left:left + size])
    # Centred: the margins either side differ by at most one pixel.
    assert abs(top - (shape[0] - size - top)) <= 1 and abs(left - (shape[1] - size - left)) <= 1


def test_center_crop_resizes_the_short_side_first():
    from alexnet_jax.data import decode

    image = coordinate_image(40, 80)
    crop = transforms.center_crop(image, 16, 20)  # short side 40 -> 20: the picture at half scale, cut 16 x 16
    assert crop.shape == (16, 16, 3)
    box = transforms.center_crop_box(80, 40, 16, 20)
    assert box == (24.0, 4.0, 56.0, 36.0)  # the central 32 x 32 of the picture = 16 x 16 at half scale
    np.testing.assert_array_equal(crop, decode.decode_crop(png(image), lambda w, h: box, (16, 16)))
    # Half scale: output pixel (i, j) averages picture rows/columns 4 + 2i and 24 + 2j and their next ones.
    np.testing.assert_allclose(crop[:, 0, 0].astype(float), 4.5 + 2 * np.arange(16), atol=1)
    np.testing.assert_allclose(crop[0, :, 1].astype(float), 24.5 + 2 * np.arange(16), atol=1)


@pytest.mark.parametrize("shape", [(24, 24), (24, 30), (30, 24)])
def test_crops_of_a_central_region_keep_the_whole_pictures_scale(shape):
    """A raw record holding only the central `shape` of a picture whose short side was 48: with resize_size=24
    the crops are at half scale (32 stored px -> 16 output px), centred where the picture's centre is."""
    image = coordinate_image(*shape)
    box = transforms.center_crop_box(shape[1], shape[0], 8, 24, short_side=48)
    h, w = round(shape[0] / 2), round(shape[1] / 2)
    assert box == (((w - 8) // 2) * 2, ((h - 8) // 2) * 2, ((w - 8) // 2) * 2 + 16, ((h - 8) // 2) * 2 + 16)
    assert transforms.center_crop(image, 8, 24, short_side=48).shape == (8, 8, 3)
    rng = np.random.default_rng(0)
    lefts = set()
    for _ in range(100):
        left, top, right, bottom = transforms.alexnet_crop_box(shape[1], shape[0], rng, 8, 24, short_side=48)
        assert (right - left, bottom - top) == (16, 16)  # 8 output px at half scale
        assert 0 <= left and right <= shape[1] and 0 <= top and bottom <= shape[0]
        lefts.add(left)
    assert lefts == {2 * k for k in range(w - 8 + 1)}  # every placement of the half-scale picture's grid


# --- on-device transforms ----------------------------------------------------------------------------------------

def test_normalize_matches_the_channel_statistics():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    got = jax.jit(transforms.normalize)(jnp.asarray(images))
    assert got.dtype == jnp.float32 and got.shape == images.shape
    want = (images.astype(np.float32) - np.asarray(transforms.MEAN_RGB)) / np.asarray(transforms.STDDEV_RGB)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # The mean colour maps to zero; one standard deviation above it to one.
    mean = np.asarray(transforms.MEAN_RGB, np.float32)
    std = np.asarray(transforms.STDDEV_RGB, np.float32)
    probe = jnp.asarray(np.stack([mean, mean + std])[None, None])  # float input is fine too
    np.testing.assert_allclose(np.asarray(transforms.normalize(probe))[0, 0], [[0, 0, 0], [1, 1, 1]], atol=1e-5)
    half = transforms.normalize(jnp.asarray(images), dtype=jnp.bfloat16)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), want, rtol=1e-2, atol=2e-2)


def test_random_flip_mirrors_about_half_the_images():
    n = 2000
    images = np.random.default_rng(0).integers(0, 256, (n, 5, 7, 3), dtype=np.uint8)
    flipped = np.asarray(jax.jit(transforms.random_flip)(jnp.asarray(images), jax.random.key(1)))
    assert flipped.dtype == np.uint8 and flipped.shape == images.shape
    same = (flipped == images).reshape(n, -1).all(axis=1)
    mirrored = (flipped == images[:, :, ::-1, :]).reshape(n, -1).all(axis=1)
    assert (same ^ mirrored).all(), "every image is either untouched or exactly mirrored"
    assert abs(mirrored.mean() - 0.5) < 0.05  # 4.5 sigma at n=2000
    # Same key, same flips; another key, other flips.
    again = np.asarray(transforms.random_flip(jnp.asarray(images), jax.random.key(1)))
    np.testing.assert_array_equal(again, flipped)
    other = np.asarray(transforms.random_flip(jnp.asarray(images), jax.random.key(2)))
    assert not np.array_equal(other, flipped)


# --- train pipeline ----------------------------------------------------------------------------------------------

def test_same_seed_same_batches_other_seed_other_order():
    source = IndexSource(64)
    a = take(pipeline.train_batches(source, **train_kwargs(seed=5)), 6)
    b = take(pipeline.train_batches(source, **train_kwargs(seed=5)), 6)
    c = take(pipeline.train_batches(source, **train_kwargs(seed=6)), 6)
    assert_batches_equal(a, b)
    for batch in a:
        assert batch["image"].dtype == np.uint8 and batch["image"].shape == (8, IMAGE_SIZE, IMAGE_SIZE, 3)
        assert batch["label"].dtype == np.int32 and batch["label"].shape == (8,)
        np.testing.assert_array_equal(batch["label"], indices_of(batch["image"]) % 10)
    order_a = np.concatenate([indices_of(x["image"]) for x in a])
    order_c = np.concatenate([indices_of(x["image"]) for x in c])
    assert not np.array_equal(order_a, order_c)
    assert not np.array_equal(order_a[:8], np.sort(order_a[:8])), "shuffled, not in source order"


def test_synthetic_crops_depend_on_seed():
    source = sources.SyntheticSource(32, RESIZE_SIZE, num_classes=4)
    a = next(pipeline.train_batches(source, **train_kwargs(seed=1)))
    b = next(pipeline.train_batches(source, **train_kwargs(seed=1)))
    c = next(pipeline.train_batches(source, **train_kwargs(seed=2)))
    assert_batches_equal([a], [b])
    assert not np.array_equal(a["image"], c["image"])


def test_epochs_reshuffle_the_same_set():
    n = 48
    source = IndexSource(n)
    batches = take(pipeline.train_batches(source, **train_kwargs()), 3 * n // 8)  # three epochs, 6 batches each
    order = np.concatenate([indices_of(b["image"]) for b in batches])
    epochs = order.reshape(3, n)
    for epoch in epochs:
        assert sorted(epoch) == list(range(n)), "each epoch visits every example exactly once"
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])


def test_epochs_reshuffle_when_batches_straddle_the_boundary():
    # 20 examples, batch 8: the third batch holds the last 4 of epoch 1 and the first 4 of epoch 2.
    n = 20
    order = np.concatenate([indices_of(b["image"])
                                                    for b in take(pipeline.train_batches(IndexSource(n), **train_kwargs()), 5)])
    assert sorted(order[:n]) == list(range(n)) and sorted(order[n:2 * n]) == list(range(n))
    assert not np.array_equal(order[:n], order[n:2 * n])


@pytest.mark.parametrize("make_source", [
        lambda: sources.SyntheticSource(40, RESIZE_SIZE, num_classes=7, seed=2),
        lambda: sources.DigitsSource("train", RESIZE_SIZE),
], ids=["synthetic", "digits"])
def test_processes_together_produce_the_single_process_global_batches(make_source):
    source = make_source()
    steps = 7  # crosses an epoch boundary for the synthetic source (40 examples, 8 per batch)
    single = take(pipeline.train_batches(source, **train_kwargs(seed=3)), steps)
    for process_count in (2, 4):
        per_process = [take(pipeline.train_batches(source, **train_kwargs(seed=3, process_index=p,
                                                                                                                                             process_count=process_count)), steps)
                                     for p in range(process_count)]
        for batches in per_process:
            assert all(b["image"].shape[0] == 8 // process_count for b in batches)
        assert_batches_equal(concat_processes(per_process), single)


class CountingSynthetic(sources.SyntheticSource):
    """The synthetic source, counting its batched reads."""

    reads = 0

    def read_pixels(self, indices):
        type(self).reads += 1
        return super().read_pixels(indices)


@pytest.mark.parametrize("stored, resize", [(RESIZE_SIZE, RESIZE_SIZE), (IMAGE_SIZE, RESIZE_SIZE), (24, RESIZE_SIZE)],
                         ids=["slice", "upscaled", "downscaled"])
def test_batched_reads_give_the_per_example_pixels(stored, resize):
    """A pixel source is read one local batch per grain element, and the batches are pixel for pixel those of
    the per-example path with the same seed: crops cut by a slice where the stored size is the resize size,
    resampled where it is not; across an epoch boundary and for every process's share."""
    CountingSynthetic.reads = 0
    source = CountingSynthetic(20, stored, num_classes=5, seed=4)
    for process_count in (1, 2):
        for p in range(process_count):
            kwargs = train_kwargs(seed=9, resize_size=resize, process_index=p, process_count=process_count)
            batched = take(pipeline.train_batches(source, **kwargs), 6)  # 48 of 20 examples: three epochs
            per_example = [pipeline.train_dataset(source, batch_reads=False, **kwargs)[b] for b in range(6)]
            assert_batches_equal(batched, per_example)
    assert CountingSynthetic.reads >= 3 * 6  # one read per local batch (grain may read ahead)


def test_batched_reads_of_digits_and_seeds_far_apart_match_the_per_example_path(digits_train):
    for seed in (0, 2 ** 31 + 5):
        kwargs = train_kwargs(seed=seed, resize_size=IMAGE_SIZE + 4)
        batched = pipeline.train_dataset(digits_train, **kwargs)
        per_example = pipeline.train_dataset(digits_train, batch_reads=False, **kwargs)
        for b in (0, 3, 10_000):
            assert_batches_equal([batched[b]], [per_example[b]])


def test_global_batch_must_split_evenly_across_processes():
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.train_dataset(IndexSource(16), **train_kwargs(process_count=3))


@pytest.mark.parametrize("process_count", [1, 2])
def test_resuming_at_step_s_yields_batch_s(process_count):
    source = sources.SyntheticSource(24, RESIZE_SIZE, num_classes=3)
    for p in range(process_count):
        kwargs = train_kwargs(process_index=p, process_count=process_count)
        fresh = take(pipeline.train_batches(source, **kwargs), 9)
        for start in (1, 3, 4, 8):  # 3 batches per epoch: includes resuming exactly at, and just after, a boundary
            resumed = take(pipeline.train_batches(source, start_step=start, **kwargs), 9 - start)
            assert_batches_equal(resumed, fresh[start:])


def test_steps_per_epoch():
    assert pipeline.steps_per_epoch(1438, 256) == 5
    assert pipeline.steps_per_epoch(1024, 256) == 4
    assert pipeline.steps_per_epoch(10, 256) == 1


# --- eval pipeline -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_examples", [37, 8, 5, 17])
@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_eval_visits_every_example_exactly_once(num_examples, process_count):
    source = sources.SyntheticSource(num_examples, RESIZE_SIZE, num_classes=11, seed=9)
    per_process = [list(pipeline.eval_batches(source, **eval_kwargs(process_index=p, process_count=process_count)))
                                 for p in range(process_count)]
    global_batches = concat_processes(per_process)  # also checks every process runs the same number of steps
    assert len(global_batches) == -(-num_examples // 8)
    for batch in global_batches:
        assert batch["image"].shape == (8, IMAGE_SIZE, IMAGE_SIZE, 3) and batch["image"].dtype == np.uint8
        assert batch["mask"].dtype == np.bool_
    mask = np.concatenate([b["mask"] for b in global_batches])
    assert mask.sum() == num_examples
    assert mask[:num_examples].all() and not mask[num_examples:].any(), "padding only at the end"
    labels = np.concatenate([b["label"] for b in global_batches])[mask]
    images = np.concatenate([b["image"] for b in global_batches])[mask]
    np.testing.assert_array_equal(labels, [source[i]["label"] for i in range(num_examples)])
    for i in range(num_examples):
        np.testing.assert_array_equal(images[i], transforms.center_crop(source[i]["image"], IMAGE_SIZE, RESIZE_SIZE))


def test_eval_on_digits_across_processes(digits_eval):
    n = len(digits_eval)
    per_process = [list(pipeline.eval_batches(digits_eval, **eval_kwargs(global_batch_size=64, process_index=p,
                                                                                                                                             process_count=4)))
                                 for p in range(4)]
    batches = concat_processes(per_process)
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == n and len(mask) == 64 * -(-n // 64)
    labels = np.concatenate([b["label"] for b in batches])[mask]
    np.testing.assert_array_equal(labels, [digits_eval[i]["label"] for i in range(n)])


# --- grain worker processes --------------------------------------------------------------------------------------

def test_worker_processes_yield_the_same_batches():
    # workers=1 goes through grain's mp_prefetch: a real child process that must unpickle the source and pipeline.
    # It also runs outside absl.app.run (pytest has not parsed absl flags), which pipeline._to_iterator handles.
    source = sources.SyntheticSource(40, RESIZE_SIZE, num_classes=5, seed=1)
    kwargs = train_kwargs(process_index=1, process_count=2)
    want = take(pipeline.train_batches(source, start_step=2, **kwargs), 6)
    got = take(pipeline.train_batches(source, start_step=2, workers=1, **kwargs), 6)
    assert_batches_equal(got, want)
    want_eval = list(pipeline.eval_batches(source, **eval_kwargs()))
    got_eval = list(pipeline.eval_batches(source, workers=1, **eval_kwargs()))
    assert_batches_equal(got_eval, want_eval)


def test_decode_threads_and_buffers_in_the_workers_keep_the_batches():
    """data.worker_threads / data.worker_buffer change how the workers read, never what: same batches in the
    same order, train and eval."""
    source = sources.SyntheticSource(40, RESIZE_SIZE, num_classes=5, seed=1)
    kwargs = train_kwargs(process_index=1, process_count=2)
    want = take(pipeline.train_batches(source, start_step=2, **kwargs), 6)
    got = take(pipeline.train_batches(source, start_step=2, workers=1, worker_threads=3, worker_buffer=3, **kwargs), 6)
    assert_batches_equal(got, want)
    want_eval = list(pipeline.eval_batches(source, **eval_kwargs()))
    got_eval = list(pipeline.eval_batches(source, workers=1, worker_threads=2, worker_buffer=2, **eval_kwargs()))
    assert_batches_equal(got_eval, want_eval)


def test_auto_workers_start_none_for_a_small_job_however_many_cores():
    """A 20-image eval and a 4-step run at batch 256 waited a minute for 8 workers on 2 cores."""
    for cores in (2, 16, 128):
        assert pipeline.auto_workers(cores=cores, images=20, batch_size=256)[0] == 0
        count, why = pipeline.auto_workers(cores=cores, images=4 * 256, batch_size=256)
        assert count == 0 and "1024 images" in why, why


def test_auto_workers_for_a_large_job_are_bounded_by_the_cores_and_the_batches():
    imagenet = 1_281_167
    counts = {cores: pipeline.auto_workers(cores=cores, images=imagenet, batch_size=256)[0]
              for cores in (1, 2, 3, 4, 8, 16, 64, 256)}
    # Two cores stay with the trainer and XLA; a single worker would be slower than the trainer's own 2 threads.
    assert counts == {1: 0, 2: 0, 3: 0, 4: 2, 8: 6, 16: 14, 64: 32, 256: 32}, counts
    count, why = pipeline.auto_workers(cores=16, images=imagenet, batch_size=256, step_on_host=True)
    assert count == 8 and "16 usable cores, 8 kept" in why, why  # the CPU backend's step needs the cores too
    assert pipeline.auto_workers(cores=64, images=3 * 1024, batch_size=1024)[0] == 3  # one per batch


def test_feed_options_resolve_auto_workers_in_one_info_line_once(caplog):
    config = tiny_config(**{"data.workers": -1, "data.worker_threads": 2})
    purpose = "a 20-image test split"  # auto lines are said once per process: a purpose no other test uses
    with caplog.at_level("INFO", logger="absl"):
        first = pipeline.feed_options(config.data, purpose=purpose, images=20, global_batch_size=16)
        again = pipeline.feed_options(config.data, purpose=purpose, images=20, global_batch_size=16)
    assert first == again == {"workers": 0, "worker_threads": 2, "worker_buffer": 1}
    lines = [r.getMessage() for r in caplog.records if purpose in r.getMessage()]
    assert lines == [f"data.workers=-1 (auto): 0 worker process(es) for {purpose}: 20 images to decode, under "
                     "2048: decoding them here is quicker than starting worker processes"], lines
    config.data.workers = 3  # a count given is used as it is
    assert pipeline.feed_options(config.data, purpose=purpose, images=20, global_batch_size=16)["workers"] == 3


def test_usable_cores_follow_the_cpu_affinity():
    """A process pinned to one core (taskset, a scheduler's cpuset) counts one, whatever the host has."""
    one = next(iter(os.sched_getaffinity(0)))
    pinned = subprocess.run([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{one}}}); "
                             "from alexnet_jax.data import pipeline; print(pipeline.usable_cores())"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert pinned.returncode == 0 and pinned.stdout.split()[-1] == "1", pinned.stderr[-2000:]
    assert 1 <= pipeline.usable_cores() <= len(os.sched_getaffinity(0))
