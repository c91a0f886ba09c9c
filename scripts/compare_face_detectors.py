"""Face detectors that ship their model in a pip package, on scikit-image's real photos.

    python scripts/compare_face_detectors.py

Prints, per detector: the boxes on `astronaut` (one face), detections on seven
photos without faces, and on scikit-image's LFW subset (100 faces, 100
non-faces, 25 px, upscaled to 100 px on a grey 200 px canvas): how many faces
are found alone, how many missed, how many non-faces get a box. Needs
opencv-python-headless<5 (Haar cascades) and scikit-image.
"""

import argparse
import time

import cv2
import numpy as np
from PIL import Image
from skimage import data
from skimage.feature import Cascade

import results_table  # scripts/, beside this file


def lfw_subset() -> tuple[list[np.ndarray], list[np.ndarray]]:
    images = np.load(data.__path__[0] + "/lfw_subset.npy")  # 100 faces, then 100 non-faces
    out = []
    for image in images:
        big = np.asarray(Image.fromarray((image * 255).astype(np.uint8)).resize((100, 100), Image.BILINEAR))
        canvas = np.full((200, 200), 128, np.uint8)
        canvas[50:150, 50:150] = big
        out.append(np.repeat(canvas[..., None], 3, -1))
    return out[:100], out[100:]


def min_side(gray: np.ndarray) -> int:
    return max(24, min(gray.shape) // 20)  # as arm_jax.inference.detection


def haar(name: str):
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + name)

    def detect(rgb):
        gray = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        side = min_side(gray)
        found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
        return [tuple(map(int, box)) for box in np.reshape(found, (-1, 4))]

    return detect


def skimage_lbp():
    cascade = Cascade(data.lbp_frontal_face_cascade_filename())

    def detect(rgb):
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) / 255.0
        side = min_side(gray)
        found = cascade.detect_multi_scale(img=gray, scale_factor=1.2, step_ratio=1, min_size=(side, side),
                                           max_size=gray.shape, min_neighbor_number=4)
        return [(f["c"], f["r"], f["width"], f["height"]) for f in found]

    return detect


def gray3(image: np.ndarray) -> np.ndarray:
    image = (image * 255).astype(np.uint8) if image.dtype != np.uint8 else image
    return np.repeat(image[..., None], 3, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    results_table.add_option(parser)
    args = parser.parse_args()
    detectors = {"haar frontalface_alt2": haar("haarcascade_frontalface_alt2.xml"),
                 "haar frontalface_default": haar("haarcascade_frontalface_default.xml"),
                 "haar frontalface_alt": haar("haarcascade_frontalface_alt.xml"),
                 "scikit-image LBP": skimage_lbp()}
    no_face = {"coffee": data.coffee(), "chelsea": data.chelsea(), "rocket": data.rocket(),
               "hubble_deep_field": data.hubble_deep_field(), "horse": gray3(data.horse()),
               "coins": gray3(data.coins()), "immunohistochemistry": data.immunohistochemistry()}
    faces, non_faces = lfw_subset()
    stamp, rows = results_table.stamp(), []
    for name, detect in detectors.items():
        start = time.perf_counter()
        astronaut = detect(data.astronaut())
        elapsed = time.perf_counter() - start
        camera = detect(gray3(data.camera()))
        false = {photo: n for photo, image in no_face.items() if (n := len(detect(image)))}
        alone = sum(len(detect(f)) == 1 for f in faces)
        missed = sum(len(detect(f)) == 0 for f in faces)
        wrong = sum(len(detect(f)) > 0 for f in non_faces)
        print(f"{name:25s} astronaut {astronaut} ({1000 * elapsed:.0f} ms); camera {camera}; "
              f"faces on no-face photos {false or 0}; LFW: {alone}/100 found alone, {missed} missed, "
              f"{wrong}/100 non-faces with a box")
        rows.append({"detector": name, "astronaut (1 face): boxes (left, top, width, height)":
                     " ".join(map(str, astronaut)) or "none",
                     "cameraman (1 face, three-quarter view): boxes": str(len(camera)),
                     "faces on 7 photos without one": ", ".join(f"{n} on {p}" for p, n in false.items()) or "0",
                     "LFW: 100 faces found alone / missed": f"{alone} / {missed}",
                     "LFW: 100 non-faces with a box": str(wrong), **stamp})
    if args.markdown:
        # The counts do not depend on the machine: one row per detector, stamped with the last run.
        results_table.write_rows(args.markdown, "compare_face_detectors", rows, key=("detector",))


if __name__ == "__main__":
    main()
