"""Converting weights between PyTorch state dicts and arm-jax variables.

The key table is explicit: every PyTorch key maps to one Flax path with a
layout rule, and conversion fails naming any key left over on either side or
of the wrong shape. Two PyTorch namings are understood: torchvision's
(`conv1`, `layer1.0.conv1`, ..., `fc`) and the authors' ARM code's
(`features.0`, `features.4.0.conv1`, ..., `arm.*`, `fc`), which wraps the
torchvision children in an `nn.Sequential` (REFERENCE.md).
"""

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from arm_jax.errors import UserError
from arm_jax.models import ARMResNet18, head_geometry
from arm_jax.models.resnet import BLOCKS_PER_STAGE, STAGE_WIDTHS

# Layout rules: PyTorch conv OIHW -> Flax HWIO; Linear (out, in) -> (in, out).
CONV, LINEAR, AS_IS = "conv", "linear", "as_is"
NAMINGS = ("authors", "torchvision")
# Index of conv1/bn1/layer1..4 inside the authors' `features` Sequential
# (children of torchvision's resnet18 minus avgpool and fc).
AUTHORS_FEATURE_INDEX = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}


class ConversionError(UserError):
    """A state dict does not fit the model: names the missing, unexpected and mis-shaped keys."""


@dataclass(frozen=True)
class Entry:
    """One row of the key table: PyTorch key, Flax (collection, path) and layout rule."""

    torch_key: str
    collection: str
    path: tuple[str, ...]
    rule: str


def _bn_entries(torch_prefix: str, path: tuple[str, ...]) -> list[Entry]:
    return [
        Entry(f"{torch_prefix}.weight", "params", path + ("scale",), AS_IS),
        Entry(f"{torch_prefix}.bias", "params", path + ("bias",), AS_IS),
        Entry(f"{torch_prefix}.running_mean", "batch_stats", path + ("mean",), AS_IS),
        Entry(f"{torch_prefix}.running_var", "batch_stats", path + ("var",), AS_IS),
    ]


def _backbone_prefix(torchvision_name: str, naming: str) -> str:
    if naming == "torchvision":
        return torchvision_name
    return f"features.{AUTHORS_FEATURE_INDEX[torchvision_name]}"


def backbone_table(naming: str) -> list[Entry]:
    """The ResNet-18 rows: conv1, bn1 and the eight BasicBlocks with their downsamples."""
    root = ("backbone",)
    table = [Entry(f"{_backbone_prefix('conv1', naming)}.weight", "params", root + ("conv1", "kernel"), CONV)]
    table += _bn_entries(_backbone_prefix("bn1", naming), root + ("bn1",))
    for stage in range(1, len(STAGE_WIDTHS) + 1):
        layer = _backbone_prefix(f"layer{stage}", naming)
        for block in range(BLOCKS_PER_STAGE):
            torch_block, flax_block = f"{layer}.{block}", root + (f"layer{stage}_{block}",)
            for n in (1, 2):
                table.append(Entry(f"{torch_block}.conv{n}.weight", "params", flax_block + (f"conv{n}", "kernel"), CONV))
                table += _bn_entries(f"{torch_block}.bn{n}", flax_block + (f"bn{n}",))
            if stage > 1 and block == 0:
                down = flax_block + ("downsample",)
                table.append(Entry(f"{torch_block}.downsample.0.weight", "params", down + ("conv", "kernel"), CONV))
                table += _bn_entries(f"{torch_block}.downsample.1", down + ("bn",))
    return table


def head_table(model: ARMResNet18) -> list[Entry]:
    """The ARM and classifier rows that this model's switches call for."""
    table = []
    if model.de_albino:
        table.append(Entry("arm.de_albino.weight", "params", ("arm", "de_albino", "kernel"), CONV))
    if model.de_albino or model.arrangement:
        table += _bn_entries("arm.bn", ("arm", "bn"))
    if model.affinity:
        table.append(Entry("arm.alpha", "params", ("arm", "affinity", "alpha"), AS_IS))
    table.append(Entry("fc.weight", "params", ("fc", "kernel"), LINEAR))
    table.append(Entry("fc.bias", "params", ("fc", "bias"), AS_IS))
    return table


def key_table(model: ARMResNet18, naming: str) -> list[Entry]:
    """All rows for `model` under a PyTorch naming ('authors' or 'torchvision')."""
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {NAMINGS}, got {naming!r}")
    return backbone_table(naming) + head_table(model)


def _to_flax_layout(array: np.ndarray, rule: str) -> np.ndarray:
    if rule == CONV:
        return array.transpose(2, 3, 1, 0)
    if rule == LINEAR:
        return array.T
    return array


def _to_torch_layout(array: np.ndarray, rule: str) -> np.ndarray:
    if rule == CONV:
        return array.transpose(3, 2, 0, 1)
    if rule == LINEAR:
        return array.T
    return array


# ---------------------------------------------------------------- reading files


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a `.pth`/`.pt` (safely, never executing pickled code) or `.safetensors` state dict.

    Unwraps the authors' checkpoints (`model_state_dict` inside) and strips
    DataParallel's `module.` prefix. Returns float/int numpy arrays by key.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            raw = load_file(str(path))
        except Exception as error:  # safetensors raises its own error types
            raise UserError(f"{path}: not a readable safetensors file ({error})") from None
    elif suffix in (".pth", ".pt"):
        raw = _load_torch_file(path)
    else:
        raise UserError(f"{path}: unsupported weight file type {suffix!r}; expected .pth, .pt or .safetensors")
    return _normalise_keys(_unwrap_checkpoint(raw, path), path)


def _load_torch_file(path: Path) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise UserError(f"{path}: reading .pth files needs PyTorch: pip install 'arm-jax[torch]'") from None
    try:
        # weights_only: a pickle from the internet must never run code on load.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0]
        raise UserError(
            f"{path}: refused: the file holds pickled objects other than tensors, which could run code "
            f"when loaded ({first_line}). Re-save it as a plain state dict or .safetensors."
        ) from None
    except Exception as error:
        raise UserError(f"{path}: not a readable PyTorch file ({type(error).__name__}: {error})") from None


def _unwrap_checkpoint(raw: Any, path: Path) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(raw).__name__}")
    for wrapper in ("model_state_dict", "state_dict"):
        if wrapper in raw and isinstance(raw[wrapper], dict):
            return raw[wrapper]
    return raw


def _normalise_keys(state: dict[str, Any], path: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for key, value in state.items():
        if not hasattr(value, "shape"):
            raise UserError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().numpy()
        key = key[len("module.") :] if key.startswith("module.") else key
        arrays[key] = np.asarray(value)
    return arrays


# ---------------------------------------------------------------- PyTorch -> Flax


def detect_naming(state_dict: dict[str, np.ndarray]) -> str:
    """'authors' for `features.N` keys, 'torchvision' for `conv1`/`layerN` keys."""
    if "features.0.weight" in state_dict:
        return "authors"
    if "conv1.weight" in state_dict:
        return "torchvision"
    raise ConversionError("not a ResNet-18 state dict: found neither 'conv1.weight' nor 'features.0.weight'")


def infer_model_kwargs(state_dict: dict[str, np.ndarray], **overrides: Any) -> dict[str, Any]:
    """Model settings implied by the keys and shapes; explicit `overrides` win."""
    if "fc.weight" not in state_dict:
        raise ConversionError("missing key 'fc.weight': cannot tell the number of classes")
    has_arm = any(key.startswith("arm.") for key in state_dict)
    kwargs: dict[str, Any] = {
        "num_classes": int(state_dict["fc.weight"].shape[0]),
        "arrangement": has_arm,
        "de_albino": "arm.de_albino.weight" in state_dict,
        "affinity": "arm.alpha" in state_dict,
    }
    if kwargs["de_albino"]:
        kwargs["de_albino_kernel"] = int(state_dict["arm.de_albino.weight"].shape[-1])
    kwargs.update(overrides)
    if "image_size" not in kwargs:
        kwargs["image_size"] = _infer_image_size(state_dict, kwargs)
    return kwargs


def model_for_state_dict(state_dict: dict[str, np.ndarray], source: str = "the state dict",
                         **model_kwargs: Any) -> ARMResNet18:
    """The ARMResNet18 a state dict's keys and shapes imply, `model_kwargs` over them; a
    ConversionError naming `source` where no such model can be built (its head does not fit
    the image size)."""
    try:
        return ARMResNet18(**infer_model_kwargs(state_dict, **model_kwargs))
    except ValueError as error:
        raise ConversionError(f"{source}: {error}") from None


def _infer_image_size(state_dict: dict[str, np.ndarray], kwargs: dict[str, Any]) -> int:
    """224 when it fits the classifier's input width, else the nearest multiple of 32 that does."""
    in_features = int(state_dict["fc.weight"].shape[1])
    for side in [7] + list(range(1, 33)):
        try:
            geometry = head_geometry(ARMResNet18(**{**kwargs, "image_size": 32 * side}))
        except ValueError:  # the head does not fit this size
            continue
        width = geometry.get("representation_side", 0) ** 2 or STAGE_WIDTHS[-1]
        if width == in_features:
            return 32 * side
    raise ConversionError(f"fc.weight takes {in_features} inputs, which no input size of this ARM model gives")


def expected_shapes(model: ARMResNet18) -> dict[str, Any]:
    """Shapes of `model`'s variables, without allocating them."""
    x = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x, train=False))


def torch_to_flax(state_dict: dict[str, np.ndarray], **model_kwargs: Any) -> dict[str, Any]:
    """Variables for `ARMResNet18(**kwargs)` from a PyTorch state dict.

    `model_kwargs` default to what the keys imply (a torchvision resnet18 gives
    the plain classifier: all ARM switches off). The running GAR is not part
    of PyTorch checkpoints: it comes back zero with count 0 (uncalibrated).
    """
    return convert_for_model(state_dict, model_for_state_dict(state_dict, **model_kwargs))


def convert_for_model(state_dict: dict[str, np.ndarray], model: ARMResNet18) -> dict[str, Any]:
    """Like `torch_to_flax` for a given model; fails on leftover or mis-shaped keys."""
    table = key_table(model, detect_naming(state_dict))
    shapes = traverse_util.flatten_dict(expected_shapes(model))
    ignorable = {key for key in state_dict if key.endswith("num_batches_tracked")}
    missing = [row.torch_key for row in table if row.torch_key not in state_dict]
    unexpected = sorted(set(state_dict) - {row.torch_key for row in table} - ignorable)
    flat, misshaped = {}, []
    for row in table:
        if row.torch_key not in state_dict:
            continue
        array = _to_flax_layout(state_dict[row.torch_key], row.rule)
        spec = shapes[(row.collection,) + row.path]
        want = spec.shape
        if tuple(array.shape) != tuple(want):
            misshaped.append(f"{row.torch_key}: file has {tuple(state_dict[row.torch_key].shape)}, "
                             f"model needs {tuple(_to_torch_layout(np.empty(want), row.rule).shape)}")
            continue
        flat[(row.collection,) + row.path] = np.asarray(array, spec.dtype)
    _raise_if_mismatched(missing, unexpected, misshaped)
    for key, spec in shapes.items():  # the running GAR: not in PyTorch files
        if key[0] == "gar":
            flat[key] = np.zeros(spec.shape, spec.dtype)
    return traverse_util.unflatten_dict(flat)


def _raise_if_mismatched(missing: list[str], unexpected: list[str], misshaped: list[str]) -> None:
    problems = []
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", misshaped)):
        if keys:
            problems.append(f"{title} ({len(keys)}): " + ", ".join(keys))
    if problems:
        raise ConversionError("state dict does not fit the model: " + "; ".join(problems))


# ---------------------------------------------------------------- Flax -> PyTorch


def flax_to_torch(variables: dict[str, Any], model: ARMResNet18, naming: str = "authors") -> dict[str, np.ndarray]:
    """A PyTorch state dict (numpy arrays) for `variables`, in the authors' or torchvision's naming."""
    flat = traverse_util.flatten_dict(jax.device_get(variables))
    state = {}
    for row in key_table(model, naming):
        state[row.torch_key] = np.ascontiguousarray(_to_torch_layout(np.asarray(flat[(row.collection,) + row.path]), row.rule))
        if row.torch_key.endswith(".running_var"):
            # PyTorch's BatchNorm carries a step counter; 0 is what a fresh module holds.
            state[row.torch_key.replace("running_var", "num_batches_tracked")] = np.zeros((), np.int64)
    return state


def save_safetensors(state_dict: dict[str, np.ndarray], path: str | Path) -> None:
    """Write a state dict that `safetensors.torch.load_file` and arm-jax both read."""
    from safetensors.numpy import save_file

    save_file({key: np.ascontiguousarray(value) for key, value in state_dict.items()}, str(path))
