"""Write scikit-learn's handwritten digits 0-6 as a FER2013 CSV: real images, seven classes, any CPU.

    pip install scikit-learn
    python scripts/digits_as_fer2013.py data/digits      # -> data/digits/fer2013.csv

The 8x8 digits (0..16) are scaled to 0..255 and resized to FER2013's 48x48 gray (PIL bilinear);
digit d becomes FER2013 label d. They are shuffled with a fixed seed and split 70/15/15 into
Training / PublicTest / PrivateTest. A stand-in for a facial expression data set, for checking
a whole training run (scripts/compare_training.py) on images no one here drew.
"""

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 7
SPLIT = (("Training", 0.70), ("PublicTest", 0.15), ("PrivateTest", 0.15))


def digits_rows(seed: int = 0) -> list[tuple[int, np.ndarray, str]]:
    """(label, 48x48 uint8, usage) for every digit 0-6 of scikit-learn's set."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = digits.target < CLASSES
    images, labels = digits.images[keep], digits.target[keep]
    order = np.random.default_rng(seed).permutation(len(labels))
    bounds = np.cumsum([0] + [round(share * len(order)) for _, share in SPLIT[:-1]] + [len(order)])
    usage = np.empty(len(order), dtype=object)
    for (name, _), start, stop in zip(SPLIT, bounds[:-1], bounds[1:]):
        usage[order[start:stop]] = name
    rows = []
    for index in order:
        small = np.rint(images[index] * (255.0 / 16.0)).astype(np.uint8)
        big = np.asarray(Image.fromarray(small).resize((48, 48), Image.BILINEAR))
        rows.append((int(labels[index]), big, usage[index]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write fer2013.csv into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = digits_rows(args.seed)
    with open(args.out / "fer2013.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("emotion", "pixels", "Usage"))
        for label, pixels, usage in rows:
            writer.writerow((label, " ".join(map(str, pixels.ravel())), usage))
    counts = {name: sum(usage == name for _, _, usage in rows) for name, _ in SPLIT}
    print(f"wrote {args.out / 'fer2013.csv'}: {len(rows)} digits 0-{CLASSES - 1}, {counts}")


if __name__ == "__main__":
    main()
