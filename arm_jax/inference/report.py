"""Presenting results: text tables for the terminal and the confusion matrix as a PNG."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def format_percent(value: float | None) -> str:
    return "  n/a" if value is None or np.isnan(value) else f"{100 * value:5.2f}"


def evaluation_table(report) -> str:
    """WA/UA, per-class accuracy and the confusion matrix (rows: true class) as aligned text."""
    names = list(report.class_names)
    columns = list(getattr(report, "column_names", names))
    width = max(8, max(len(n) for n in columns) + 1)
    order = "shuffled" if report.shuffled else "in file order"
    unpredictable = getattr(report, "unpredictable", {}) or {}
    ua_over = ("" if not unpredictable else
               f" over the {len(report.ua_classes)} classes both have")
    lines = [
        f"{report.dataset}/{report.split}: {report.count} images, GAR {report.gar}, "
        f"batch size {report.batch_size} ({order}, seed {report.seed})",
        f"WA (accuracy)       {format_percent(report.wa)} %",
        f"UA (mean class acc) {format_percent(report.ua)} %{ua_over}",
        "",
        "per-class accuracy:",
    ]
    lines += [f"  {name:<{width}} {format_percent(report.per_class[name])} %"
              for name in names if name in report.per_class]
    lines += [f"  {name:<{width}}   --   ({count} images; the model has no such class)"
              for name, count in unpredictable.items()]
    lines += ["", "confusion matrix (rows: true class, columns: predicted):",
              " " * (width + 2) + "".join(f"{name[:width - 1]:>{width}}" for name in columns)]
    for name, row in zip(names, report.confusion):
        lines.append(f"  {name:<{width}}" + "".join(f"{count:>{width}d}" for count in row))
    lines += [f"note: {note}" for note in getattr(report, "notes", ())]
    return "\n".join(lines)


def confusion_png(matrix: np.ndarray, class_names: list[str], path: str | Path, title: str = "",
                  column_names: list[str] | None = None) -> None:
    """Draw the row-normalised confusion matrix with counts and class names (PIL only).

    Rows are class_names; columns are column_names (default: the same classes).
    """
    matrix = np.asarray(matrix)
    column_names = list(class_names) if column_names is None else list(column_names)
    n, m = len(class_names), len(column_names)
    cell, margin_left, margin_top = 64, 120, 90
    size = (margin_left + m * cell + 20, margin_top + n * cell + 20)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.nan_to_num(matrix / matrix.sum(axis=1, keepdims=True))
    draw.text((10, 10), title or "confusion matrix", fill="black", font=font)
    draw.text((margin_left, 30), "predicted ->", fill="black", font=font)
    draw.text((10, margin_top - 20), "true", fill="black", font=font)
    for j, name in enumerate(column_names):
        draw.text((margin_left + j * cell + 4, margin_top - 40 + (j % 2) * 14), name[:10], fill="black", font=font)
    for i, name in enumerate(class_names):
        draw.text((10, margin_top + i * cell + cell // 2 - 5), name[:16], fill="black", font=font)
        for j in range(m):
            shade = int(255 * (1 - fraction[i, j]))
            box = (margin_left + j * cell, margin_top + i * cell, margin_left + (j + 1) * cell - 1, margin_top + (i + 1) * cell - 1)
            draw.rectangle(box, fill=(shade, shade, 255), outline="gray")
            text_colour = "white" if fraction[i, j] > 0.5 else "black"
            draw.text((box[0] + 6, box[1] + 16), f"{int(matrix[i, j])}", fill=text_colour, font=font)
            draw.text((box[0] + 6, box[1] + 32), f"{100 * fraction[i, j]:.0f}%", fill=text_colour, font=font)
    image.save(path)


def prediction_table(predictions) -> str:
    """One line per image: file, predicted class, its probability."""
    if not predictions:
        return ""
    width = max(len(p.path) for p in predictions)
    lines = [f"{'image':<{width}}  {'expression':<12} probability"]
    lines += [f"{p.path:<{width}}  {p.class_name:<12} {p.probabilities[p.class_name]:.3f}" for p in predictions]
    return "\n".join(lines)
