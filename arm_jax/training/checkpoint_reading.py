"""Reading a trained model out of a training checkpoint, for evaluate, predict and serve.

Which step (`checkpoints/<step>`): for 'best' the step of the best validation WA (the steps
whose orbax metrics hold a WA are the new bests), then the others newest first, as fallbacks
(`_first_intact`); for 'latest' the newest first. The layout of arm-jax 0.1 before one
manager (`checkpoints/latest/<step>`, `checkpoints/best/<step>`) is read alike. The step's
'model' JSON item and its 'variables' are read straight from the files orbax (0.12) writes:
the JSON file, and each array with tensorstore from the OCDBT store the item's `_METADATA`
describes. Importing orbax and restoring through it took about 1 s of the 2.5 s `predict`
needs on a 2-core machine; a layout this module does not know (another orbax version's) is
handed to orbax, and the tests hold both readers to the same arrays, bit for bit
(tests/test_predict_caches.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from arm_jax.errors import UserError

log = logging.getLogger(__name__)

KINDS = ("latest", "best")
JSON_ITEM_FILE = "metadata"  # orbax's JsonCheckpointHandler's file in a JSON item's directory
TREE_METADATA_FILE = "_METADATA"  # orbax's PyTree handler's tree description in an array item's directory
_DICT_KEY = 2  # orbax's key_type of a dict key (1: a sequence index)
_ARRAY_VALUES = ("np.ndarray", "jax.Array")  # value types stored as arrays in the OCDBT store (not scalars)


def _describe(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


def read_variables(item: Path, abstract: Any) -> dict | None:
    """The arrays of an orbax array item (a tree of dicts), as jax arrays shaped as `abstract`, read with
    tensorstore; None when the item's layout is not the one orbax 0.12 writes by default.

    Like orbax's restore into a target: a leaf missing on either side or of another shape is an
    error, one of another dtype is cast.
    """
    import tensorstore

    try:
        described = json.loads((item / TREE_METADATA_FILE).read_text())
        entries = described["tree_metadata"].values()
        keys = [tuple(key["key"] for key in entry["key_metadata"]) for entry in entries]
        known = (described.get("use_ocdbt") is True and all(
            entry["value_metadata"]["value_type"] in _ARRAY_VALUES and not entry["value_metadata"]["skip_deserialize"]
            and all(key["key_type"] == _DICT_KEY for key in entry["key_metadata"]) for entry in entries))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not known:
        return None
    expected = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    if set(keys) != set(expected):
        raise ValueError(f"the checkpoint's arrays do not match the model's: only in the checkpoint "
                         f"{sorted(set(keys) - set(expected))[:3]}, only in the model {sorted(set(expected) - set(keys))[:3]}")
    store = {"driver": "ocdbt", "base": {"driver": "file", "path": f"{item.absolute()}/"}}
    driver = "zarr3" if described.get("use_zarr3") else "zarr"
    context = tensorstore.Context()
    opened = [tensorstore.open({"driver": driver, "kvstore": store, "path": ".".join(key)}, open=True, read=True,
                               context=context) for key in keys]  # all requests in flight at once
    reads = [future.result().read() for future in opened]
    tree: dict = {}
    for key, read in zip(keys, reads):
        array, want = read.result(), expected[key]
        if array.shape != tuple(want.shape):
            raise ValueError(f"{'/'.join(key)}: shape {array.shape} in the checkpoint, {tuple(want.shape)} in the model")
        node = tree
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = jax.device_put(np.asarray(array, dtype=want.dtype))
    return tree


METRICS_FILE = "metrics/metrics"  # orbax's item of a step's metrics, and its file (a WA in new bests only)


def best_steps(directory: Path) -> list[int]:
    """The steps in a checkpoints directory whose metrics hold a validation WA (new bests), best first."""
    scored = []
    for path in directory.iterdir() if directory.is_dir() else ():
        if path.name.isdigit() and (path / METRICS_FILE).is_file():
            try:
                scored.append((float(json.loads((path / METRICS_FILE).read_text())["val_wa"]), int(path.name)))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # unreadable: the step is still a fallback among the others
    return [step for _, step in sorted(scored, reverse=True)]


def _locate(path: str | Path, which: str) -> tuple[Path, int | None]:
    """(checkpoints directory, step or None for the one `which` picks) for a workdir, checkpoints
    dir (of an earlier 0.1: its 'latest'/'best' dir) or one step's directory."""
    if which not in KINDS:
        raise UserError(f"which: {which!r} is not one of {', '.join(KINDS)}")
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint or work directory")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / which).is_dir():  # an earlier 0.1's layout
        path = path / which
    if (path / "model").is_dir() and path.name.isdigit():  # one step's directory
        return path.parent, int(path.name)
    return path, None


def _steps_to_try(path: str | Path, which: str) -> list[tuple[Path, int]]:
    """(checkpoints directory, step) in the order to try: the one step asked for, or for 'best'
    the best steps then the others newest first, for 'latest' all newest first (an earlier 0.1's
    layout: every step of `which`, then for 'best' of 'latest')."""
    directory, step = _locate(path, which)
    if step is not None:
        return [(directory, step)]
    directories = [directory]
    if which == "best" and directory.name == "best":
        directories.append(directory.parent / "latest")  # if no best is intact, the newest
    found = [(d, int(p.name)) for d in directories if d.is_dir() for p in d.iterdir()
             if p.name.isdigit() and p.is_dir()]  # orbax's finished step directories
    rank = {step: i for i, step in enumerate(best_steps(directory))} if which == "best" else {}
    found.sort(key=lambda item: (item[0] != directory, rank.get(item[1], len(rank)), -item[1]))
    if not found:
        raise UserError(f"{directory}: holds no checkpoint (looked for '{which}' under {path})")
    return found


def _first_intact(path: str | Path, which: str, load):
    """load(directory, step) for the newest step that loads; older ones are fallbacks.

    A step that fails is skipped with a warning naming it; if none loads, the newest's
    error is the user's.
    """
    candidates = _steps_to_try(path, which)
    first_error = None
    for directory, step in candidates:
        where = directory / str(step)
        try:
            return load(directory, step)
        except Exception as err:  # orbax raises many types (ValueError, KeyError, OSError...)
            if len(candidates) > 1:
                log.warning("%s: skipped, cannot restore it (%s); trying an older checkpoint",
                            where, _describe(err))
            if first_error is None:
                first_error = (where, err)
    where, err = first_error
    reason = f"{_describe(err)}" if len(candidates) == 1 else \
        f"none of its {len(candidates)} checkpoints restores; the newest: {_describe(err)}"
    raise UserError(f"{where}: cannot restore this checkpoint: it is incomplete, corrupt or from "
                    f"an incompatible model/optimizer ({reason})") from err


def _read_info(directory: Path, step: int) -> dict:
    """The 'model' JSON item: its file as orbax's JsonCheckpointHandler writes it, else through orbax."""
    try:
        info = json.loads((directory / str(step) / "model" / JSON_ITEM_FILE).read_text())
    except FileNotFoundError:  # another layout: let orbax read it
        import orbax.checkpoint as ocp

        from arm_jax.training.checkpoints import _manager

        manager = _manager(directory, 1, create=False)
        info = manager.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))["model"]
    if not isinstance(info, dict) or "architecture" not in info or "class_names" not in info:
        raise ValueError("its 'model' item lacks architecture/class_names")
    return info


def read_model_info(path: str | Path, which: str = "best") -> tuple[Path, int, dict]:
    """(step directory, step, the 'model' JSON item) of the newest readable checkpoint."""
    return _first_intact(path, which, lambda d, step: (d / str(step), step, _read_info(d, step)))


def load_model_from_checkpoint(path: str | Path, which: str = "best",
                               shapes_for: Callable[[dict], Any] | None = None):
    """Rebuild a trained model from its checkpoint alone (the newest intact one).

    Args:
      path: a workdir, its checkpoints/ directory, or one step's directory inside it.
      which: 'best' (highest validation WA; falls back to 'latest') or 'latest'.
      shapes_for: architecture dict -> the variables' tree of jax.ShapeDtypeStruct to restore
        into, or None; by default (and where it gives None) they come from tracing the
        model's init, which costs about a second and imports flax.
    Returns:
      (architecture dict for ARMResNet18(**architecture), class_names list, variables
      {'params', 'batch_stats', 'gar'} as jax arrays).
    """

    def load(directory: Path, step: int):
        info = _read_info(directory, step)
        abstract = shapes_for(info["architecture"]) if shapes_for is not None else None
        if abstract is None:
            abstract = _traced_shapes(info["architecture"])
        # Training saves TrainState.variables, which holds every collection; a model without
        # Sharing Affinity has no 'gar' in its init, but an empty one in the checkpoint.
        abstract = {"batch_stats": {}, "gar": {}, **abstract}
        variables = read_variables(directory / str(step) / "variables", abstract)
        if variables is None:  # a layout read_variables does not know: orbax reads it
            import orbax.checkpoint as ocp

            from arm_jax.training.checkpoints import _manager

            manager = _manager(directory, 1, create=False)
            variables = manager.restore(step, args=ocp.args.Composite(
                variables=ocp.args.StandardRestore(abstract)))["variables"]
        return dict(info["architecture"]), list(info["class_names"]), variables

    return _first_intact(path, which, load)


def _traced_shapes(fields: dict) -> Any:
    """The variables' shapes of ARMResNet18(**fields), from jax.eval_shape of its init."""
    from arm_jax.models import ARMResNet18

    try:
        model = ARMResNet18(**fields)
    except TypeError as err:
        raise ValueError(f"unknown architecture fields ({err})") from err
    x = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), np.float32)
    return jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x, train=False), x)
