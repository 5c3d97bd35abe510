"""PyTorch interop: torchvision-layout AlexNet weights into the ``owt`` model, and back out of it.

torchvision's ``alexnet`` is the single-tower "one weird trick" layout, which is exactly our ``owt`` variant, so
the mapping is one-to-one; only the array layouts differ:

  torchvision key                      ours            layout change
  features.{0,3,6,8,10}.weight  (OIHW) conv1..conv5    -> HWIO kernel
  features.{0,3,6,8,10}.bias           conv1..conv5    -
  classifier.{1,4,6}.weight  (out, in) fc6, fc7, fc8   -> (in, out) kernel; fc6 rows also C-H-W -> H-W-C
  classifier.{1,4,6}.bias              fc6, fc7, fc8   -

fc6 is the one subtle layer: PyTorch flattens the 6x6 pooled map channel-major (C-H-W) and our NHWC model flattens
it channel-minor (H-W-C), so fc6's input rows are permuted once here rather than transposing activations at every
step. Everything else (padding, pool floors, adaptive-pool bins) already matches torchvision in models.py.

Both directions go through the one key table below (torchvision_key_map) and inverse array layouts, so
``to_torchvision_state_dict(load_torchvision_state_dict(sd))`` gives ``sd`` back bit for bit.

Nothing here imports torch: values may be torch tensors or anything ``np.asarray`` accepts, and the state dict
going out holds numpy arrays (``torch.from_numpy`` each to save it).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_CONVS = {"features.0": "conv1", "features.3": "conv2", "features.6": "conv3", "features.8": "conv4",
          "features.10": "conv5"}
_LINEARS = {"classifier.1": "fc6", "classifier.4": "fc7", "classifier.6": "fc8"}


def torchvision_key_map() -> dict[str, tuple[str, str]]:
    """torchvision state-dict key -> (our layer, our parameter name)."""
    keys = {}
    for prefix, layer in {**_CONVS, **_LINEARS}.items():
        keys[f"{prefix}.weight"] = (layer, "kernel")
        keys[f"{prefix}.bias"] = (layer, "bias")
    return keys


def _to_numpy(key: str, value) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "is_floating_point"):
        if not value.is_floating_point():
            raise ValueError(f"state_dict[{key!r}] has dtype {value.dtype}, expected floating point")
        value = value.detach().cpu().float().numpy()  # torch's bfloat16 has no numpy view: go through float32
    try:
        array = np.asarray(value)
    except Exception as error:  # noqa: BLE001 - name the key whatever the value was
        raise ValueError(f"state_dict[{key!r}] is not an array: {error}") from None
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"state_dict[{key!r}] has dtype {array.dtype}, expected floating point")
    return array.astype(np.float32)


def _torch_shape(layer: str, name: str, ours: tuple[int, ...]) -> tuple[int, ...]:
    """The shape torchvision stores for our parameter of shape `ours`."""
    if name == "bias":
        return ours
    if layer.startswith("conv"):
        h, w, i, o = ours
        return (o, i, h, w)
    return (ours[1], ours[0])


def _convert(layer: str, name: str, value: np.ndarray, conv5_channels: int) -> np.ndarray:
    """torchvision's array -> ours (shapes already checked)."""
    if name == "bias":
        return value
    if layer.startswith("conv"):
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if layer == "fc6":
        out_features, in_features = value.shape
        side = int(round((in_features // conv5_channels) ** 0.5))
        # (out, C, H, W) -> (H, W, C, out): row (h, w, c) of our kernel is torch column c*H*W + h*W + w.
        return (value.reshape(out_features, conv5_channels, side, side)
                .transpose(2, 3, 1, 0).reshape(in_features, out_features))
    return value.T


def _convert_back(layer: str, name: str, value: np.ndarray, conv5_channels: int) -> np.ndarray:
    """Ours -> torchvision's array: the inverse of _convert."""
    if name == "bias":
        return value
    if layer.startswith("conv"):
        return value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if layer == "fc6":
        in_features, out_features = value.shape
        side = int(round((in_features // conv5_channels) ** 0.5))
        return (value.reshape(side, side, conv5_channels, out_features)
                .transpose(3, 2, 0, 1).reshape(out_features, in_features))
    return value.T


def torchvision_incompatibility(model_config) -> str | None:
    """Why torchvision's ``alexnet`` cannot hold a model of this config, or None when it can.

    torchvision's module is fixed: the owt layout at width 1 (64 conv1 filters, 4096 hidden units) with ReLU;
    only the number of classes is free. space_to_depth is only another way to compute conv1 with the same
    kernel, so it does not matter here."""
    variant = model_config.get("variant")
    if variant != "owt":
        return (f"model.variant={variant!r}: torchvision's AlexNet is the 'owt' layout "
                f"({'grouped convolutions and LRN' if variant == 'original' else 'it has no BatchNorm'})")
    if model_config.get("activation", "relu") != "relu":
        return f"model.activation={model_config.activation!r}: torchvision's AlexNet uses ReLU"
    if float(model_config.get("width", 1.0)) != 1.0:
        return f"model.width={model_config.width}: torchvision's AlexNet has width 1 (64 conv1 filters)"
    return None


def to_torchvision_state_dict(params: Mapping) -> dict[str, np.ndarray]:
    """Our ``owt`` params (the pure dict: {layer: {"kernel", "bias"}}) -> a torchvision-layout state dict of
    float32 numpy arrays, in torchvision's key order."""
    conv5_channels = np.shape(params["conv5"]["kernel"])[-1]
    # Fresh writable C-order arrays: torch.from_numpy shares memory with them and warns on read-only ones.
    return {key: np.array(_convert_back(layer, name, np.asarray(jax.device_get(params[layer][name]), np.float32),
                                        conv5_channels), dtype=np.float32, order="C")
            for key, (layer, name) in torchvision_key_map().items()}


def unwrap_state_dict(state_dict: Mapping) -> Mapping:
    """The plain state dict inside the two common wrappings: {"state_dict": ...} from training scripts and the
    "module." key prefix of DataParallel / DistributedDataParallel checkpoints."""
    if isinstance(state_dict, Mapping) and isinstance(state_dict.get("state_dict"), Mapping):
        state_dict = state_dict["state_dict"]
    if isinstance(state_dict, Mapping) and state_dict and all(str(k).startswith("module.") for k in state_dict):
        state_dict = {str(k)[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def load_torchvision_state_dict(model, state_dict: Mapping) -> None:
    """Loads torchvision-layout AlexNet weights into `model` (an ``owt`` AlexNet) in place.

    `model` may be abstract (``nnx.eval_shape(lambda: AlexNet(...))``): every parameter is replaced, so there is
    no need to initialise one randomly first. Every key of the layout must be present with the shape the model's
    own parameters imply (so a width-scaled model takes a width-scaled state dict); a missing, unexpected or
    mis-shaped key raises ValueError naming it, before anything in the model changes.
    Afterwards ``model.eval()(x)`` equals torchvision's ``alexnet.eval()(x)`` on the same normalised input
    (NHWC here, NCHW there), at any input size, through the same adaptive pool.
    """
    if getattr(model, "variant", None) != "owt":
        raise ValueError(f"torchvision weights fit only the 'owt' variant, not {getattr(model, 'variant', model)!r}")
    state_dict = unwrap_state_dict(state_dict)
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"state_dict must be a mapping of key -> array, got {type(state_dict).__name__}")
    key_map = torchvision_key_map()
    missing = [k for k in key_map if k not in state_dict]
    if missing:
        more = f" (and {len(missing) - 1} more keys)" if len(missing) > 1 else ""
        raise ValueError(f"state_dict is missing {missing[0]!r}{more}")
    unexpected = [k for k in state_dict if k not in key_map]
    if unexpected:
        raise ValueError(f"unexpected key {unexpected[0]!r} in state_dict (expected torchvision AlexNet keys "
                         f"features.{{0,3,6,8,10}}.* and classifier.{{1,4,6}}.*)")

    params = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(params)
    conv5_channels = pure["conv5"]["kernel"].shape[-1]
    new = {layer: dict(values) for layer, values in pure.items()}
    for key, (layer, name) in key_map.items():
        ours = tuple(pure[layer][name].shape)
        value = _to_numpy(key, state_dict[key])
        expected = _torch_shape(layer, name, ours)
        if value.shape != expected:
            raise ValueError(f"state_dict[{key!r}] has shape {tuple(value.shape)}, but this model "
                             f"({model.num_classes} classes, its width) needs {expected}")
        existing = pure[layer][name]
        converted = _convert(layer, name, value, conv5_channels).astype(existing.dtype)
        # Keep a live model's placement (e.g. fc6 split over a mesh); an abstract one (nnx.eval_shape) gets
        # default-device arrays, which lets callers skip random initialisation altogether.
        new[layer][name] = (jax.device_put(converted, existing.sharding) if isinstance(existing, jax.Array)
                            else jnp.asarray(converted))
    nnx.replace_by_pure_dict(params, new)
    nnx.update(model, params)
