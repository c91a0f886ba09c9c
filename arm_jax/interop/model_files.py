"""Saving and loading a model on its own (weights + architecture), as `arm-jax convert` writes it.

A model directory holds `model.json` (the architecture fields and class names)
and `variables/`, an orbax checkpoint of params, batch_stats and the running
GAR. Training checkpoints (arm_jax.training.checkpoints) hold the same information.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from arm_jax.data.classes import canonical_names
from arm_jax.interop.convert import convert_for_model, expected_shapes, load_state_dict, model_for_state_dict
from arm_jax.errors import UserError
from arm_jax.models import ARCHITECTURE_FIELDS, ARMResNet18, architecture

MODEL_FILE = "model.json"
VARIABLES_DIR = "variables"
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")


@dataclass(frozen=True)
class LoadedModel:
    """A network, its variables and the canonical names of its classes (None where the file had none).

    Names are canonical (arm_jax.data.classes): a checkpoint that says "angry" loads as "anger",
    so predictions print one vocabulary and evaluation can match classes across data sets.
    """

    model: ARMResNet18
    variables: dict[str, Any]
    class_names: tuple[str, ...] | None

    def __post_init__(self):
        if self.class_names is not None:
            object.__setattr__(self, "class_names", canonical_names(self.class_names, "the model's classes"))

    def named(self, class_names: tuple[str, ...], what: str) -> "LoadedModel":
        """This model with `class_names` where it had none; they must fit its classes."""
        if len(class_names) != self.model.num_classes:
            raise UserError(f"{what}: the model predicts {self.model.num_classes} classes but "
                            f"{len(class_names)} class names are given ({', '.join(class_names)})")
        return LoadedModel(self.model, self.variables, self.class_names or tuple(class_names))

    @property
    def gar_calibrated(self) -> bool:
        """Whether the running GAR was ever estimated (PyTorch checkpoints carry none)."""
        if not self.model.affinity:
            return True
        return int(self.variables["gar"]["arm"]["affinity"]["count"]) > 0


def save_model(directory: str | Path, variables: dict[str, Any], model: ARMResNet18,
               class_names: tuple[str, ...] | None = None, source: str | None = None) -> Path:
    """Write `model.json` and an orbax checkpoint of `variables` into a new directory."""
    directory = Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        raise UserError(f"{directory}: already exists and is not empty; choose a new output directory")
    names = list(class_names) if class_names else None  # None: unknown, taken from the data set later
    if names is not None and len(names) != model.num_classes:
        raise UserError(f"{len(names)} class names given for a model of {model.num_classes} classes")
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / VARIABLES_DIR, jax.tree.map(np.asarray, variables))
    description = {"architecture": architecture(model), "class_names": names, "source": source}
    (directory / MODEL_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return directory


def read_model_description(directory: Path) -> tuple[ARMResNet18, tuple[str, ...] | None]:
    """The architecture and class names of a model directory."""
    try:
        description = json.loads((directory / MODEL_FILE).read_text())
        fields = description["architecture"]
        unknown = set(fields) - set(ARCHITECTURE_FIELDS)
        if unknown:
            raise UserError(f"{directory / MODEL_FILE}: unknown architecture fields {sorted(unknown)}")
        model = ARMResNet18(**fields)
        names = description["class_names"]
        return model, (tuple(names) if names is not None else None)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{directory / MODEL_FILE}: not a valid arm-jax model description ({error})") from None


def load_model_directory(directory: str | Path, shapes_for: Callable[[dict], Any] | None = None) -> LoadedModel:
    """Read a directory written by `save_model`; `shapes_for` as load_any_model's."""
    directory = Path(directory).absolute()
    model, class_names = read_model_description(directory)
    target = shapes_for(architecture(model)) if shapes_for is not None else None
    if target is None:
        target = expected_shapes(model)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            variables = checkpointer.restore(directory / VARIABLES_DIR, target)
    except Exception as error:  # orbax raises many types for missing/corrupt/mismatched files
        raise UserError(f"{directory / VARIABLES_DIR}: cannot restore the model's variables ({error})") from None
    return LoadedModel(model, variables, class_names)


def load_pytorch_model(path: str | Path, class_names: tuple[str, ...] | None = None, **model_kwargs: Any) -> LoadedModel:
    """Convert a PyTorch file on the fly (torchvision resnet18 or the authors' ARM checkpoint)."""
    state_dict = load_state_dict(path)
    model = model_for_state_dict(state_dict, str(path), **model_kwargs)
    loaded = LoadedModel(model, convert_for_model(state_dict, model), None)
    return loaded.named(tuple(class_names), str(path)) if class_names else loaded


def load_any_model(path: str | Path, class_names: tuple[str, ...] | None = None,
                   shapes_for: Callable[[dict], Any] | None = None) -> LoadedModel:
    """A model from a PyTorch file, a model directory, or a training workdir/checkpoint (best first).

    `shapes_for`: architecture dict -> the variables' jax.ShapeDtypeStruct tree to restore a model
    directory or checkpoint into, or None; by default (and for None) traced from the model's init.
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() in WEIGHT_SUFFIXES:
        return load_pytorch_model(path, class_names)
    if (path / MODEL_FILE).is_file():
        loaded = load_model_directory(path, shapes_for)
    elif path.is_dir():
        from arm_jax.training.checkpoint_reading import load_model_from_checkpoint  # the training side's format

        fields, names, variables = load_model_from_checkpoint(path, shapes_for=shapes_for)
        try:
            model = ARMResNet18(**fields)
        except (TypeError, ValueError) as error:
            raise UserError(f"{path}: its checkpoint describes no model this version can build ({error})") from None
        loaded = LoadedModel(model, variables, tuple(names))
    else:
        raise UserError(
            f"{path}: not a model: expected a .pth/.pt/.safetensors file, a directory written by "
            "`arm-jax convert`, or a training --workdir"
        )
    return loaded.named(tuple(class_names), str(path)) if class_names else loaded
