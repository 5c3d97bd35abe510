"""Load a checkpoint and classify images from Python (the predict command is built on this):

    import alexnet_jax.inference
    model = alexnet_jax.inference.load("runs/digits")      # a workdir or gs:// URL; step=N for another checkpoint
    model.predict(["digit.jpg"], top_k=3)
    # [[{"label": 7, "class": "7", "name": "7", "probability": ...}, ...]]   one list per image

An image is a file (a path, local or gs://), encoded bytes, a PIL image or a uint8 array (H, W, 3 RGB or H, W
grey); a uint8 (N, H, W, 3) array is N images. Each goes through evaluation's own view (upright RGB, short side to
data.resize_size, the central data.image_size square, bilinear) and the same jitted function evaluation computes
with, so predict's probabilities are evaluate's. Only params and BatchNorm statistics are read, replicated onto
this machine's devices, whatever topology trained them.
"""

import dataclasses
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from PIL import Image, ImageOps

from alexnet_jax import checkpointing, metrics, models, train
from alexnet_jax.data import classes, decode, pipeline


class UnreadableImage(ValueError):
    """An image that cannot be read or decoded: "cannot read image <what>: <reason>"."""

    def __init__(self, what: str, reason: str):
        super().__init__(f"cannot read image {what}: {reason}")
        self.reason = reason


def class_name(class_names: Sequence[str], label: int) -> str | None:
    """The stored name of output `label`, or None when the checkpoint names fewer classes than the model has
    outputs (e.g. a 1000-way head trained on a 3-class folder)."""
    return class_names[label] if 0 <= label < len(class_names) else None


def output_names(class_names: Sequence[str], num_outputs: int) -> list[str]:
    """A name for every model output: the stored one, else "class <label>"."""
    return [class_name(class_names, i) or f"class {i}" for i in range(num_outputs)]


def probabilities_fn(config: ml_collections.ConfigDict, eval_crops: int = 1):
    """jitted (model_vars, uint8 NHWC views) -> class probabilities, through evaluation's own log-probabilities."""
    _, eval_def = models.model_graphdefs(config.model)
    options = dict(train.eval_view_options(config), eval_crops=eval_crops)
    return jax.jit(lambda model_vars, images: jnp.exp(
        train.eval_log_probs(model_vars, images, graphdef=eval_def, **options)))


def load_image(path, image_size: int, resize_size: int, eval_crops: int = 1) -> np.ndarray:
    """A file (local path or gs:// URL) -> exactly the host view evaluation uses. Raises UnreadableImage."""
    try:
        data = epath.Path(path).read_bytes()
        return pipeline.eval_view(data, image_size, resize_size, eval_crops)
    except (OSError, ValueError, Image.DecompressionBombError) as error:  # missing, unreadable, not an image
        raise UnreadableImage(str(path), getattr(error, "strerror", None) or str(error)) from None


@dataclasses.dataclass(eq=False)
class Classifier:
    """A checkpoint ready to classify: `model` is the NNX module in eval mode (call it on normalised NHWC floats,
    see data.transforms.normalize); `predict` and `probabilities` take images as they come."""

    model: nnx.Module
    model_vars: dict  # {"params", "batch_stats"}: what `model` holds, as the pure tree the jitted function takes
    class_names: list[str]
    config: ml_collections.ConfigDict  # the checkpoint's own: it describes the model that was trained
    step: int
    batch_size: int = 64  # images per forward pass in `probabilities`

    def __post_init__(self):
        self._eval_crops = int(self.config.data.get("eval_crops", 1))
        self._probabilities = probabilities_fn(self.config, self._eval_crops)

    @property
    def num_outputs(self) -> int:
        return int(self.config.model.num_classes)

    def preprocess(self, image) -> np.ndarray:
        """One image -> the uint8 view evaluation would ship for it. Raises UnreadableImage."""
        size, resize = int(self.config.data.image_size), int(self.config.data.resize_size)
        if isinstance(image, (str, os.PathLike)):
            return load_image(image, size, resize, self._eval_crops)
        if isinstance(image, bytes):
            try:
                return pipeline.eval_view(image, size, resize, self._eval_crops)
            except ValueError as error:
                raise UnreadableImage("bytes", str(error)) from None
        if isinstance(image, Image.Image):
            # A file's EXIF orientation is applied when it is read; a PIL image opened from one still carries it.
            picture = decode.to_rgb(ImageOps.exif_transpose(image))
        elif isinstance(image, (np.ndarray, jax.Array)):
            array = np.asarray(image)
            if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)):
                raise UnreadableImage("array", f"must be uint8 (H, W, 3) RGB or (H, W) grey, got {array.dtype} "
                                      f"{array.shape}")
            picture = Image.fromarray(array).convert("RGB")
        else:
            raise UnreadableImage(type(image).__name__, "give a path, bytes, a PIL image or a uint8 array")
        return pipeline.eval_view_of_picture(picture, size, resize, self._eval_crops)

    def probabilities(self, images) -> np.ndarray:
        """(N, num_outputs) float32 softmax probabilities, one row per image (see `predict` for what an image
        is)."""
        views = [self.preprocess(image) for image in _as_list(images)]
        return self.probabilities_of_views(np.stack(views) if views else np.zeros((0, 1, 1, 3), np.uint8))

    def probabilities_of_views(self, views: np.ndarray) -> np.ndarray:
        """The same for views `preprocess` already made (uint8 NHWC), `batch_size` images per forward pass."""
        return np.concatenate([np.zeros((0, self.num_outputs), np.float32)] + [
            np.asarray(self._probabilities(self.model_vars, views[i:i + self.batch_size]))
            for i in range(0, len(views), self.batch_size)])

    def predict(self, images, top_k: int = 5) -> list[list[dict]]:
        """For each image, its top_k classes, most probable first, as {"label": output index, "class": the
        stored class name (None for an output the checkpoint has no name for), "name": what a person reads
        ("tench, Tinca tinca" for ImageNet's n01440764; "class 7" for an unnamed output), "probability"}."""
        return [self.top(p, top_k) for p in self.probabilities(images)]

    def top(self, probabilities: np.ndarray, top_k: int = 5) -> list[dict]:
        """The top_k entries of one row of `probabilities`, as `predict` gives them."""
        order = np.argsort(-probabilities, kind="stable")[:max(0, top_k)]
        return [{"label": int(i), "class": class_name(self.class_names, int(i)), "name": self.name(int(i)),
                 "probability": float(probabilities[i])} for i in order]

    def name(self, label: int, short: bool = False) -> str:
        """What a person reads for output `label` (short=True: ImageNet's first synonym only)."""
        stored = class_name(self.class_names, label)
        return f"class {label}" if stored is None else classes.display_name(stored, short=short)


def _as_list(images) -> list:
    if isinstance(images, (np.ndarray, jax.Array)) and np.ndim(images) == 4:
        return list(np.asarray(images))  # a batch of pictures
    if isinstance(images, (str, os.PathLike, bytes, Image.Image, np.ndarray, jax.Array)):
        return [images]
    return list(images)


def load(workdir, step: int | None = None, *, batch_size: int = 64, weights: str | None = None) -> Classifier:
    """The checkpoint at `step` (default: the newest) of a training directory (local or gs://), ready to
    classify; `weights` "raw" or "ema" (default: the ones the run's best_metric ranks checkpoints by). Raises
    checkpointing.CheckpointNotFound when there is none, checkpointing.CheckpointUnreadable when it cannot be read
    or (the newest by default, else `step`) is damaged; a damaged newest one is skipped for the newest that
    loads, with a warning."""
    with metrics.orbax_chatter_dropped():  # reading is all this asks for: no warning that it opens read-only
        config, class_names, model_vars, step = checkpointing.load_for_inference(os.fspath(workdir), step,
                                                                                 weights=weights)
    _, eval_def = models.model_graphdefs(config.model)
    model = nnx.merge(eval_def, model_vars["params"], model_vars["batch_stats"])
    return Classifier(model=model, model_vars=model_vars, class_names=list(class_names), config=config,
                      step=int(step), batch_size=batch_size)
