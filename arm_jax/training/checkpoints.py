"""Checkpoints with orbax: `<workdir>/checkpoints/latest` (the last few) and `.../best`.

Each checkpoint (a step directory) holds four items:
- 'variables': {'params', 'batch_stats', 'gar'}: all evaluate/predict need;
- 'optimizer': {'opt_state', 'step'}: Adam's moments and the step count;
- 'progress' (JSON): epoch, batches done in it, the data iterator's state, the step key,
  the partial epoch's metric sums, the best validation WA so far, the last validation;
- 'model' (JSON): {'architecture', 'class_names', 'dataset', 'image_size'}, so a model
  can be rebuilt from the checkpoint alone (`load_model_from_checkpoint`).
Two managers rather than one with `best_fn`: orbax keeps either the newest or the best N
steps, and a run needs both (resume from the newest, evaluate the best).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from arm_jax.errors import UserError
from arm_jax.training.state import TrainState

KINDS = ("latest", "best")
_ARRAY_ITEMS = ("variables", "optimizer")
_JSON_ITEMS = ("progress", "model")


def _manager(directory: Path, keep: int, *, create: bool) -> ocp.CheckpointManager:
    # With several processes orbax synchronises each save with barriers named after the
    # step; 'latest' and 'best' save the same step, so their barriers need distinct names.
    multiprocessing = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=directory.name)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           multiprocessing_options=multiprocessing)
    return ocp.CheckpointManager(directory.absolute(), options=options,
                                 item_names=_ARRAY_ITEMS + _JSON_ITEMS)


def _split(state: TrainState) -> dict:
    return {"variables": state.variables,
            "optimizer": {"opt_state": state.opt_state, "step": state.step}}


class Checkpoints:
    """The run's two checkpoint managers. States go in and come out as numpy pytrees."""

    def __init__(self, workdir: str | Path, *, keep: int = 3):
        self.root = Path(workdir) / "checkpoints"
        self.latest = _manager(self.root / "latest", keep, create=True)
        self.best = _manager(self.root / "best", 1, create=True)

    def save(self, host_state: TrainState, progress: dict, model_info: dict, *,
             kind: str = "latest") -> bool:
        """Save (asynchronously) at the state's step; False if that step is already saved."""
        manager = self.latest if kind == "latest" else self.best
        step = int(host_state.step)
        if step in manager.all_steps():
            return False  # e.g. interrupted again right after resuming: nothing new
        items = {name: ocp.args.StandardSave(tree) for name, tree in _split(host_state).items()}
        items["progress"] = ocp.args.JsonSave(progress)
        items["model"] = ocp.args.JsonSave(model_info)
        manager.save(step, args=ocp.args.Composite(**items))
        return True

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def restore_latest(self, target: TrainState) -> tuple[TrainState, dict] | None:
        """The newest checkpoint as (numpy state, progress), or None if there is none.

        `target` (a state of the same structure, e.g. freshly initialised) gives the tree
        structure: without it orbax returns optax's named tuples as lists.
        """
        step = self.latest.latest_step()
        if step is None:
            return None
        host_target = jax.tree.map(np.asarray, _split(target))
        items = {name: ocp.args.StandardRestore(tree) for name, tree in host_target.items()}
        items["progress"] = ocp.args.JsonRestore()
        restored = _restore(self.latest, step, items, self.root / "latest" / str(step))
        optimizer = restored["optimizer"]
        state = TrainState(step=optimizer["step"], opt_state=optimizer["opt_state"],
                           **restored["variables"])
        return state, restored["progress"]

    def wait(self) -> None:
        """Block until asynchronous saves are on disk."""
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def _restore(manager: ocp.CheckpointManager, step: int, items: dict, where: Path) -> dict:
    """manager.restore, with any failure reported as the user's (corrupt/incompatible) file."""
    try:
        return manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as err:  # orbax raises many types (ValueError, KeyError, FileNotFound...)
        raise UserError(f"{where}: cannot restore this checkpoint: it is incomplete, corrupt or "
                        f"from an incompatible model/optimizer ({type(err).__name__}: "
                        f"{str(err)[:300]})") from err


def _locate(path: str | Path, which: str) -> tuple[Path, int | None]:
    """(manager directory, step or None for its newest) for a workdir, checkpoints dir,
    manager dir ('latest'/'best') or one step's directory."""
    if which not in KINDS:
        raise UserError(f"which: {which!r} is not one of {', '.join(KINDS)}")
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint or work directory")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / which).is_dir():
        path = path / which
    if (path / "model").is_dir() and path.name.isdigit():  # one step's directory
        return path.parent, int(path.name)
    return path, None


def read_model_info(path: str | Path, which: str = "best") -> tuple[Path, int, dict]:
    """(step directory, step, the 'model' JSON item) of the checkpoint at `path`."""
    directory, step = _locate(path, which)
    manager = _manager(directory, 1, create=False)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise UserError(f"{directory}: holds no checkpoint (looked for '{which}' under {path})")
    where = directory / str(step)
    info = _restore(manager, step, {"model": ocp.args.JsonRestore()}, where)["model"]
    if not isinstance(info, dict) or "architecture" not in info or "class_names" not in info:
        raise UserError(f"{where}: its 'model' item lacks architecture/class_names")
    return where, step, info


def load_model_from_checkpoint(path: str | Path, which: str = "best"):
    """Rebuild a trained model from its checkpoint alone.

    Args:
      path: a workdir, its checkpoints/ directory, checkpoints/<which>, or one step's
        directory inside it.
      which: 'best' (highest validation WA) or 'latest'.
    Returns:
      (architecture dict for ARMResNet18(**architecture), class_names list, variables
      {'params', 'batch_stats', 'gar'} as jax arrays).
    """
    from arm_jax.models import ARMResNet18

    where, step, info = read_model_info(path, which)
    try:
        model = ARMResNet18(**info["architecture"])
    except TypeError as err:
        raise UserError(f"{where}: unknown architecture fields ({err})") from err
    x = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), np.float32)
    abstract = jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x, train=False), x)
    manager = _manager(where.parent, 1, create=False)
    restored = _restore(manager, step, {"variables": ocp.args.StandardRestore(abstract)}, where)
    return dict(info["architecture"]), list(info["class_names"]), restored["variables"]
