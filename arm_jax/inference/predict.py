"""`arm-jax predict`: the expression in face crops, or in every face found in photos and videos.

The model is an exported `.onnx` file, run with onnxruntime (this path never
imports JAX, so the first answer comes without JAX's start-up and compilation;
arm_jax.inference.onnx_session), or anything load_any_model reads, run in JAX
from cached programs (arm_jax.inference.jax_classifier). Both use the running
GAR, so an image's answer does not depend on the others. OpenCV and tqdm are
imported only where faces are detected or videos read.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from arm_jax.data.base import resize_uint8
from arm_jax.errors import UserError
from arm_jax.inference.video import VIDEO_SUFFIXES, VideoReader, VideoWriter

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
NO_FACE = "no face found"


@dataclass(frozen=True)
class Prediction:
    """The predicted class of one image file and the probability of every class."""

    path: str
    label: int
    class_name: str
    probabilities: dict[str, float]


@dataclass(frozen=True)
class FacePrediction:
    """One face found in a photo or frame: its box [left, top, width, height] in pixels and the expression."""

    box: list[int]
    expression: str
    probabilities: dict[str, float]


@dataclass
class FramePredictions:
    """The faces of one video frame."""

    frame: int
    time_s: float
    faces: list[FacePrediction]


@dataclass
class FileFaces:
    """The faces of a photo (`faces`) or of a video's frames (`frames`); `message` says when none was found."""

    path: str
    kind: str  # "image" or "video"
    faces: list[FacePrediction] = field(default_factory=list)
    frames: list[FramePredictions] = field(default_factory=list)
    message: str | None = None
    annotated: str | None = None

    def as_dict(self) -> dict:
        """For JSON: a photo has `faces`, a video `frames`, not both."""
        result = asdict(self)
        del result["frames" if self.kind == "image" else "faces"]
        return result


class Classifier(Protocol):
    """What both back ends offer."""

    class_names: tuple[str, ...]
    image_size: int

    def probabilities(self, faces: np.ndarray) -> np.ndarray:
        """uint8 (N, image_size, image_size, 3) RGB -> (N, classes) float32."""


class OnnxClassifier:
    """An `arm-jax export` model in onnxruntime; its class names and input size come from the file."""

    def __init__(self, path: str | Path):
        from arm_jax.inference.onnx_session import session  # onnxruntime: only on this path

        try:
            self._session = session(path)
        except Exception as error:  # onnxruntime raises its own types for missing/corrupt files
            raise UserError(f"{path}: not a readable ONNX model ({error})") from None
        metadata = self._session.get_modelmeta().custom_metadata_map
        if "class_names" not in metadata or "image_size" not in metadata:
            raise UserError(f"{path}: not written by `arm-jax export` (no class_names/image_size metadata)")
        self.class_names = tuple(json.loads(metadata["class_names"]))
        self.image_size = int(metadata["image_size"])

    def probabilities(self, faces: np.ndarray) -> np.ndarray:
        return self._session.run(["probabilities"], {"image": np.ascontiguousarray(faces, np.uint8)})[0]


def open_classifier(model: str | Path) -> Classifier:
    """An .onnx file runs in onnxruntime; anything else is a checkpoint for JAX."""
    if Path(model).suffix.lower() == ".onnx":
        if not Path(model).is_file():
            raise UserError(f"{model}: no such file")
        return OnnxClassifier(model)
    from arm_jax.inference.jax_classifier import JaxClassifier  # JAX is imported only on this path

    return JaxClassifier(model)


def input_files(inputs: list[str | Path], suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """The files named, and the files with `suffixes` inside folders named (sorted), in order."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                raise UserError(f"{item}: no files ({', '.join(suffixes)}) in this folder")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise UserError(f"{item}: no such file or folder")
    return files


def image_files(inputs: list[str | Path]) -> list[Path]:
    """The image files named or inside the folders named."""
    return input_files(inputs, IMAGE_SUFFIXES)


def upright_rgb(image: Image.Image) -> np.ndarray:
    """An opened image as uint8 RGB, turned upright by its EXIF orientation (gray is replicated); decodes it."""
    return np.asarray(ImageOps.exif_transpose(image).convert("RGB"), np.uint8)


def read_rgb(path: Path) -> np.ndarray:
    """An image file as uint8 RGB, upright (upright_rgb)."""
    try:
        with Image.open(path) as image:
            return upright_rgb(image)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise UserError(f"{path}: not a readable image ({error})") from None


def face_at_size(image: np.ndarray, image_size: int) -> np.ndarray:
    """An aligned face crop at the model's input size, resized as the training pipeline resizes."""
    return resize_uint8(image, image_size)


def read_face(path: Path, image_size: int) -> np.ndarray:
    """An aligned face crop file at the model's input size."""
    return face_at_size(read_rgb(path), image_size)


def crop_prediction(path: str, probabilities: np.ndarray, class_names: tuple[str, ...]) -> Prediction:
    """The Prediction of one aligned crop from its row of class probabilities."""
    label = int(probabilities.argmax())
    return Prediction(path, label, class_names[label], {n: float(p) for n, p in zip(class_names, probabilities)})


def predict(checkpoint: str | Path, inputs: list[str | Path], *, batch_size: int = 32) -> list[Prediction]:
    """The expression of every aligned face crop named (files or folders)."""
    files = image_files(inputs)
    videos = [str(p) for p in files if p.suffix.lower() in VIDEO_SUFFIXES]
    if videos:
        raise UserError(f"{videos[0]}: a video; pass --detect-faces to find the faces in its frames")
    classifier = open_classifier(checkpoint)
    names = classifier.class_names
    results = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        probabilities = classifier.probabilities(np.stack([read_face(p, classifier.image_size) for p in chunk]))
        results += [crop_prediction(str(path), row, names) for path, row in zip(chunk, probabilities)]
    return results


def predict_faces(checkpoint: str | Path, inputs: list[str | Path], *, every: int = 1,
                  annotate: str | Path | None = None, progress: bool = True) -> list[FileFaces]:
    """Find the faces in photos and videos (every `every`-th frame) and predict each one's expression.

    With `annotate`, each photo (PNG) or video (same container) is written there with boxes and labels.
    """
    files = input_files(inputs, IMAGE_SUFFIXES + VIDEO_SUFFIXES)
    annotate_dir = Path(annotate) if annotate is not None else None
    if annotate_dir is not None:
        annotate_dir.mkdir(parents=True, exist_ok=True)
    pipeline = FacePipeline(open_classifier(checkpoint))
    results = []
    for path in files:
        if path.suffix.lower() in VIDEO_SUFFIXES:
            results.append(pipeline.video(path, every=every, annotate_dir=annotate_dir, progress=progress))
        else:
            results.append(pipeline.photo(path, read_rgb(path), annotate_dir=annotate_dir))
    return results


class FacePipeline:
    """Detector + classifier: the faces of a photo or of a video's frames, each with its expression."""

    def __init__(self, classifier: Classifier):
        from arm_jax.inference.detection import FaceDetector  # OpenCV: only where faces are detected

        self.classifier, self.detector = classifier, FaceDetector()
        self._written: set[Path] = set()

    def annotation_path(self, annotate_dir: Path, source: Path, suffix: str) -> Path:
        """NAME.annotated.SUFFIX, numbered when two inputs share a name (no output overwrites another)."""
        destination, number = annotate_dir / f"{source.stem}.annotated{suffix}", 1
        while destination in self._written:
            number += 1
            destination = annotate_dir / f"{source.stem}-{number}.annotated{suffix}"
        self._written.add(destination)
        return destination

    def faces_in(self, image: np.ndarray) -> list[FacePrediction]:
        from arm_jax.inference.detection import crop_face

        boxes = self.detector.detect(image)
        if not boxes:
            return []
        names = self.classifier.class_names
        size = self.classifier.image_size
        crops = np.stack([crop_face(image, box, size, roll_degrees=self.detector.roll_degrees(image, box))
                          for box in boxes])
        return [FacePrediction(box.as_list(), names[int(row.argmax())], {n: float(p) for n, p in zip(names, row)})
                for box, row in zip(boxes, self.classifier.probabilities(crops))]

    @staticmethod
    def annotated(image: np.ndarray, faces: list[FacePrediction]) -> np.ndarray:
        from arm_jax.inference.detection import Box, draw_faces

        labels = [(Box(*face.box), f"{face.expression} {face.probabilities[face.expression]:.2f}") for face in faces]
        return draw_faces(image, labels)

    def photo(self, path: Path, image: np.ndarray, *, annotate_dir: Path | None) -> FileFaces:
        faces = self.faces_in(image)
        result = FileFaces(str(path), "image", faces=faces, message=None if faces else NO_FACE)
        if annotate_dir is not None:
            destination = self.annotation_path(annotate_dir, path, ".png")
            Image.fromarray(self.annotated(image, faces)).save(destination)
            result.annotated = str(destination)
        return result

    def video(self, path: Path, *, every: int, annotate_dir: Path | None, progress: bool) -> FileFaces:
        from tqdm import tqdm

        reader = VideoReader(path, every)
        result = FileFaces(str(path), "video")
        writer = None
        try:
            for index, time_s, frame in tqdm(reader, total=reader.selected_count, desc=path.name, unit="frame",
                                             disable=not progress):
                faces = self.faces_in(frame)
                result.frames.append(FramePredictions(index, round(time_s, 3), faces))
                if annotate_dir is not None:
                    if writer is None:  # the analysed frames, at the rate that keeps the video's duration
                        writer = VideoWriter(self.annotation_path(annotate_dir, path, path.suffix.lower()),
                                             reader.fps / every, frame.shape[1], frame.shape[0])
                    writer.write(self.annotated(frame, faces))
        finally:
            if writer is not None:
                writer.close()
                result.annotated = str(writer.path)
        if not result.frames:
            raise UserError(f"{path}: no frame could be read")
        if not any(frame.faces for frame in result.frames):
            result.message = f"{NO_FACE} in {len(result.frames)} frames"
        return result


def faces_table(results: list[FileFaces]) -> str:
    """One line per face: file (and frame), box, expression and its probability; files without faces say so."""
    lines = []
    for result in results:
        if result.kind == "image":
            entries = [(result.path, face) for face in result.faces]
        else:
            entries = [(f"{result.path} frame {frame.frame}", face) for frame in result.frames for face in frame.faces]
        lines += [f"{where}  box {face.box}  {face.expression:<12} {face.probabilities[face.expression]:.3f}"
                  for where, face in entries]
        if result.message:
            lines.append(f"{result.path}  {result.message}")
        if result.annotated:
            lines.append(f"{result.path}  annotated: {result.annotated}")
    return "\n".join(lines)
