"""One vocabulary of expression names, each data set's spellings of it, and its class orders.

Every split and every model speaks the canonical names below; a data set's own spelling
("angry", "Happy", "sad", ...) is mapped on reading, so a model trained on one data set
can be evaluated on another by name. Names outside the vocabulary (a folder data set's
"pain") are kept as they are.
"""

from __future__ import annotations

from collections.abc import Iterable

from arm_jax.errors import UserError

CANONICAL = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
             "contempt")

# Spellings seen in the data sets' files and folder releases (compared case-insensitively).
SPELLINGS = {
    "neutral": ("neutral", "neutrality"),
    "happiness": ("happiness", "happy", "happy face", "joy"),
    "surprise": ("surprise", "surprised", "suprise"),
    "sadness": ("sadness", "sad"),
    "anger": ("anger", "angry"),
    "disgust": ("disgust", "disgusted"),
    "fear": ("fear", "fearful", "afraid", "scared"),
    "contempt": ("contempt", "contemptuous"),
}
_CANONICAL_OF = {spelling: name for name, spellings in SPELLINGS.items() for spelling in spellings}

# Each data set's label ids in order, spelled as its own files spell them.
DATASET_CLASSES = {
    # fer2013.csv's emotion 0..6 (Kaggle: 0=Angry, 1=Disgust, 2=Fear, 3=Happy, 4=Sad, 5=Surprise,
    # 6=Neutral); the folder release names its folders the same, in lower case.
    "fer2013": ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"),
    "fer2013_folder": ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"),
    # fer2013new.csv's vote columns, in that order.
    "ferplus": ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                "contempt"),
    # list_patition_label.txt's 1..7.
    "raf_db": ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral"),
    # The CSV's expression 0..7 (8 None, 9 Uncertain, 10 No-Face are not classes).
    "affectnet7": ("Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger"),
    "affectnet8": ("Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt"),
    # The built-in synthetic faces use FER2013's order.
    "synthetic": ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"),
}


def canonical_name(name: str) -> str:
    """The vocabulary's name for `name` (any known spelling, any case), else `name` stripped."""
    stripped = str(name).strip()
    return _CANONICAL_OF.get(stripped.lower(), stripped)


def canonical_names(names: Iterable[str], what: str = "class names") -> tuple[str, ...]:
    """canonical_name of each; a UserError if two of them name the same class."""
    names = list(names)
    result = tuple(canonical_name(n) for n in names)
    seen: dict[str, str] = {}
    for original, name in zip(names, result):
        if name in seen:
            raise UserError(f"{what}: {seen[name]!r} and {original!r} both mean {name!r}")
        seen[name] = original
    if any(not name for name in result):
        raise UserError(f"{what}: an empty class name in {', '.join(map(repr, result))}")
    return result


def dataset_classes(dataset: str) -> tuple[str, ...]:
    """A data set's class order in canonical names (what its splits' class_names are)."""
    if dataset not in DATASET_CLASSES:
        known = ", ".join(DATASET_CLASSES)
        raise UserError(f"data set {dataset!r} has no fixed class order (known: {known}); "
                        "give the names with --class-names")
    return canonical_names(DATASET_CLASSES[dataset], dataset)


def parse_class_names(text: str) -> tuple[str, ...]:
    """'angry, happy,...' (the --class-names option) as canonical names."""
    return canonical_names([part for part in text.split(",")], "--class-names")


def given_class_names(class_names: str | Iterable[str] | None,
                      model_classes: str | None) -> tuple[str, ...] | None:
    """Names for a model without them: --class-names 'a,b,...', or --model-classes DATASET."""
    if class_names is not None and model_classes is not None:
        raise UserError("give --class-names or --model-classes, not both")
    if model_classes is not None:
        return dataset_classes(model_classes)
    if isinstance(class_names, str):
        return parse_class_names(class_names)
    return None if class_names is None else canonical_names(class_names, "--class-names")
