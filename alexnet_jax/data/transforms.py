"""Per-example host transforms (uint8 in, uint8 out) and the on-device ones that run inside the jitted step.

The host only decodes, resizes and crops; it ships uint8 NHWC so transfers are 4x smaller than float32.
Normalisation, flips, PCA lighting noise and the ten eval crops run on the accelerator where they are nearly free.

Host crops are described as boxes in the full-resolution picture (`*_box` functions), whatever holds the pixels:
the encoded-image path (data/decode.py) decodes only at the resolution a box needs and resamples the box straight
to the output size; the array functions (`random_crop`, `center_crop`, `random_resized_crop`), for sources that
already hold pixels (digits, synthetic, raw ArrayRecord), resample the same boxes of the array. One placement
rule, one resampling: an array and its PNG give the same crop pixel for pixel. A box that is already the output
size on the pixel grid (the array's short side is resize_size) is cut, not resampled.

Raw records may hold only the central region of their picture (`data.convert --center_crop`); `short_side` then
says how long the picture's short side was, so the crops keep the scale of the whole picture's resize.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

# ImageNet channel statistics in 0..255 units (the values torchvision and the Flax example use).
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def eval_preprocessing(image_size: int, resize_size: int, *, normalization_inside: bool) -> dict:
    """How a consumer of an exported model prepares an image, as numbers: the one description every export
    format carries (StableHLO's and torchvision's FILE.json, ONNX's metadata), so they cannot drift apart.

    The eval view (predict's and evaluate's): upright RGB, short side to resize_size (bilinear), the central
    image_size square; then (pixel - mean) / std per channel in 0..255 units, inside the exported function for
    StableHLO and ONNX (which take raw uint8 pixels), by the consumer for a bare state dict."""
    note = ("applied inside: pass raw uint8 pixels" if normalization_inside else
            "applied by the caller (torchvision's Normalize(mean / 255, std / 255) on 0..1 tensors)")
    return {"preprocessing": {"resize_short_side": int(resize_size), "resample": "bilinear", "crop": "center",
                              "crop_size": int(image_size)},
            "normalization": {"applied_inside": bool(normalization_inside), "mean_rgb": list(MEAN_RGB),
                              "std_rgb": list(STDDEV_RGB),
                              "note": f"(pixel - mean) / std per channel, in 0..255 units; {note}"}}


Box = tuple[float, float, float, float]  # (left, top, right, bottom), pixels of the full-resolution picture


def _resized_shape(width: int, height: int, resize_size: int, short_side: int | None = None) -> tuple[int, int]:
    """(w, h) after resizing the picture's short side to `resize_size`. `short_side`: that of the picture this
    array is the central region of (default: the array is the whole picture, min(width, height))."""
    if short_side is None:
        scale = resize_size / min(width, height)
        return max(resize_size, round(width * scale)), max(resize_size, round(height * scale))
    scale = resize_size / short_side
    return round(width * scale), round(height * scale)


def _box_in_original(width, height, resized_w, resized_h, left, top, size) -> Box:
    sx, sy = width / resized_w, height / resized_h
    return (left * sx, top * sy, (left + size) * sx, (top + size) * sy)


def alexnet_crop_box(width: int, height: int, rng: np.random.Generator, image_size: int,
                     resize_size: int, short_side: int | None = None) -> Box:
    """The paper's train view as a box: short side to `resize_size`, a uniformly placed `image_size` square."""
    rw, rh = _resized_shape(width, height, resize_size, short_side)
    top = int(rng.integers(rh - image_size + 1))
    left = int(rng.integers(rw - image_size + 1))
    return _box_in_original(width, height, rw, rh, left, top, image_size)


def center_crop_box(width: int, height: int, image_size: int, resize_size: int,
                    short_side: int | None = None) -> Box:
    """The eval view as a box: short side to `resize_size`, the central `image_size` square."""
    rw, rh = _resized_shape(width, height, resize_size, short_side)
    return _box_in_original(width, height, rw, rh, (rw - image_size) // 2, (rh - image_size) // 2, image_size)


INCEPTION_TRIES = 10  # random-resized boxes drawn before the central fallback


def inception_crop_box(width: int, height: int, rng: np.random.Generator, scale=(0.08, 1.0),
                       ratio=(3 / 4, 4 / 3)) -> Box:
    """Szegedy et al.'s random-resized crop (torchvision's RandomResizedCrop.get_params): a box covering a
    uniform `scale` fraction of the area with a log-uniform aspect `ratio`; 10 tries, then the central box with
    the aspect ratio clamped into `ratio`. The caller resizes the box to the square output (aspect distorts)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(INCEPTION_TRIES):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(height - h + 1))
            left = int(rng.integers(width - w + 1))
            return (left, top, left + w, top + h)
    return inception_fallback_box(width, height, ratio)


def inception_fallback_box(width: int, height: int, ratio=(3 / 4, 4 / 3)) -> Box:
    """The box `inception_crop_box` falls back to when no try fits: central, the whole picture with its aspect
    ratio clamped into `ratio`."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return (left, top, left + w, top + h)


def crop_box_array(image: np.ndarray, box: Box, out_size: int) -> np.ndarray:
    """The `box` of an HWC uint8 array resampled (bilinear, antialiased) to an `out_size` square."""
    from alexnet_jax.data import decode  # local: decode imports nothing from here, but keep the graph one-way

    return decode.resample_box(Image.fromarray(image), box, (out_size, out_size))


def random_crop(image: np.ndarray, rng: np.random.Generator, image_size: int, resize_size: int,
                short_side: int | None = None) -> np.ndarray:
    """The `alexnet` train view of an array: `alexnet_crop_box` resampled to `image_size` squared."""
    h, w = image.shape[:2]
    return crop_box_array(image, alexnet_crop_box(w, h, rng, image_size, resize_size, short_side), image_size)


def center_crop(image: np.ndarray, image_size: int, resize_size: int, short_side: int | None = None) -> np.ndarray:
    """The eval view of an array: `center_crop_box` resampled to `image_size` squared."""
    h, w = image.shape[:2]
    return crop_box_array(image, center_crop_box(w, h, image_size, resize_size, short_side), image_size)


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """The `inception` train view of an array: `inception_crop_box` resized to `image_size` squared."""
    h, w = image.shape[:2]
    return crop_box_array(image, inception_crop_box(w, h, rng), image_size)


# --- on the device ------------------------------------------------------------------------------------------------

# Principal components of ImageNet RGB pixels (in 0..1 units), the values fb.resnet.torch uses
# (datasets/imagenet.lua, "pca"); AlexNet (Krizhevsky et al. 2012, section 4.1) adds
# eigvec @ (alpha * eigval) to every pixel with alpha ~ N(0, 0.1) drawn per image.
# Columns of IMAGENET_PCA_EIGVEC are the eigenvectors, rows are R, G, B.
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


def pca_lighting(images: jax.Array, key: jax.Array, std: float = 0.1) -> jax.Array:
    """AlexNet's colour (lighting) noise on NHWC images in 0..255 units -> float32, on the device.

    Each image gets the same RGB offset at every pixel: 255 * eigvec @ (alpha * eigval), alpha ~ N(0, std^2)
    per image and component. Not clipped (as fb.resnet.torch); `normalize` takes the float result as it is.
    """
    eigval = jnp.asarray(IMAGENET_PCA_EIGVAL, jnp.float32)
    eigvec = jnp.asarray(IMAGENET_PCA_EIGVEC, jnp.float32)
    alpha = jax.random.normal(key, (images.shape[0], 3), jnp.float32) * std
    offset = 255.0 * (alpha * eigval) @ eigvec.T  # (N, 3): row n is eigvec @ (alpha_n * eigval)
    return images.astype(jnp.float32) + offset[:, None, None, :]


def central_view(images: jax.Array, size: int) -> jax.Array:
    """The central `size` square of NHWC `images` (all of them when they are that size): the eval view cut on the
    device from stored pixels at the crop's scale, placed as center_crop_box places it, so the same pixels as
    the host's center_crop of each array."""
    h, w = images.shape[1:3]
    if (h, w) == (size, size):
        return images
    top, left = (h - size) // 2, (w - size) // 2
    return images[:, top:top + size, left:left + size, :]


def ten_crop(images: jax.Array, size: int) -> jax.Array:
    """(N, R, R, C) -> (10, N, size, size, C): the four corner and the centre `size` squares, then the same five
    mirrored left-right -- the paper's test-time views of the central R x R patch (section 4.1)."""
    n, h, w, c = images.shape
    offsets = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), ((h - size) // 2, (w - size) // 2)]
    views = jnp.stack([images[:, t:t + size, l:l + size, :] for t, l in offsets])
    return jnp.concatenate([views, views[:, :, :, ::-1, :]])


def ten_crop_probabilities(apply_fn, images: jax.Array, size: int) -> jax.Array:
    """Mean softmax over the ten views of each image: (N, R, R, C) uint8 -> (N, classes).

    `apply_fn(uint8 NHWC views) -> logits`. The views run one after another (`lax.map`) so memory stays that of
    a single-crop batch."""
    return jnp.mean(jax.lax.map(lambda v: jax.nn.softmax(apply_fn(v).astype(jnp.float32)), ten_crop(images, size)),
                    axis=0)


def normalize(images: jax.Array, dtype=jnp.float32) -> jax.Array:
    """uint8 NHWC -> zero-mean, unit-variance floats, on the device."""
    mean = jnp.asarray(MEAN_RGB, jnp.float32)
    std = jnp.asarray(STDDEV_RGB, jnp.float32)
    return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


def random_flip(images: jax.Array, key: jax.Array) -> jax.Array:
    """Mirror each image left-right with probability 1/2, on the device."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1, :], images)


# The device's train crops (data.device_crops): the host ships the stored pixels whole with each example's global
# stream position, and the step draws each example's crop from fold_in(device_crop_key(seed), position) alone, so
# a step's images depend only on the seed and the global batch it consumes, whatever the process, device or worker
# count. alexnet: the image_size square at a uniform offset of pixels stored at the crop's scale, a slice.
# inception: inception_crop_box's distribution on the stored array, the box resampled as crop_box_array's Pillow
# does it. Other crops than the host path's draws, as reproducible. Their own stream of the seed:
# fold_in(key(seed), 1) is the step's dropout key.
DEVICE_CROP_STREAM = 2


def device_crop_key(seed: int) -> jax.Array:
    """The key every device crop offset of a run is drawn from: the data seed's, not the dropout key."""
    return jax.random.fold_in(jax.random.key(seed), DEVICE_CROP_STREAM)


def device_crop_offsets(key: jax.Array, positions: jax.Array, bounds: tuple[int, int]) -> jax.Array:
    """(N, 2) int32 (top, left) per example, uniform in [0, bounds[0]) x [0, bounds[1]), drawn from
    fold_in(key, position): one example's offsets do not depend on which batch, process or device holds it."""
    limits = jnp.asarray(bounds, jnp.int32)
    return jax.vmap(lambda p: jax.random.randint(jax.random.fold_in(key, p), (2,), 0, limits))(positions)


def device_crops(images: jax.Array, offsets: jax.Array, size: int) -> jax.Array:
    """The `size` squares of NHWC `images` whose top-left corners are `offsets` ((N, 2) top, left)."""
    channels = images.shape[-1]
    return jax.vmap(lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (size, size, channels)))(
        images, offsets)


def device_inception_boxes(key: jax.Array, positions: jax.Array, shape: tuple[int, int], scale=(0.08, 1.0),
                           ratio=(3 / 4, 4 / 3)) -> jax.Array:
    """(N, 4) int32 (left, top, right, bottom) per example in an array of `shape` (height, width), drawn as
    inception_crop_box draws them: all its tries at once, the first that fits, else its central fallback.

    From fold_in(key, position) split four ways (area, aspect, top, left): the alexnet offsets' fold of the same
    key (a run uses one crop or the other), so an example's box does not depend on which batch, process or
    device holds it. The fallback depends on the shape only and is inception_fallback_box's own."""
    height, width = shape
    fallback = jnp.asarray(inception_fallback_box(width, height, ratio), jnp.int32)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def one(position):
        area_key, aspect_key, top_key, left_key = jax.random.split(jax.random.fold_in(key, position), 4)
        target = height * width * jax.random.uniform(area_key, (INCEPTION_TRIES,), jnp.float32, *scale)
        aspect = jnp.exp(jax.random.uniform(aspect_key, (INCEPTION_TRIES,), jnp.float32, *log_ratio))
        w = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)  # half to even, as Python's round
        h = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        # Drawn for every try (clipped so the bounds of a try that does not fit stay valid); one is kept.
        top = jax.random.randint(top_key, (INCEPTION_TRIES,), 0, height - jnp.clip(h, 1, height) + 1)
        left = jax.random.randint(left_key, (INCEPTION_TRIES,), 0, width - jnp.clip(w, 1, width) + 1)
        k = jnp.argmax(fits)
        box = jnp.stack([left[k], top[k], left[k] + w[k], top[k] + h[k]])
        return jnp.where(fits.any(), box, fallback)

    return jax.vmap(one)(positions)


def device_resample_boxes(images: jax.Array, boxes: jax.Array, size: int) -> jax.Array:
    """The `boxes` ((N, 4) left, top, right, bottom in pixels, corners need not be integers) of NHWC `images`
    resampled to `size` squares, bilinear, antialiased when shrinking, rounded to uint8: crop_box_array's Pillow
    resample on the device (Pillow rounds its first pass to 8 bits, this does not: a grey level apart at most,
    measured in tests/test_device_crops.py)."""
    channels = images.shape[-1]

    def one(image, box):
        left, top, right, bottom = box[0], box[1], box[2], box[3]
        scale = jnp.stack([size / (bottom - top), size / (right - left)])
        # scale_and_translate maps the input point y to y * scale + translation, pixel k spanning [k, k + 1] as in
        # Pillow's box coordinates: the box's top-left corner goes to 0, its bottom-right to size.
        translation = -jnp.stack([top, left]) * scale
        out = jax.image.scale_and_translate(image.astype(jnp.float32), (size, size, channels), (0, 1), scale,
                                            translation, method="linear", antialias=True)
        return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)

    return jax.vmap(one)(images, boxes.astype(jnp.float32))


def device_inception_crops(images: jax.Array, key: jax.Array, positions: jax.Array, size: int) -> jax.Array:
    """The inception train view of NHWC stored pixels, on the device: device_inception_boxes resampled to `size`."""
    return device_resample_boxes(images, device_inception_boxes(key, positions, images.shape[1:3]), size)
