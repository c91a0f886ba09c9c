"""The paper's figures from collected results: Figure 5 (confusion matrices), Figure 6 (WA against k),
and Table 2 as bars beside the paper's."""

from __future__ import annotations

from pathlib import Path

from arm_jax.reproduce import plots

# Figure 6's reference lines: Table 2's rows without and with De-albino (no FA, no SA).
FIG6_REFERENCES = (("paper, no DA (Table 2): 84.68", 84.68), ("paper, DA (Table 2, k not stated): 87.32", 87.32))


def _scaled(title: str, section: dict) -> str:
    """The title, marked when the run was scaled down from the paper's setting."""
    return title + (" [SCALED DOWN]" if section["scaled_down"] else "")


def figure5(section: dict, path: Path) -> Path:
    """The table3 rows' test confusion matrices side by side, as the paper's Figure 5."""
    panels = []
    for row in section["rows"]:
        if row.get("confusion_batch"):
            seeds = len(row["seeds"])
            title = _scaled(f"{row['label']}: WA {row['wa_batch']['mean']:.2f}% ({seeds} seed{'s' * (seeds > 1)})",
                            section)
            panels.append(plots.confusion_panel(row["confusion_batch"], row["class_names"], title))
        else:
            panels.append(_note_panel(row["label"], row["status"]))
    return plots.save(plots.side_by_side(panels, columns=2), path)


def figure6(section: dict, path: Path) -> Path:
    """Test WA (batch GAR) against the De-albino kernel size, mean with a +-sd band, and the paper's anchors."""
    points = [(int(row["row"].removeprefix("k")), row["wa_batch"]) for row in section["rows"]
              if row["wa_batch"]["mean"] is not None]
    x = tuple(k for k, _ in points)
    y = tuple(v["mean"] for _, v in points)
    sd = tuple(v["sd"] or 0.0 for _, v in points)
    series = [plots.Series("measured (mean ± sd over seeds)", x, y,
                           tuple(a - b for a, b in zip(y, sd)), tuple(a + b for a, b in zip(y, sd)))]
    left_out = [row["row"] for row in section["rows"] if row["status"] != "done"]
    title = _scaled("Figure 6: De-albino kernel size k, RAF-DB", section)
    if left_out:
        title += f" (not run: {', '.join(left_out)})"
    image, _ = plots.line_panel(series, title=title, x_label="k (stride 1, no padding, on the raw map)",
                                y_label="test WA %", references=FIG6_REFERENCES)
    return plots.save(image, path)


def table2_figure(section: dict, path: Path) -> Path:
    """Each Table 2 row: the paper's WA beside the measured one (batch GAR, mean ± sd)."""
    rows = section["rows"]
    bars = [("paper", [row["paper_wa"] for row in rows], [None] * len(rows)),
            ("measured, batch GAR", [row["wa_batch"]["mean"] for row in rows], [row["wa_batch"]["sd"] for row in rows]),
            ("measured, running GAR", [row["wa_running"]["mean"] for row in rows],
             [row["wa_running"]["sd"] for row in rows])]
    image, _ = plots.bar_panel([row["label"] for row in rows], bars,
                               title=_scaled("Table 2: FA / DA / SA on RAF-DB", section),
                               y_label="test WA %", y_range=(0.0, 100.0))
    return plots.save(image, path)


def draw_figures(results: dict, out: Path) -> list[Path]:
    """Whichever figures the collected targets give."""
    drawn = []
    targets = results["targets"]
    if "table3" in targets:
        drawn.append(figure5(targets["table3"], out / "figure5.png"))
    if "table2" in targets:
        drawn.append(table2_figure(targets["table2"], out / "table2.png"))
    if "fig6" in targets:
        drawn.append(figure6(targets["fig6"], out / "figure6.png"))
    return drawn


def _note_panel(label: str, status: str):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (420, 120), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 8), label, fill="black", font=plots.font(13))
    draw.text((8, 40), status[:60], fill=plots.GREY, font=plots.font(11))
    return image

