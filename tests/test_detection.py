"""`arm-jax predict --detect-faces` on real photos shipped by scikit-image, and on a video made from them."""

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image
from skimage import data

from arm_jax.inference.detection import Box, FaceDetector, crop_face
from arm_jax.inference.predict import NO_FACE, predict_faces
from cli.main import cli
from tests.fixtures import write_image
from tests.small_models import EXPRESSIONS, small_model

# Eileen Collins' face in skimage.data.astronaut() (512x512), read off the photo by eye:
# brows to chin, ear to ear (left, top, right, bottom).
ASTRONAUT_FACE = (175, 60, 275, 170)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    """A small random model exported to ONNX: face finding and cropping do not depend on its weights."""
    from arm_jax.interop.export import build_onnx

    path = tmp_path_factory.mktemp("detect") / "arm.onnx"
    onnx.save_model(build_onnx(small_model(image_size=64)), path)
    return path


def inside(box: list[int], region: tuple[int, int, int, int]) -> bool:
    left, top, width, height = box
    return region[0] <= left and region[1] <= top and left + width <= region[2] and top + height <= region[3]


def test_astronaut_has_one_face_on_the_face():
    boxes = FaceDetector().detect(data.astronaut())
    assert len(boxes) == 1
    box = boxes[0]
    assert inside(box.as_list(), ASTRONAUT_FACE) and box.width >= 0.6 * (ASTRONAUT_FACE[2] - ASTRONAUT_FACE[0])


@pytest.mark.parametrize("degrees", [-15, 15])
def test_tilted_face_is_turned_upright_by_its_eyes(degrees):
    """The astronaut turned by 15 degrees: the eyes' angle is found and the crop comes back near the upright one."""
    detector, photo = FaceDetector(), data.astronaut()
    (upright,) = detector.detect(photo)
    centre = (upright.x + upright.width / 2, upright.y + upright.height / 2)
    turned = cv2.warpAffine(photo, cv2.getRotationMatrix2D(centre, degrees, 1.0), photo.shape[1::-1],
                            borderMode=cv2.BORDER_REPLICATE)
    (box,) = detector.detect(turned)
    roll = detector.roll_degrees(turned, box)
    assert abs(roll + degrees) <= 7  # the eyes' line leans against the turn (image y points down)
    reference = crop_face(photo, upright, 96).astype(float)
    as_found = np.abs(crop_face(turned, box, 96).astype(float) - reference).mean()
    levelled = np.abs(crop_face(turned, box, 96, roll_degrees=roll).astype(float) - reference).mean()
    assert levelled < 0.7 * as_found


def test_crop_is_the_box_with_margin_and_pads_at_the_border():
    image = np.arange(100 * 100 * 3, dtype=np.uint32).reshape(100, 100, 3).astype(np.uint8)
    crop = crop_face(image, Box(40, 40, 20, 20), size=24, margin=0.1)  # 24 px square around the box
    np.testing.assert_array_equal(crop, image[38:62, 38:62])
    corner = crop_face(image, Box(0, 0, 20, 20), size=24, margin=0.1)  # 2 px outside: edge repeated
    np.testing.assert_array_equal(corner[:3, :3], np.broadcast_to(image[0, 0], (3, 3, 3)))


def test_photo_faces_json_and_annotated_image(onnx_model, tmp_path):
    photo = write_image(tmp_path / "astronaut.png", data.astronaut())
    result = CliRunner().invoke(cli, ["predict", "--checkpoint", str(onnx_model), "--detect-faces", str(photo),
                                      "--annotate", str(tmp_path / "out"), "--json", "-"])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(result.output)
    (face,) = entry["faces"]
    assert inside(face["box"], ASTRONAUT_FACE)
    assert set(face["probabilities"]) == set(EXPRESSIONS) and abs(sum(face["probabilities"].values()) - 1) < 1e-4
    assert face["expression"] == max(face["probabilities"], key=face["probabilities"].get)
    annotated = np.asarray(Image.open(entry["annotated"]))
    original = data.astronaut()
    changed = np.any(annotated != original, axis=-1)
    rows, cols = np.nonzero(changed)
    left, top, width, height = face["box"]
    assert changed[top, left + width // 2] and changed[top + height // 2, left]  # the box's edges are drawn
    assert rows.max() <= top + height + 3 and cols.min() >= left - 3  # nothing drawn away from the face


def test_photo_without_face_says_so(onnx_model, tmp_path):
    photos = [write_image(tmp_path / folder / "coffee.png", data.coffee()) for folder in ("a", "b")]
    results = predict_faces(onnx_model, photos, annotate=tmp_path / "out")
    assert [(r.faces, r.message) for r in results] == [([], NO_FACE)] * 2
    # Two inputs with one name: two annotated files, neither overwritten.
    assert len({r.annotated for r in results}) == 2 and all(Path(r.annotated).is_file() for r in results)


def test_video_frames_and_annotated_video(onnx_model, tmp_path):
    """Six 512 px frames (astronaut, coffee, coffee, astronaut, astronaut shifted, astronaut); every second is looked at."""
    astronaut, coffee = data.astronaut(), np.asarray(Image.fromarray(data.coffee()).resize((512, 512)))
    shifted = np.roll(astronaut, 60, axis=1)
    frames = [astronaut, coffee, coffee, astronaut, shifted, astronaut]
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (512, 512))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    (result,) = predict_faces(onnx_model, [video], every=2, annotate=tmp_path / "out", progress=False)
    assert [frame.frame for frame in result.frames] == [0, 2, 4]
    assert [len(frame.faces) for frame in result.frames] == [1, 0, 1]
    assert [frame.time_s for frame in result.frames] == [0.0, 0.2, 0.4]
    first, shifted_face = result.frames[0].faces[0].box, result.frames[2].faces[0].box
    assert abs(shifted_face[0] - first[0] - 60) <= 4 and abs(shifted_face[1] - first[1]) <= 4
    written = cv2.VideoCapture(result.annotated)
    count = 0
    while written.read()[0]:
        count += 1
    assert count == 3 and written.get(cv2.CAP_PROP_FRAME_WIDTH) == 512
