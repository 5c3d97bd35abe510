"""Per-example host transforms (uint8 in, uint8 out) and the on-device ones that run inside the jitted step.

The host only decodes, resizes and crops; it ships uint8 NHWC so transfers are 4x smaller than float32.
Normalisation and flips run on the accelerator where they are nearly free.
"""

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

# ImageNet channel statistics in 0..255 units (the values torchvision and the Flax example use).
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def resize_short_side(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    if min(h, w) == size:
        return image
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))


def center_crop(image: np.ndarray, image_size: int, resize_size: int) -> np.ndarray:
    """Eval view: short side to `resize_size`, then the central `image_size` square."""
    image = resize_short_side(image, resize_size)
    h, w = image.shape[:2]
    top, left = (h - image_size) // 2, (w - image_size) // 2
    return image[top:top + image_size, left:left + image_size]


def random_crop(image: np.ndarray, rng: np.random.Generator, image_size: int, resize_size: int) -> np.ndarray:
    """Train view: short side to `resize_size`, then a uniformly placed `image_size` square."""
    image = resize_short_side(image, resize_size)
    h, w = image.shape[:2]
    top = int(rng.integers(h - image_size + 1))
    left = int(rng.integers(w - image_size + 1))
    return image[top:top + image_size, left:left + image_size]


def normalize(images: jax.Array, dtype=jnp.float32) -> jax.Array:
    """uint8 NHWC -> zero-mean, unit-variance floats, on the device."""
    mean = jnp.asarray(MEAN_RGB, jnp.float32)
    std = jnp.asarray(STDDEV_RGB, jnp.float32)
    return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


def random_flip(images: jax.Array, key: jax.Array) -> jax.Array:
    """Mirror each image left-right with probability 1/2, on the device."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1, :], images)
