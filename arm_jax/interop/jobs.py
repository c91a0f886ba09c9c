"""The conversions behind `arm-jax convert` and scripts/convert_weights.py."""

from pathlib import Path

from arm_jax.interop.convert import flax_to_torch, save_safetensors
from arm_jax.errors import UserError
from arm_jax.interop.model_files import WEIGHT_SUFFIXES, load_any_model, load_pytorch_model, save_model


def convert_job(source: Path, destination: Path, *, class_names: tuple[str, ...] | None = None,
                image_size: int | None = None, naming: str = "authors") -> str:
    """Convert in the direction the paths imply; returns a one-line summary."""
    source, destination = Path(source), Path(destination)
    if destination.suffix.lower() == ".safetensors":
        if destination.exists():
            raise UserError(f"{destination}: already exists; refusing to overwrite it")
        loaded = load_any_model(source, class_names)
        save_safetensors(flax_to_torch(loaded.variables, loaded.model, naming), destination)
        return f"wrote {destination} ({naming} key names, {loaded.model.num_classes} classes)"
    if source.suffix.lower() not in WEIGHT_SUFFIXES:
        raise UserError(f"{source}: expected a .pth, .pt or .safetensors file to convert into an arm-jax model")
    overrides = {} if image_size is None else {"image_size": image_size}
    loaded = load_pytorch_model(source, class_names, **overrides)
    save_model(destination, loaded.variables, loaded.model, loaded.class_names, source=str(source))
    model = loaded.model
    switches = ", ".join(f"{name}={getattr(model, name)}" for name in ("arrangement", "de_albino", "affinity"))
    summary = f"wrote {destination}: {model.num_classes} classes, image size {model.image_size}, {switches}"
    if not loaded.gar_calibrated:
        summary += "; the running GAR is not calibrated yet (PyTorch files carry none): see `arm-jax calibrate`"
    return summary
