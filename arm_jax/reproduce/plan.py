"""From a target and the user's options to training runs: configs, `arm-jax` commands, SLURM arrays.

A run is one row trained with one seed, in its own training workdir `OUT/TARGET/ROW/seedN`,
then evaluated on the test split twice (the paper's batch GAR at test batch 64, and the
running GAR); rows without Sharing Affinity have one model for both and are evaluated once.
Rows whose data set is missing or whose geometry does not fit the image size are left out,
each with the reason. The plan is written to OUT/TARGET/plan.json, which `results` reads.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

from arm_jax.errors import UserError
from arm_jax.reproduce.targets import PAPER_EVAL_BATCH, RECIPE, Row, data_root_help, find_data_dir, rows_of
from arm_jax.training.config import TrainConfig, worker_count_option

GAR_MODES = ("batch", "running")
LAUNCHERS = ("local", "slurm")
DTYPES = ("auto", "float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Options:
    """What the user asked for (`arm-jax reproduce`'s options)."""

    target: str
    data_root: Path
    out: Path
    seeds: tuple[int, ...] = (0,)
    epochs: int = RECIPE["epochs"]
    image_size: int = RECIPE["image_size"]
    batch_size: int = RECIPE["batch_size"]
    pretrained: str = RECIPE["pretrained"]
    dtype: str = "auto"  # bfloat16 where a GPU runs (and under SLURM), float32 on a CPU
    workers: str = "auto"
    rows: tuple[str, ...] = ()
    skip_missing: bool = False
    launcher: str = "local"

    def __post_init__(self):
        for name in ("data_root", "out"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"--seeds: give one or more distinct seeds, got {list(self.seeds)}")
        for name in ("epochs", "image_size", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype: one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.launcher not in LAUNCHERS:
            raise UserError(f"--launcher: one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        worker_count_option(self.workers)  # a UserError naming --workers if it is not auto or a count


def evaluation_path(workdir: Path, gar: str) -> Path:
    """Where a run's test evaluation with this GAR mode is written (`arm-jax evaluate --json`)."""
    return Path(workdir) / f"evaluation-gar-{gar}.json"


@dataclasses.dataclass(frozen=True)
class Run:
    """One row trained with one seed: its TrainConfig (workdir included) and its evaluations."""

    row: Row
    seed: int
    config: TrainConfig

    @property
    def workdir(self) -> Path:
        return Path(self.config.workdir)

    @property
    def gar_modes(self) -> tuple[str, ...]:
        """Without Sharing Affinity there is no GAR: one evaluation serves both columns."""
        return GAR_MODES if self.row.affinity else ("batch",)

    def evaluation_path(self, gar: str) -> Path:
        return evaluation_path(self.workdir, gar)

    def confusion_path(self, gar: str) -> Path:
        return self.workdir / f"confusion-gar-{gar}.png"

    @property
    def name(self) -> str:
        return f"{self.row.target} {self.row.name} seed {self.seed}"


@dataclasses.dataclass(frozen=True)
class Plan:
    options: Options
    dtype: str
    runs: tuple[Run, ...]
    left_out: tuple[tuple[Row, str], ...]  # rows that do not run here, and why

    @property
    def folder(self) -> Path:
        return self.options.out / self.options.target


def resolve_dtype(dtype: str, launcher: str) -> str:
    """'auto': bfloat16 where a GPU/TPU runs it (a SLURM job is assumed to get one), else float32."""
    if dtype != "auto":
        return dtype
    if launcher == "slurm":
        return "bfloat16"
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def build_plan(options: Options) -> Plan:
    """The runs of `options.target`; a missing data set is a UserError unless --skip-missing."""
    rows = rows_of(options.target, options.rows)
    dtype = resolve_dtype(options.dtype, options.launcher)
    left_out, missing = [], {}
    data_dirs = {}
    for row in rows:
        if row.dataset not in data_dirs:
            data_dirs[row.dataset] = find_data_dir(row.dataset, options.data_root)
            if data_dirs[row.dataset] is None:
                missing[row.dataset] = _where_looked(row.dataset, options.data_root)
    if missing and not options.skip_missing:
        lines = "\n".join(f"  {dataset}: looked for {where}" for dataset, where in missing.items())
        raise UserError(f"{options.target}: data set(s) not found under --data-root {options.data_root}:\n{lines}\n"
                        "Put them there as distributed, or pass --skip-missing to run the other rows.")
    runs = []
    for row in rows:
        if data_dirs[row.dataset] is None:
            left_out.append((row, f"data set {row.dataset} not found under {options.data_root}"))
            continue
        if (reason := geometry_problem(row, options.image_size)) is not None:
            left_out.append((row, reason))
            continue
        for seed in options.seeds:
            runs.append(Run(row, seed, _config(row, seed, options, dtype, data_dirs[row.dataset])))
    return Plan(options, dtype, tuple(runs), tuple(left_out))


def _where_looked(dataset: str, root: Path) -> str:
    from arm_jax.reproduce.targets import DATA_LOCATIONS

    return DATA_LOCATIONS[dataset].describe(root)


def geometry_problem(row: Row, image_size: int) -> str | None:
    """Why the row's model cannot be built at this image size (a kernel larger than its map), or None."""
    from arm_jax.models import ARMResNet18

    fields = ("arrangement", "de_albino", "affinity", "raw_kernel")
    architecture = {k: v for k, v in row.settings.items() if k in fields}
    try:
        ARMResNet18(num_classes=7, image_size=image_size, **architecture)
    except ValueError as err:
        return f"does not fit {image_size} px: {err}"
    return None


def _config(row: Row, seed: int, options: Options, dtype: str, data_dir: Path) -> TrainConfig:
    workers = worker_count_option(options.workers)
    return TrainConfig(dataset=row.dataset, data_dir=str(data_dir),
                       workdir=str(options.out / row.target / row.name / f"seed{seed}"),
                       seed=seed, epochs=options.epochs, batch_size=options.batch_size,
                       eval_batch_size=PAPER_EVAL_BATCH, image_size=options.image_size,
                       pretrained=options.pretrained, dtype=dtype, worker_count=workers, quiet=True,
                       **row.settings)


# ---- the same runs as `arm-jax` commands ---------------------------------------------------------

# TrainConfig field -> `arm-jax train` option, where the name is not the field's with dashes.
_OPTION_NAMES = {"worker_count": "--workers", "checkpoint_every_steps": "--checkpoint-every"}
_NEGATED_FLAGS = {"arrangement": "--no-arrangement", "de_albino": "--no-de-albino", "affinity": "--no-affinity"}
_ALWAYS = ("dataset", "data_dir", "workdir", "pretrained", "epochs", "batch_size", "image_size", "seed", "dtype")


def train_command(run: Run, workers: str) -> list[str]:
    """`arm-jax train ...` that trains exactly `run.config` (fields at their default are left out)."""
    defaults = TrainConfig()
    words = ["arm-jax", "train"]
    for field in dataclasses.fields(TrainConfig):
        name, value = field.name, getattr(run.config, field.name)
        if name == "worker_count":
            words += ["--workers", workers]
            continue
        if name not in _ALWAYS and value == getattr(defaults, name):
            continue
        if name in _NEGATED_FLAGS:
            words.append(_NEGATED_FLAGS[name])
        elif isinstance(value, bool):
            if not value:
                raise ValueError(f"{name}=False has no arm-jax train option")
            words.append(f"--{name.replace('_', '-')}")
        else:
            words += [_OPTION_NAMES.get(name, f"--{name.replace('_', '-')}"), str(value)]
    return words


def evaluate_commands(run: Run) -> list[list[str]]:
    """`arm-jax evaluate ...` on the test split, once per GAR mode, writing JSON and PNG into the workdir."""
    c = run.config
    return [["arm-jax", "evaluate", "--checkpoint", c.workdir, "--dataset", c.dataset, "--data-dir", c.data_dir,
             "--split", "test", "--batch-size", str(PAPER_EVAL_BATCH), "--gar", gar, "--seed", str(run.seed),
             "--json", str(run.evaluation_path(gar)), "--png", str(run.confusion_path(gar))]
            for gar in run.gar_modes]


def describe(plan: Plan) -> str:
    """Every row: the commands of each of its runs, or why it is left out (`--dry-run`)."""
    lines = [f"# {plan.options.target}: {len(plan.runs)} run(s), {plan.dtype}"]
    for run in plan.runs:
        lines.append(f"\n# {run.name}")
        lines += [shlex.join(words) for words in [train_command(run, plan.options.workers), *evaluate_commands(run)]]
    for row, reason in plan.left_out:
        lines.append(f"\n# {row.target} {row.name}: left out ({reason})")
    return "\n".join(lines)


def slurm_script(plan: Plan) -> str:
    """An sbatch array: task i trains and evaluates run i with plain `arm-jax` commands."""
    if not plan.runs:
        raise UserError(f"{plan.options.target}: no row to run (all are left out)")
    logs = plan.folder / "slurm-logs"
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name=arm-jax-{plan.options.target}",
             f"#SBATCH --array=0-{len(plan.runs) - 1}",
             "#SBATCH --gpus=1",
             "#SBATCH --cpus-per-task=8",
             f"#SBATCH --output={logs}/%A_%a.out",
             "# One task per row and seed. Set --time and --partition for your cluster; a task that",
             "# is stopped resumes where it was when run again (each row is a training workdir).",
             f"# Afterwards: arm-jax reproduce {plan.options.target} --data-root {plan.options.data_root} "
             f"--out {plan.options.out} --collect (with the same options)",
             "set -euo pipefail",
             'case "$SLURM_ARRAY_TASK_ID" in']
    for index, run in enumerate(plan.runs):
        lines.append(f"  {index})  # {run.name}")
        for words in [train_command(run, plan.options.workers), *evaluate_commands(run)]:
            lines.append(f"    {shlex.join(words)}")
        lines.append("    ;;")
    lines += ["esac", ""]
    return "\n".join(lines)


# ---- plan.json: what results.py reads back ------------------------------------------------------

# Options that choose which runs to make, not what a run computes: plans that differ only in
# these share one results table (running --rows a first, then --rows b, reports both).
_SELECTION = ("seeds", "rows", "skip_missing", "launcher", "workers")


def save_plan(plan: Plan) -> Path:
    """Write OUT/TARGET/plan.json: the options, every run's workdir and the rows left out.

    A plan already there with the same settings (all but `_SELECTION`) is merged into this one,
    so that results keep the rows and seeds an earlier invocation ran.
    """
    plan.folder.mkdir(parents=True, exist_ok=True)
    record = {
        "target": plan.options.target,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(plan.options).items()},
        "dtype": plan.dtype,
        "runs": [{"row": run.row.name, "seed": run.seed, "workdir": str(run.workdir),
                  "gar_modes": list(run.gar_modes)} for run in plan.runs],
        "left_out": [{"row": row.name, "reason": reason} for row, reason in plan.left_out],
    }
    path = plan.folder / "plan.json"
    if path.is_file():
        record = _merged(json.loads(path.read_text()), record)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def _merged(old: dict, new: dict) -> dict:
    """`new` plus the runs and left-out rows of `old`, when both plans compute the same things."""
    settings = lambda record: {k: v for k, v in record["options"].items() if k not in _SELECTION}  # noqa: E731
    if settings(old) != settings(new) or old["dtype"] != new["dtype"]:
        return new
    planned = {run["workdir"] for run in new["runs"]}
    runs = new["runs"] + [run for run in old["runs"] if run["workdir"] not in planned]
    order = {row.name: index for index, row in enumerate(rows_of(new["target"]))}
    runs.sort(key=lambda run: (order[run["row"]], run["seed"]))
    with_runs = {run["row"] for run in runs}
    left_out = {item["row"]: item for item in old["left_out"] + new["left_out"] if item["row"] not in with_runs}
    options = {**new["options"], "seeds": sorted({run["seed"] for run in runs} | set(new["options"]["seeds"]))}
    return {**new, "options": options, "runs": runs, "left_out": list(left_out.values())}


def data_root_option_help() -> str:
    return "Folder holding the data sets under the names they unpack to: " + data_root_help() + "."
