"""Fresh model variables, optionally with the backbone taken from a pretrained network."""

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from arm_jax.interop.convert import convert_for_model, load_state_dict, model_for_state_dict
from arm_jax.interop.downloads import resolve_weights
from arm_jax.interop.model_files import load_any_model
from arm_jax.models import ARMResNet18


def init_variables(model: ARMResNet18, rng: jax.Array, pretrained: str | Path | None = None) -> dict[str, Any]:
    """Fresh variables for `model`; with `pretrained`, the backbone comes from that file.

    `pretrained` is "imagenet" (torchvision's resnet18, downloaded once into the cache),
    a torchvision resnet18 (or authors') `.pth`/`.safetensors`
    file, or an arm-jax model directory or training workdir; only backbone
    parameters and BatchNorm statistics are taken, the ARM
    head and classifier keep their fresh initialisation (as the released code
    builds them on top of the ImageNet backbone).
    """
    x = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
    variables = jax.jit(lambda key: model.init({"params": key}, x, train=False))(rng)
    if pretrained is None or str(pretrained).lower() == "none":
        return variables
    return with_pretrained_backbone(variables, model, pretrained)


def with_pretrained_backbone(variables: dict[str, Any], model: ARMResNet18,
                             pretrained: str | Path) -> dict[str, Any]:
    """`variables` of `model` with every backbone entry taken from `pretrained` (see above)."""
    flat = traverse_util.flatten_dict(variables)
    path = resolve_weights(pretrained)  # 'imagenet': torchvision's resnet18, cached
    for key, value in traverse_util.flatten_dict(_pretrained_variables(path, model)).items():
        if key[1] == "backbone":
            flat[key] = jnp.asarray(value)
    return traverse_util.unflatten_dict(flat)


def _pretrained_variables(path: Path, model: ARMResNet18) -> dict[str, Any]:
    """All variables of the pretrained network in `path` (a weight file or an arm-jax model/workdir)."""
    if path.is_dir():
        return load_any_model(path).variables
    state_dict = load_state_dict(path)
    source_model = model_for_state_dict(state_dict, str(path), image_size=model.image_size)
    return convert_for_model(state_dict, source_model)
