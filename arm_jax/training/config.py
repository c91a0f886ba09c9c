"""The one training configuration: every default lives here, nowhere else."""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from pathlib import Path

from arm_jax.errors import UserError

# Enumerated options and the values they accept (the CLI builds its click.Choice from these).
CHOICES: dict[str, tuple[str, ...]] = {
    "sampler": ("shuffle", "mrr"),
    "dtype": ("float32", "bfloat16"),
    "parallel": ("none", "pmap", "jit"),
    "gar_mode": ("batch", "running"),
    "eval_split": ("val", "test"),
}
MAX_AUTO_WORKERS = 16  # beyond this, worker start-up costs more than a GPU step needs


def worker_count_option(value: str | int) -> int:
    """`--workers`: a count >= 0, or 'auto': one worker per core beside the main process (at least 1)."""
    if str(value).strip().lower() == "auto":
        return max(1, min(MAX_AUTO_WORKERS, (os.cpu_count() or 2) - 1))
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise UserError(f"option --workers: expected 'auto' or a count >= 0, got {value!r}")
    return count

# Fields that may differ between a run and its resumption: more epochs, and knobs that do not
# change what is computed (logging, worker processes, checkpoint cadence, where the workdir is:
# a run moved to a disk with space resumes).
RESUMABLE_CHANGES = frozenset(
    {"epochs", "worker_count", "tensorboard", "quiet", "checkpoint_every_steps", "keep_checkpoints",
     "workdir"}
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; defaults follow the authors' RAF-DB recipe."""

    # Data.
    dataset: str = "synthetic"  # works on a fresh machine: no files, no download
    data_dir: str | None = None
    eval_split: str = "val"
    skip_bad: bool = False
    max_train_examples: int | None = None  # train on N examples drawn with the seed (quick runs, tests)
    max_eval_examples: int | None = None
    image_size: int = 224
    sampler: str = "shuffle"
    worker_count: int = 0
    # Model.
    pretrained: str = "none"  # a torchvision resnet18 .pth/.safetensors, or 'none'
    arrangement: bool = True
    de_albino: bool = True
    affinity: bool = True
    raw_kernel: int = 3  # De-albino's kernel on the raw map when arrangement is off (Figure 6's k)
    dropout: float = 0.0
    gar_mode: str = "batch"  # the released code's batch GAR, in training and evaluation
    # Optimisation (torch.optim.Adam(weight_decay=1e-4) + ExponentialLR stepped per epoch).
    epochs: int = 70
    batch_size: int = 256  # global, over all devices and hosts
    eval_batch_size: int = 64
    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-4
    gamma: float | None = None  # None: 0.9, or 0.78 with the MRR sampler (paper section 4.4)
    seed: int = 0
    # Execution.
    dtype: str = "float32"  # 'bfloat16': compute in bf16, parameters and Adam state float32
    parallel: str = "jit"  # 'jit': batch sharded over a mesh of all devices (one device: plain jit)
    distributed: bool = False  # call jax.distributed.initialize() (multi-host)
    # Output.
    workdir: str = "runs/arm"
    checkpoint_every_steps: int = 500  # also at every epoch end; 0 = epoch ends only
    keep_checkpoints: int = 3
    tensorboard: bool = False
    quiet: bool = False  # no progress bar (it is also off when stderr is not a terminal)

    def __post_init__(self) -> None:
        for name in ("data_dir", "workdir", "pretrained"):  # accept pathlib.Path, store str
            if isinstance(getattr(self, name), Path):
                object.__setattr__(self, name, str(getattr(self, name)))
        _validate(self)

    @property
    def lr_gamma(self) -> float:
        """The per-epoch lr decay actually used."""
        if self.gamma is not None:
            return self.gamma
        return 0.78 if self.sampler == "mrr" else 0.9

    def replace(self, **overrides) -> TrainConfig:
        """A copy with `overrides` applied; unknown keys and bad values raise UserError."""
        return from_overrides(overrides, base=self)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def from_overrides(overrides: dict, base: TrainConfig | None = None) -> TrainConfig:
    """Build a TrainConfig from `base` (default: the defaults) and a dict of overrides."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise UserError(
            f"unknown training option(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}"
        )
    return dataclasses.replace(base or TrainConfig(), **overrides)


def _validate(config: TrainConfig) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if not _has_type(value, hints[field.name]):
            raise UserError(f"option {field.name}: {value!r} is not a valid {hints[field.name]}")
        if field.name in CHOICES and value not in CHOICES[field.name]:
            raise UserError(
                f"option {field.name}: {value!r} is not one of {', '.join(CHOICES[field.name])}"
            )
    positive = ("epochs", "batch_size", "eval_batch_size", "image_size", "keep_checkpoints", "raw_kernel")
    for name in positive:
        if getattr(config, name) < 1:
            raise UserError(f"option {name}: must be at least 1, got {getattr(config, name)}")
    if config.dataset == "synthetic" and config.data_dir is not None:
        raise UserError(f"option data_dir: {config.data_dir} given, but the dataset is 'synthetic', which "
                        "reads no files; name the data set with --dataset")
    for name in ("max_train_examples", "max_eval_examples"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise UserError(f"option {name}: must be at least 1 (or unset)")
    if config.lr <= 0 or config.eps <= 0 or config.weight_decay < 0:
        raise UserError("options lr and eps must be > 0 and weight_decay >= 0")
    if not 0 <= config.b1 < 1 or not 0 <= config.b2 < 1:
        raise UserError("options b1 and b2 must lie in [0, 1)")
    if config.gamma is not None and not 0 < config.gamma <= 1:
        raise UserError(f"option gamma: must lie in (0, 1], got {config.gamma}")
    if not 0 <= config.dropout < 1:
        raise UserError(f"option dropout: must lie in [0, 1), got {config.dropout}")
    if config.worker_count < 0 or config.checkpoint_every_steps < 0:
        raise UserError("options worker_count and checkpoint_every_steps must be >= 0")


def _has_type(value, hint) -> bool:
    """isinstance for the few annotations used above (int, float, str, bool, X | None)."""
    args = typing.get_args(hint)
    if args:  # a union such as `int | None`
        return any(_has_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def save_config(config: TrainConfig, workdir: Path) -> None:
    """Write `<workdir>/config.json`."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json() + "\n")


def check_resumable(config: TrainConfig, workdir: Path) -> None:
    """Refuse to resume a run in `workdir` under a config that changes what it computes.

    Only the fields in RESUMABLE_CHANGES (more epochs, logging, worker count, checkpoint
    cadence) may differ; anything else would silently mix two runs in one workdir.
    """
    path = workdir / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read the saved training config ({err})") from err
    current = dataclasses.asdict(config)
    # A field added to TrainConfig after the run was saved ran at its default value.
    defaults = dataclasses.asdict(TrainConfig())
    changed = sorted(
        k for k in set(saved) | set(current)
        if k not in RESUMABLE_CHANGES and saved.get(k, defaults.get(k)) != current.get(k)
    )
    if changed:
        details = "; ".join(f"{k}: saved {saved.get(k, defaults.get(k))!r}, now {current.get(k)!r}" for k in changed)
        raise UserError(
            f"{workdir} holds a run with a different config ({details}); use a new --workdir, "
            f"or only increase --epochs to continue it"
        )
