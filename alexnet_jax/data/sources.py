"""Random-access data sources: `len(src)`, `src[i] -> {"image": uint8 HWC RGB, "label": int}`, `src.class_names`.

Every source is indexable so grain can shuffle globally and each process can read only its own slice of a global
batch. New formats drop in by implementing the same three members and registering in `create_source`.

Sources of encoded images (data/imagefolder.py: ImageFolder and the flat ILSVRC val folder; data/arrayrecord.py:
our converter's shards) also have `read_record(i)` (the undecoded element: {"encoded": bytes, "label", "index"})
and `name(i)` (the file, for messages); the pipeline reads through `read_record` and decodes in its grain
workers, at the size the crop needs.

Sources that hold pixels (digits, synthetic, raw ArrayRecord, pixel shards: `holds_pixels` true) also have
`read_pixels(indices)`: a whole batch's stored pixels in one call ({"images": uint8 HWC arrays, "labels": int32,
"short_sides": each record's picture short side or None}); the train pipeline reads a local batch at a time
through it and cuts the crops straight into the batch array. Their `uniform_pixels` is (height, width, the
short side whose scale the pixels are at) when every stored array has that one shape, as the source knows it
without reading the data, else None (the device cuts the crops of such sources: data.device_crops). Pixel
shards (data/pixelshards.py), one shape by layout, also have `read_pixels_into(indices, out) -> int32 labels`,
which reads each example's pixels straight into its row of the batch array.
"""

import importlib.util
import os

import numpy as np
from PIL import Image

from alexnet_jax import storage

HELD_OUT_FRACTION = 0.2


class DigitsSource:
    """scikit-learn's 1,797 handwritten 8x8 digits (shipped with the package, no download), upscaled to RGB.

    The train/held-out split is a fixed permutation drawn from `split_seed`, so every run and every process sees
    the same held-out examples. Pixels are 0..16 ink intensity; we scale to 0..255 (bright ink on black).
    """

    def __init__(self, split: str, image_size: int, split_seed: int = 0):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        images, targets = _load_digits()
        order = np.random.default_rng(split_seed).permutation(len(targets))
        num_held_out = int(round(len(order) * HELD_OUT_FRACTION))
        keep = order[:num_held_out] if split == "eval" else order[num_held_out:]
        self._images = np.round(images[keep] * (255.0 / 16.0)).astype(np.uint8)
        self._labels = targets[keep].astype(np.int32)
        self._image_size = image_size
        self._upscaled = None  # every image at image_size, made on the first batched read (in each worker)
        self.class_names = [str(d) for d in range(10)]

    holds_pixels = True

    @property
    def uniform_pixels(self) -> tuple[int, int, int]:
        return self._image_size, self._image_size, self._image_size

    def __len__(self):
        return len(self._labels)

    def __getitem__(self, index):
        return {"image": upscale_gray(self._images[index], self._image_size), "label": int(self._labels[index])}

    def __getstate__(self):
        return {**self.__dict__, "_upscaled": None}  # workers rebuild it: cheaper than pickling it to each

    def read_pixels(self, indices) -> dict:
        if self._upscaled is None:
            self._upscaled = np.stack([upscale_gray(g, self._image_size) for g in self._images])
        indices = np.asarray(indices, np.int64)
        return {"images": list(self._upscaled[indices]), "labels": self._labels[indices],
                "short_sides": [None] * len(indices)}


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) of 0..16 floats, labels) of scikit-learn's digits. Read straight from the CSV file
    that scikit-learn ships (what its load_digits reads): importing sklearn.datasets costs ~1.2 s at every start
    of the digits demo and of each test run on it; load_digits is the fallback should the file move."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:  # optional dependency: only this source needs it
        raise ValueError('data.source="digits" needs scikit-learn: pip install -e ".[digits]"')
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    if os.path.exists(path):
        table = np.loadtxt(path, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


def upscale_gray(gray: np.ndarray, image_size: int) -> np.ndarray:
    """A small grayscale array -> (image_size, image_size, 3) uint8, bilinear, so strokes stay smooth."""
    big = Image.fromarray(gray).resize((image_size, image_size), Image.BILINEAR)
    return np.repeat(np.asarray(big)[:, :, None], 3, axis=2)


class SyntheticSource:
    """Random uint8 images with random labels, for benchmarks and smoke tests: no files, no decode cost.

    Element i is a pure function of (seed, i), so any process can produce any slice of it.
    """

    def __init__(self, num_examples: int, image_size: int, num_classes: int, seed: int = 0):
        self._num_examples = num_examples
        self._image_size = image_size
        self._num_classes = num_classes
        self._seed = seed
        self.class_names = [f"class_{i}" for i in range(num_classes)]

    def __len__(self):
        return self._num_examples

    holds_pixels = True

    @property
    def uniform_pixels(self) -> tuple[int, int, int]:
        return self._image_size, self._image_size, self._image_size

    def __getitem__(self, index):
        rng = np.random.default_rng((self._seed, index))
        image = rng.integers(0, 256, (self._image_size, self._image_size, 3), dtype=np.uint8)
        return {"image": image, "label": int(rng.integers(self._num_classes))}

    def read_pixels(self, indices) -> dict:
        examples = [self[int(i)] for i in indices]  # random pixels cost their generation, whatever the batching
        return {"images": [e["image"] for e in examples], "labels": np.array([e["label"] for e in examples], np.int32),
                "short_sides": [None] * len(examples)}


def create_source(data_config, split: str, num_classes: int | None, seed: int, class_names=None):
    """The `split` ("train" or "eval") of the source named by `data.source`. An eval split is labelled by
    `class_names` when given (a checkpoint's: evaluation then needs no train data), else like the train split.

    Raises ValueError naming the key or file when the data cannot be used (missing path, labels that disagree
    with the train split, more classes than the model has). num_classes=None accepts the data's own class list
    (only for sources that have one: imagefolder, arrayrecord)."""
    source = _create_source(data_config, split, num_classes, seed, class_names)
    if num_classes is not None and len(source.class_names) > num_classes:
        raise ValueError(f"data.{'train' if split == 'train' else 'eval'}_path has {len(source.class_names)} classes"
                         f" but model.num_classes is {num_classes}")
    return source


def _create_source(data_config, split: str, num_classes: int, seed: int, class_names=None):
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    name = data_config.source
    if name == "digits":
        return DigitsSource(split, data_config.image_size, split_seed=0)
    if name == "synthetic":
        size = data_config.synthetic_examples
        return SyntheticSource(size if split == "train" else max(1, size // 4), data_config.image_size, num_classes,
                                                     seed=seed + (0 if split == "train" else 1))
    if name == "imagefolder":
        return _imagefolder_source(data_config, split, class_names)
    if name == "arrayrecord":
        return _arrayrecord_source(data_config, split, class_names)
    raise ValueError(f"data.source={name!r} is not a known source")


def _split_path(data_config, split: str) -> str:
    key = "train_path" if split == "train" else "eval_path"
    path = data_config[key]
    problem = storage.problem(path) if path else f"no such file or directory: {path!r}"
    if problem is not None:
        raise ValueError(f"data.{key}: {problem}")
    return path


def _imagefolder_source(data_config, split: str, class_names=None):
    from alexnet_jax.data import imagefolder

    path = _split_path(data_config, split)
    try:
        if split == "train":
            return imagefolder.ImageFolderSource(path)
        # Eval labels must be the train split's: its folder list (cheap) when there is one, else ImageNet's 1000.
        if class_names is None:
            class_names = imagefolder.training_class_names(data_config.train_path)
        return imagefolder.create(path, class_names=class_names,
                                  ground_truth=data_config.get("val_labels", ""),
                                  labels_file=data_config.get("labels_file", ""))
    except ValueError:
        # The converter's output read as a folder of images has no class folders: say what it is instead.
        key = "train_path" if split == "train" else "eval_path"
        if storage.problem(storage.join(path, "manifest.json"), "file") is None:
            raise ValueError(f"data.{key}: {path} holds records written by alexnet_jax.data.convert "
                             "(manifest.json), not image folders: set data.source=arrayrecord") from None
        raise


def open_converted(path: str):
    """A directory written by data.convert, opened as its manifest's encoding is read: pixel shards
    (--format=pixels) or ArrayRecord shards (jpeg, raw)."""
    from alexnet_jax.data import arrayrecord, pixelshards

    if arrayrecord.read_manifest(path).get("encoding") == pixelshards.ENCODING:
        return pixelshards.PixelShardSource(path)
    return arrayrecord.ArrayRecordSource(path)


def _arrayrecord_source(data_config, split: str, class_names=None):
    from alexnet_jax.data import arrayrecord

    source = open_converted(_split_path(data_config, split))
    _check_central_region(source.manifest, data_config, split)
    if split == "eval" and class_names is not None:
        if list(class_names) != source.class_names:
            raise ValueError(f"data.eval_path {data_config.eval_path}: its class list differs from the one the "
                             "checkpoint was trained with")
    elif split == "eval" and data_config.train_path and storage.problem(data_config.train_path) is None:
        train_classes = arrayrecord.read_manifest(data_config.train_path)["class_names"]
        if train_classes != source.class_names:
            raise ValueError(f"data.eval_path {data_config.eval_path}: its class list differs from data.train_path's"
                             " (convert both splits with the same classes)")
    return source


def _check_central_region(manifest: dict, data_config, split: str) -> None:
    """Raw records holding only a picture's central region (`data.convert --center_crop`) must still hold the
    crops this config cuts: the region, at data.resize_size's scale, is at least the crop."""
    region, stored_short_side = manifest.get("center_crop"), manifest.get("resize")
    if not region or not stored_short_side:
        return
    crop = data_config.image_size
    if split == "eval" and data_config.get("eval_crops", 1) == 10:
        crop = data_config.resize_size
    scaled = region * data_config.resize_size / stored_short_side
    if scaled < crop:
        raise ValueError(
            f"data.{split}_path holds the central {region} px of pictures resized to short side {stored_short_side}:"
            f" {scaled:g} px at data.resize_size={data_config.resize_size}, less than the {crop} px crop; raise "
            f"data.resize_size to at least {-(-crop * stored_short_side // region)} or convert with a larger "
            "--center_crop")
