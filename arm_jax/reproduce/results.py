"""Gather what the runs' workdirs hold into results.json and results.md, beside the paper's numbers.

Reads every OUT/TARGET/plan.json, so runs made elsewhere (a SLURM array) are collected the
same way as local ones. Accuracies are in percent; a row's value is the mean over its finished
seeds, with the sample standard deviation from two seeds on.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from arm_jax.reproduce.runner import RUN_INFO, finished_evaluations, metrics_records
from arm_jax.reproduce.targets import PAPER, PAPER_EVAL_BATCH, RECIPE, ROWS, TARGETS, TITLES

METRICS = ("wa_batch", "ua_batch", "wa_running", "ua_running", "val_wa_last")


def spread(values: list[float]) -> dict:
    """mean, sample sd (None below two values), n and the values themselves."""
    return {"mean": statistics.fmean(values) if values else None,
            "sd": statistics.stdev(values) if len(values) >= 2 else None,
            "n": len(values), "values": values}


def scaled_down(options: dict) -> list[str]:
    """How these options differ from the paper's setting (empty: the paper's recipe)."""
    names = {"epochs": "epochs", "image_size": "image size (px)", "batch_size": "batch", "pretrained": "backbone"}
    return [f"{names[k]} {options[k]} (paper {RECIPE[k]})" for k in names if options[k] != RECIPE[k]]


def _seed_result(run: dict, epochs: int) -> dict | None:
    """One finished run's numbers, or None while it is not finished."""
    workdir = Path(run["workdir"])
    evaluations = finished_evaluations(workdir, epochs, run["gar_modes"])
    if evaluations is None:
        return None
    batch = evaluations["batch"]
    running = evaluations.get("running", batch)  # no SA: one model for both columns
    records = metrics_records(workdir)
    info_path = workdir / RUN_INFO
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    best = max(records, key=lambda r: r["val_wa"])
    return {"seed": run["seed"], "wa_batch": 100 * batch["wa"], "ua_batch": 100 * batch["ua"],
            "wa_running": 100 * running["wa"], "ua_running": 100 * running["ua"],
            "val_wa_last": 100 * records[-1]["val_wa"], "best_epoch": best["epoch"],
            "images_per_s": records[-1].get("images_per_s"),
            "device": info.get("device", "not recorded (run outside arm-jax reproduce)"),
            "class_names": batch["class_names"], "confusion_batch": batch["confusion"]}


def collect_target(plan: dict) -> dict:
    """One target's rows, in the paper's order, each with its status and numbers."""
    options, target = plan["options"], plan["target"]
    runs_of, left_out = {}, {item["row"]: item["reason"] for item in plan["left_out"]}
    for run in plan["runs"]:
        runs_of.setdefault(run["row"], []).append(run)
    rows = []
    for row in ROWS[target]:
        entry = {"row": row.name, "label": row.label, "dataset": row.dataset, "sa": row.affinity,
                 "paper_wa": row.paper_wa, "paper_ua": row.paper_ua}
        seeds = [r for run in runs_of.get(row.name, []) if (r := _seed_result(run, options["epochs"]))]
        entry["seeds"] = seeds
        for metric in METRICS:
            entry[metric] = spread([s[metric] for s in seeds])
        wanted = len(runs_of.get(row.name, []))
        if row.name in left_out:
            entry["status"] = f"left out: {left_out[row.name]}"
        elif not wanted:
            entry["status"] = "not selected (--rows)"
        elif len(seeds) == wanted:
            entry["status"] = "done"
        else:
            entry["status"] = f"{len(seeds)} of {wanted} seeds finished"
        if seeds:
            entry["confusion_batch"] = [[sum(s["confusion_batch"][i][j] for s in seeds)
                                         for j in range(len(seeds[0]["confusion_batch"][0]))]
                                        for i in range(len(seeds[0]["confusion_batch"]))]
            entry["class_names"] = seeds[0]["class_names"]
        rows.append(entry)
    devices = sorted({s["device"] for row in rows for s in row["seeds"]})
    return {"target": target, "title": TITLES[target], "settings": {**options, "dtype": plan["dtype"]},
            "devices": devices, "scaled_down": scaled_down(options), "paper_settings": RECIPE, "rows": rows}


def collect(out: Path) -> dict:
    """Every target that has a plan.json under `out`."""
    targets = {}
    for target in TARGETS:
        path = Path(out) / target / "plan.json"
        if path.is_file():
            targets[target] = collect_target(json.loads(path.read_text()))
    return {"paper": PAPER, "units": "percent", "eval_batch": PAPER_EVAL_BATCH,
            "collected": time.strftime("%Y-%m-%d %H:%M:%S"), "targets": targets}


def _cell(value: dict) -> str:
    if value["mean"] is None:
        return "-"
    if value["sd"] is None:
        return f"{value['mean']:.2f}"
    return f"{value['mean']:.2f} ± {value['sd']:.2f}"


def _paper(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


INTRO = (
    "Accuracies in percent on each data set's test split; a cell is the mean ± standard deviation over the "
    "finished seeds (no ± with one seed). **batch GAR**: the paper's evaluation, Sharing Affinity's mean taken "
    "over each test batch of {batch} shuffled images; **running GAR**: arm-jax's batch-independent evaluation "
    "(rows without SA have one model for both). Each run is evaluated at its best epoch by validation WA; "
    "RAF-DB and AffectNet validate on their test split, as the released code does (FER2013 validates on "
    "PublicTest and is tested on PrivateTest). **last val WA**: the validation WA of the last epoch.")
FIGURES = {"table3": ("figure5.png", "Figure 5: confusion matrices (batch GAR, summed over seeds)"),
           "table2": ("table2.png", "Table 2, measured beside the paper"),
           "fig6": ("figure6.png", "Figure 6: test WA against k")}


def render_markdown(results: dict) -> str:
    """results.md: one section per target, the paper's numbers beside the measured ones."""
    lines = ["# arm-jax reproduce: results", "",
             f"Paper: {results['paper']}. Collected {results['collected']}.", "",
             INTRO.format(batch=results["eval_batch"])]
    for target, section in results["targets"].items():
        settings = section["settings"]
        lines += ["", f"## {section['title']}", ""]
        if section["scaled_down"]:
            lines += [f"> **Scaled down, not comparable with the paper**: {'; '.join(section['scaled_down'])}.", ""]
        lines.append(f"Ran with {settings['epochs']} epoch(s), {settings['image_size']} px, batch "
                     f"{settings['batch_size']}, backbone `{settings['pretrained']}`, {settings['dtype']}, seeds "
                     f"{' '.join(map(str, settings['seeds']))}, on {', '.join(section['devices']) or '-'}.")
        ua_paper = any(row["paper_ua"] is not None for row in section["rows"])
        header = ["row", "what", "paper WA"] + (["paper UA"] if ua_paper else []) + [
            "WA, batch GAR", "WA, running GAR", "UA, batch GAR", "UA, running GAR", "last val WA", "status"]
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in section["rows"]:
            running = [_cell(row["wa_running"]), _cell(row["ua_running"])]
            if not row["sa"] and row["seeds"]:
                running = [f"{cell} (no SA)" for cell in running]
            cells = [row["row"], row["label"], _paper(row["paper_wa"])] + (
                [_paper(row["paper_ua"])] if ua_paper else []) + [
                _cell(row["wa_batch"]), running[0], _cell(row["ua_batch"]), running[1],
                _cell(row["val_wa_last"]), row["status"]]
            lines.append("| " + " | ".join(cells) + " |")
        if target == "fig6":
            lines += ["", "The paper plots Figure 6 without printing its values, so no number stands beside "
                          "these rows; its Table 2 gives 84.68 without De-albino (global pooling) and 87.32 "
                          "with it (kernel not stated), drawn as reference lines in figure6.png."]
        name, caption = FIGURES[target]
        lines += ["", f"![{caption}]({name})"]
    return "\n".join(lines) + "\n"


def write_results(out: Path) -> dict:
    """Collect, then write results.json, results.md and the figures into `out`."""
    from arm_jax.reproduce.figures import draw_figures

    results = collect(out)
    (Path(out) / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    draw_figures(results, Path(out))
    (Path(out) / "results.md").write_text(render_markdown(results))
    return results
