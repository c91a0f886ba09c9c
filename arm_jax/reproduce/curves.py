"""Whole training runs of two frameworks side by side: per-epoch curves over seeds, and a verdict.

Each framework gives, per seed, one record per epoch with `train_loss`, `train_acc` and
`val_wa`. The verdict is "together" when, at every epoch and for every metric, the difference
of the two means lies within max(floor, t x its standard error), and "apart" otherwise, naming
the epochs and metrics. t x standard error is Student's two-sample test at the 99% level: if
both frameworks train the same recipe, their seeds come from one distribution, so the seeds'
variances pool (2 + 2 seeds leave 2 degrees of freedom, t = 9.9; 3 + 3 leave 4, t = 4.6); an
accuracy's variance is at least the binomial p (1 - p) / images (then known: t = 2.576). The
floor is the smallest difference that matters in practice: 10% of the loss, 5 accuracy points.
"""

from __future__ import annotations

import math
import statistics

METRICS = ("train_loss", "train_acc", "val_wa")
LABELS = {"train_loss": "train loss (mean per image)", "train_acc": "train accuracy", "val_wa": "validation accuracy"}
# Student's t, two-sided 99% (t at 0.995), by degrees of freedom; beyond the table, the normal 2.576.
T_995 = {1: 63.657, 2: 9.925, 3: 5.841, 4: 4.604, 5: 4.032, 6: 3.707, 7: 3.499, 8: 3.355, 9: 3.250, 10: 3.169,
         12: 3.055, 15: 2.947, 20: 2.845, 30: 2.750, 60: 2.660, 120: 2.617}
Z_995 = 2.576
RELATIVE_FLOOR = {"train_loss": 0.10}  # of the two means' average
ABSOLUTE_FLOOR = {"train_loss": 0.02, "train_acc": 0.05, "val_wa": 0.05}


def per_epoch(seeds: list[list[dict]], metric: str) -> list[dict]:
    """For each epoch that every seed reached: mean, sd (None below two seeds), min, max, values."""
    epochs = min(len(records) for records in seeds)
    out = []
    for epoch in range(epochs):
        values = [records[epoch][metric] for records in seeds]
        out.append({"epoch": epoch + 1, "mean": statistics.fmean(values),
                    "sd": statistics.stdev(values) if len(values) >= 2 else None,
                    "min": min(values), "max": max(values), "values": values})
    return out


def summarise(runs: dict[str, list[list[dict]]]) -> dict:
    """{framework: {metric: per_epoch(...)}} for {framework: [per-seed epoch records]}."""
    return {name: {metric: per_epoch(seeds, metric) for metric in METRICS} for name, seeds in runs.items()}


def t_quantile(df: float) -> float:
    """t at 0.995 for `df` degrees of freedom, rounded down to the table (wider: conservative)."""
    if math.isinf(df):
        return Z_995
    below = [d for d in T_995 if d <= df]
    return T_995[max(below)] if below else T_995[1]


def allowed_difference(metric: str, a: dict, b: dict, counts: dict | None = None) -> float:
    """The largest difference of means that still counts as the same training (module docstring).

    counts: images behind each accuracy ({'train_acc': per epoch, 'val_wa': validation images}).
    """
    na, nb = len(a["values"]), len(b["values"])
    df = na + nb - 2
    variance = ((na - 1) * (a["sd"] or 0.0) ** 2 + (nb - 1) * (b["sd"] or 0.0) ** 2) / df if df else 0.0
    t = t_quantile(df) if df else Z_995
    count = (counts or {}).get(metric)
    if count and metric != "train_loss":
        p = min(max((a["mean"] + b["mean"]) / 2, 0.0), 1.0)
        if p * (1 - p) / count >= variance:
            variance, t = p * (1 - p) / count, Z_995
    error = math.sqrt(variance * (1 / na + 1 / nb))
    floor = max(ABSOLUTE_FLOOR[metric], RELATIVE_FLOOR.get(metric, 0.0) * (abs(a["mean"]) + abs(b["mean"])) / 2)
    return max(floor, t * error)


def verdict(summary: dict, first: str, second: str, counts: dict | None = None) -> dict:
    """'together' or 'apart' for two frameworks of `summary`, with every epoch's comparison."""
    checks, apart = [], []
    for metric in METRICS:
        for a, b in zip(summary[first][metric], summary[second][metric]):
            difference = a["mean"] - b["mean"]
            allowed = allowed_difference(metric, a, b, counts)
            checks.append({"metric": metric, "epoch": a["epoch"], "difference": difference, "allowed": allowed})
            if abs(difference) > allowed:
                apart.append(f"{metric} at epoch {a['epoch']}: {a['mean']:.4f} vs {b['mean']:.4f} "
                             f"(difference {difference:+.4f}, allowed {allowed:.4f})")
    status = "apart" if apart else "together"
    if apart:
        line = f"apart: {first} and {second} differ in " + "; ".join(apart)
    else:
        worst = max(checks, key=lambda c: abs(c["difference"]) / c["allowed"])
        line = (f"together: every epoch's train loss, train accuracy and validation accuracy of {first} and "
                f"{second} agree within max(floor, t x standard error); closest to the limit: "
                f"{worst['metric']} at epoch {worst['epoch']} ({worst['difference']:+.4f}, "
                f"allowed {worst['allowed']:.4f})")
    return {"status": status, "line": line, "checks": checks,
            "rule": {"test": "Student's two-sample t, pooled seeds, two-sided 99%", "relative_floor": RELATIVE_FLOOR,
                     "absolute_floor": ABSOLUTE_FLOOR}}


def curves_figure(summary: dict, path, title: str):
    """One panel per metric: each framework's mean over seeds, with its min-max band."""
    from arm_jax.reproduce import plots

    panels = []
    for metric in METRICS:
        series = []
        for index, (name, metrics) in enumerate(summary.items()):
            points = metrics[metric]
            series.append(plots.Series(
                f"{name} ({len(points[0]['values']) if points else 0} seeds, band: min-max)",
                tuple(p["epoch"] for p in points), tuple(p["mean"] for p in points),
                tuple(p["min"] for p in points), tuple(p["max"] for p in points),
                plots.PALETTE[index % len(plots.PALETTE)], dashed=index == 1))
        image, _ = plots.line_panel(series, title=LABELS[metric],
                                    x_label="epoch", y_label="", size=(520, 380),
                                    tick_format=".3g")
        panels.append(image)
    return plots.save(plots.titled(plots.side_by_side(panels), title), path)
