"""scripts/compare_training.py: the released recipe in PyTorch against arm-jax over whole training runs.

Fast: the verdict rule on known curves, and the PyTorch recipe's preprocessing and augmentations
against arm-jax's (a second implementation of each). Slow: a short run of both frameworks (3
epochs, 72 px) on font digits written as a FER2013 CSV writes its curves and says "together";
with arm-jax's lr decay deliberately stepped per batch the same run says "apart".
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from arm_jax.reproduce import curves

REPO = Path(__file__).resolve().parents[1]


def _epochs(losses, accuracies, vals) -> list[dict]:
    return [{"epoch": i + 1, "train_loss": l, "train_acc": a, "val_wa": v}
            for i, (l, a, v) in enumerate(zip(losses, accuracies, vals))]


# ---- the verdict rule --------------------------------------------------------------------------

def test_verdict_is_together_within_the_spread_and_apart_beyond_it():
    jax_runs = [_epochs([1.5, 0.6], [0.50, 0.80], [0.60, 0.85]), _epochs([1.6, 0.62], [0.48, 0.79], [0.62, 0.83])]
    torch_runs = [_epochs([1.55, 0.58], [0.49, 0.82], [0.61, 0.86]), _epochs([1.62, 0.64], [0.50, 0.80], [0.60, 0.84])]
    summary = curves.summarise({"a": jax_runs, "b": torch_runs})
    assert summary["a"]["train_loss"][1]["mean"] == pytest.approx(0.61)
    assert summary["a"]["train_loss"][1]["sd"] == pytest.approx(np.std([0.6, 0.62], ddof=1))
    assert curves.verdict(summary, "a", "b")["status"] == "together"
    slow = [_epochs([1.7, 1.2], [0.40, 0.55], [0.50, 0.60]), _epochs([1.75, 1.25], [0.41, 0.56], [0.52, 0.61])]
    result = curves.verdict(curves.summarise({"a": slow, "b": torch_runs}), "a", "b")
    assert result["status"] == "apart"
    assert "train_loss at epoch 2: 1.2250 vs 0.6100" in result["line"]
    assert "train_loss at epoch 1" not in result["line"]  # 1.725 vs 1.585: within the seeds' spread


def test_allowed_difference_follows_the_stated_rule():
    a = {"mean": 0.5, "sd": 0.01, "values": [0.49, 0.51]}
    b = {"mean": 0.6, "sd": 0.02, "values": [0.58, 0.62]}
    pooled = (0.01 ** 2 + 0.02 ** 2) / 2  # 2 + 2 seeds: 2 degrees of freedom, t = 9.925
    assert curves.allowed_difference("train_loss", a, b) == pytest.approx(9.925 * math.sqrt(pooled * (1 / 2 + 1 / 2)))
    assert curves.allowed_difference("val_wa", a, b) == pytest.approx(9.925 * math.sqrt(pooled))
    binomial = 0.55 * 0.45 / 100  # 100 images: wider than the seeds' spread, and known (t = 2.576)
    assert curves.allowed_difference("val_wa", a, b, {"val_wa": 100}) == pytest.approx(2.576 * math.sqrt(binomial))
    close = {"mean": 0.5, "sd": 0.001, "values": [0.499, 0.501]}
    assert curves.allowed_difference("val_wa", close, close) == pytest.approx(0.05)  # the 5-point floor
    three = {"mean": 1.0, "sd": 0.1, "values": [0.9, 1.0, 1.1]}  # 3 + 3 seeds: 4 degrees of freedom
    assert curves.allowed_difference("train_loss", three, three) == pytest.approx(4.604 * 0.1 * math.sqrt(2 / 3))


def test_markdown_row_holds_both_frameworks_per_epoch_means_and_replaces_this_machines_row(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    import compare_training
    import results_table

    runs = {"arm-jax": [_epochs([1.5, 0.6], [0.5, 0.8], [0.6, 0.85]), _epochs([1.7, 0.64], [0.5, 0.8], [0.62, 0.87])],
            "PyTorch": [_epochs([1.55, 0.58], [0.5, 0.8], [0.61, 0.86]), _epochs([1.65, 0.6], [0.5, 0.8], [0.6, 0.84])]}
    summary = curves.summarise(runs)
    record = {"settings": {"dataset": "fer2013", "seeds": [0, 1], "epochs": 2, "image_size": 72, "batch_size": 4,
                           "pretrained": "none", "break_lr_schedule_per_batch": False},
              "train_images": 140, "val_images": 35, "machine": {"device": "cpu"}, "summary": summary,
              "verdict": curves.verdict(summary, "arm-jax", "PyTorch")}
    row = compare_training.markdown_row(record)
    assert row["run"] == "fer2013: 140 train / 35 val images, 2 epochs, 72 px, batch 4, pretrained none, seeds 0 1"
    assert (row["train loss per epoch, arm-jax"], row["train loss, PyTorch"]) == ("1.600 / 0.620", "1.600 / 0.590")
    assert (row["validation accuracy per epoch, arm-jax"], row["validation accuracy, PyTorch"]) == \
        ("0.610 / 0.860", "0.605 / 0.850")
    assert row["verdict"] == "together" and row["machine"] == results_table.cpu()
    page = tmp_path / "README.md"
    page.write_text((REPO / "scripts" / "README.md").read_text())
    for _ in range(2):  # measured twice on one machine: one row
        results_table.write_rows(page, "compare_training", [row])
    table = page.read_text().split("<!-- results: compare_training -->\n")[1].split("<!-- /results")[0]
    assert sum(row["machine"] in line and row["run"] in line
               for line in table.splitlines()) == 1


# ---- the PyTorch recipe against arm-jax's transforms ------------------------------------------

def test_recipe_preprocessing_matches_arm_jax_and_augmentations_follow_the_reference(rng):
    torch_recipe = pytest.importorskip("arm_jax.interop.torch_recipe")
    from tests.numpy_preprocess import host_preprocess

    for shape in ((100, 100, 3), (48, 48, 1)):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        theirs = host_preprocess(image[None], np.zeros((1, 4), np.int32), image_size=96)[0]
        ours = torch_recipe.to_input(image, 96).permute(1, 2, 0).numpy()
        assert np.abs(ours - theirs).max() < 1.5 / 255 / 0.224  # PIL vs jax.image.resize: a grey level

    image = np.full((20, 20, 1), 100, np.uint8)
    image[:, :10] = 0
    draws = np.random.default_rng(0)
    kinds = {"same": 0, "flip": 0, "noise": 0}
    for _ in range(4000):
        out = torch_recipe.flip_or_noise(image, draws)
        kinds["same" if np.array_equal(out, image) else "flip" if np.array_equal(out, image[:, ::-1]) else "noise"] += 1
    assert abs(kinds["same"] / 4000 - 0.5) < 0.03 and abs(kinds["flip"] / 4000 - 0.25) < 0.03

    generator = torch_recipe.torch.Generator().manual_seed(0)
    erased, areas, ratios = 0, [], []
    for _ in range(2000):
        x = torch_recipe.random_erasing(torch_recipe.torch.ones(3, 64, 64), generator)
        zero = (x[0] == 0).numpy()
        if zero.any():
            erased += 1
            rows, cols = np.nonzero(zero)
            h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
            assert zero.sum() == h * w and (x == 0).all(0).numpy().sum() == h * w  # one box, all channels
            areas.append(h * w / 64 ** 2)
            ratios.append(h / w)
    assert abs(erased / 2000 - 0.5) < 0.03
    assert 0.015 < min(areas) and max(areas) < 0.11 and 0.25 < min(ratios) and max(ratios) < 3.6


# ---- whole runs of both frameworks -------------------------------------------------------------

def font_digits_csv(folder: Path, per_class=(20, 5, 1), seed: int = 0) -> Path:
    """Digits 0-6 in PIL's font, near the centre (+-2 px) at sizes 32-37, with noise, as fer2013.csv:
    learnable from scratch in about a hundred steps of batch 4, not in ten."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "fer2013.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("emotion", "pixels", "Usage"))
        for usage, count in zip(("Training", "PublicTest", "PrivateTest"), per_class):
            for i in range(7 * count):
                image = Image.new("L", (48, 48), 0)
                centre = (24 + int(rng.integers(-2, 3)), 24 + int(rng.integers(-2, 3)))
                font = ImageFont.load_default(size=int(rng.integers(32, 38)))
                ImageDraw.Draw(image).text(centre, str(i % 7), fill=255, anchor="mm", font=font)
                pixels = np.clip(np.asarray(image, np.float32) + rng.normal(0, 8, (48, 48)), 0, 255).astype(np.uint8)
                writer.writerow((i % 7, " ".join(map(str, pixels.ravel())), usage))
    return folder


@pytest.fixture(scope="module")
def comparisons(tmp_path_factory):
    """The script run twice into one folder: as it is, then with arm-jax deliberately broken."""
    pytest.importorskip("torch")
    tmp_path = tmp_path_factory.mktemp("compare")
    out = tmp_path / "out"
    # 140 training images at batch 4: 35 steps an epoch, so a per-batch decay (0.9 ** 35 = 0.025
    # after one epoch) stops training where the per-epoch one has barely started. 72 px: the
    # cheapest size with a 3x3 representation (64 px and less give one value per image).
    command = [sys.executable, "scripts/compare_training.py", "--dataset", "fer2013",
               "--data-dir", str(font_digits_csv(tmp_path / "digits")), "--seeds", "0", "1", "2", "--epochs", "3",
               "--image-size", "72", "--batch-size", "4", "--torch-threads", "1", "--out", str(out)]
    runs = []
    for extra in ([], ["--break-lr-schedule-per-batch"]):
        finished = subprocess.run(command + extra, cwd=REPO, capture_output=True, text=True, timeout=1800)
        assert finished.returncode == 0, finished.stderr[-3000:]
        runs.append((finished.stdout, json.loads((out / "comparison.json").read_text())))
    return out, runs


@pytest.mark.slow
def test_a_short_run_of_both_frameworks_writes_curves_and_says_together(comparisons):
    out, [(stdout, record), _] = comparisons
    assert record["verdict"]["status"] == "together", record["verdict"]["line"]
    assert "verdict: together" in stdout
    for framework in ("arm-jax", "PyTorch"):
        seeds = record["runs"][framework]
        assert len(seeds) == 3 and all(len(epochs) == 3 for epochs in seeds)
        assert [e["lr"] for e in seeds[0]] == pytest.approx([1e-3, 9e-4, 8.1e-4])  # ExponentialLR once per epoch
        losses = np.array([[e["train_loss"] for e in epochs] for epochs in seeds])
        assert [p["mean"] for p in record["summary"][framework]["train_loss"]] == pytest.approx(losses.mean(0))
        assert losses[:, 2].mean() < losses[:, 0].mean() - 0.3  # both learn
    assert record["train_images"] == 140 and record["val_images"] == 35
    assert Image.open(out / "comparison.png").size == (3 * 520, 380 + 34)


@pytest.mark.slow
def test_the_verdict_turns_apart_when_arm_jax_steps_its_lr_per_batch(comparisons):
    _, [(_, normal), (stdout, broken)] = comparisons
    assert broken["verdict"]["status"] == "apart", broken["verdict"]["line"]
    assert "verdict: apart: arm-jax and PyTorch differ in" in stdout and "at epoch 3" in stdout
    assert broken["runs"]["PyTorch"] == normal["runs"]["PyTorch"]  # the same PyTorch runs (reused)
    assert broken["settings"]["break_lr_schedule_per_batch"] is True
