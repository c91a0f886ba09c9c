"""The paper's experiments as rows: what each row trains, on which data set, and what the paper reports.

The numbers are those of the paper's first version (shared/REFERENCE.md lists them; later
versions moved RAF-DB to 90.42 and AffectNet to 65.2). Every row follows the released recipe
(`RECIPE`, the TrainConfig defaults besides these) and changes only what its experiment varies.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from arm_jax.data.readers import affectnet, fer2013, raf_db
from arm_jax.errors import UserError

PAPER = "Shi & Zhu, version 1 (shared/REFERENCE.md)"
TARGETS = ("table3", "table2", "fig6")
TITLES = {
    "table3": "Table 3: ARM-ResNet-18 on RAF-DB, FER2013, AffectNet 7 and 8 classes",
    "table2": "Table 2: the FA / DA / SA blocks on RAF-DB",
    "fig6": "Figure 6: the De-albino kernel size k on the raw 7x7 map (stride 1, no padding), RAF-DB",
}

# The paper's setting for every row (section 4.3): what a scaled-down run is measured against.
RECIPE = {"epochs": 70, "batch_size": 256, "image_size": 224, "pretrained": "imagenet"}
PAPER_EVAL_BATCH = 64  # the released test script's batch: the batch GAR is taken over it
FIG6_KERNELS = tuple(range(1, 8))


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of a table (or point of a figure): a training config and the paper's numbers."""

    target: str
    name: str  # also the row's folder under --out/TARGET
    label: str
    dataset: str
    overrides: tuple[tuple[str, object], ...] = ()  # TrainConfig fields this row sets
    paper_wa: float | None = None
    paper_ua: float | None = None

    @property
    def settings(self) -> dict:
        return dict(self.overrides)

    @property
    def affinity(self) -> bool:
        """Whether the row has Sharing Affinity (without it, batch and running GAR are one model)."""
        return bool(self.settings.get("affinity", True))


def _table2_row(name: str, fa: bool, da: bool, sa: bool, wa: float) -> Row:
    label = " / ".join(("FA" if fa else "-", "DA" if da else "-", "SA" if sa else "-"))
    return Row("table2", name, label, "raf_db",
               (("arrangement", fa), ("de_albino", da), ("affinity", sa)), paper_wa=wa)


ROWS: dict[str, tuple[Row, ...]] = {
    "table3": (
        Row("table3", "raf_db", "RAF-DB", "raf_db", paper_wa=90.55, paper_ua=82.29),
        Row("table3", "fer2013", "FER2013", "fer2013", paper_wa=71.38),
        # Section 4.4: minimal random resampling, lr decay 0.78 (TrainConfig's default with mrr).
        Row("table3", "affectnet7", "AffectNet 7 cls", "affectnet7", (("sampler", "mrr"),), paper_wa=64.49),
        Row("table3", "affectnet8", "AffectNet 8 cls", "affectnet8", (("sampler", "mrr"),), paper_wa=59.75),
    ),
    "table2": (
        _table2_row("none", False, False, False, 84.68),
        _table2_row("da", False, True, False, 87.32),
        _table2_row("sa", False, False, True, 87.03),
        _table2_row("fa-da", True, True, False, 88.54),
        _table2_row("fa-sa", True, False, True, 87.40),
        _table2_row("da-sa", False, True, True, 87.38),
        _table2_row("fa-da-sa", True, True, True, 90.55),
    ),
    # Section 4.5: De-albino in place of global pooling on the raw map, stride 1, no FA, no SA.
    # The paper gives these only as a plotted curve, so no number stands beside them.
    "fig6": tuple(
        Row("fig6", f"k{k}", f"k = {k}", "raf_db",
            (("arrangement", False), ("de_albino", True), ("affinity", False), ("raw_kernel", k)))
        for k in FIG6_KERNELS),
}


@dataclasses.dataclass(frozen=True)
class DataLocation:
    """Where a data set sits under --data-root: folder names tried in order, and a file proving it."""

    folders: tuple[str, ...]
    markers: tuple[str, ...]  # any one of these inside the folder

    def describe(self, root: Path) -> str:
        return "; ".join(" or ".join(str(root / folder / marker) for marker in self.markers)
                         for folder in self.folders)


# The folder names the data sets unpack to as distributed (RAF-DB's basic subset unpacks to
# basic/, Kaggle's fer2013.tar.gz to fer2013/; AffectNet's archives go into one folder).
DATA_LOCATIONS = {
    "raf_db": DataLocation(("RAF-DB/basic", "basic", "RAF-DB"), (str(raf_db.LABEL_FILE),)),
    "fer2013": DataLocation(("fer2013", "FER2013"), fer2013.CSV_NAMES),
    "affectnet7": DataLocation(("AffectNet", "affectnet"),
                               (str(affectnet.LIST_DIR), affectnet.NPY_DIR["train"])),
    "affectnet8": DataLocation(("AffectNet", "affectnet"),
                               (str(affectnet.LIST_DIR), affectnet.NPY_DIR["train"])),
}


def find_data_dir(dataset: str, root: Path) -> Path | None:
    """The data set's folder under `root` (the first candidate holding a marker), or None."""
    location = DATA_LOCATIONS[dataset]
    for folder in location.folders:
        if any((root / folder / marker).exists() for marker in location.markers):
            return root / folder
    return None


def data_root_help() -> str:
    """The folder names looked for, for --help."""
    by_location: dict[DataLocation, list[str]] = {}
    for dataset, location in DATA_LOCATIONS.items():
        by_location.setdefault(location, []).append(dataset)
    return "; ".join(f"{', '.join(datasets)}: {' or '.join(location.folders)} (holding {' or '.join(location.markers)})"
                     for location, datasets in by_location.items())


def rows_of(target: str, names: tuple[str, ...] | None = None) -> tuple[Row, ...]:
    """The target's rows, or the named ones among them (a UserError names unknown ones)."""
    if target not in ROWS:
        raise UserError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    rows = ROWS[target]
    if not names:
        return rows
    known = {row.name for row in rows}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UserError(f"--rows: {', '.join(unknown)} not in {target}; its rows are {', '.join(sorted(known))}")
    return tuple(row for row in rows if row.name in names)
