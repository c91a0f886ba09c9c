"""One vocabulary of expression names: every data set's spellings, and evaluation across data sets."""

import json
import shutil

import numpy as np
import pytest

from arm_jax.data import classes
from arm_jax.data.readers import affectnet, fer2013, raf_db
from arm_jax.errors import UserError
from arm_jax.inference.evaluate import evaluate
from arm_jax.interop.convert import expected_shapes
from arm_jax.interop.model_files import MODEL_FILE, load_any_model, save_model
from arm_jax.models import ARMResNet18
from tests import fixtures as fx

# The data sets' orders as their documentation gives them (issue 8), in canonical names.
ORDERS = {
    "fer2013": ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral"),
    "raf_db": ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"),
    "affectnet8": ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger",
                   "contempt"),
    "ferplus": ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                "contempt"),
}


def test_every_spelling_maps_to_the_vocabulary():
    assert set(classes.SPELLINGS) == set(classes.CANONICAL)
    for name, spellings in classes.SPELLINGS.items():
        for spelling in spellings:
            for variant in (spelling, spelling.upper(), spelling.title(), f" {spelling} "):
                assert classes.canonical_name(variant) == name, variant
    assert classes.canonical_name("Pain") == "Pain"  # outside the vocabulary: kept
    with pytest.raises(UserError, match="'happy' and 'Happiness' both mean 'happiness'"):
        classes.canonical_names(["happy", "Happiness"], "x")


def test_every_data_set_order_in_canonical_names():
    for dataset, order in ORDERS.items():
        assert classes.dataset_classes(dataset) == order
    assert classes.dataset_classes("affectnet7") == ORDERS["affectnet8"][:7]
    assert classes.dataset_classes("fer2013_folder") == ORDERS["fer2013"]
    assert classes.dataset_classes("synthetic") == ORDERS["fer2013"]
    for dataset, spellings in classes.DATASET_CLASSES.items():  # each file's own spelling maps
        assert all(classes.canonical_name(s) in classes.CANONICAL for s in spellings), dataset
    assert fer2013.CLASS_NAMES == ORDERS["fer2013"] and raf_db.CLASS_NAMES == ORDERS["raf_db"]
    assert fer2013.FERPLUS_CLASS_NAMES == ORDERS["ferplus"]
    assert affectnet.CLASS_NAMES == ORDERS["affectnet8"]
    assert classes.given_class_names("Angry, happy,SAD", None) == ("anger", "happiness", "sadness")
    assert classes.given_class_names(None, "raf_db") == ORDERS["raf_db"]
    with pytest.raises(UserError, match="no fixed class order"):
        classes.given_class_names(None, "folder")


def plain_variables(model, seed):
    """He-initialised variables of `model` in numpy (model.init would compile the network)."""
    rng = np.random.default_rng(seed)

    def value(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            scale = 30.0 if path[-2].key == "fc" else np.sqrt(2.0 / fan_in)  # spread the classes
            return (rng.standard_normal(leaf.shape) * scale).astype(leaf.dtype)
        fill = 1 if name in ("scale", "var") else 0
        return np.full(leaf.shape, fill, leaf.dtype)

    import jax

    return jax.tree_util.tree_map_with_path(value, expected_shapes(model))


@pytest.fixture(scope="module")
def fer_data(tmp_path_factory):
    """fer2013.csv (PrivateTest: 35 faces, 5 per class) and the same faces as a folder data set
    with other folder names, in another order, plus a class the model lacks."""
    root = tmp_path_factory.mktemp("data")
    rows = fx.fer2013_rows(np.random.default_rng(3), per_split=35)
    fx.write_fer2013_csv(root / "fer" / "fer2013.csv", rows)
    folder_names = ("Angry", "Disgusted", "Fearful", "Happy", "Sadness", "Surprised", "Neutral")
    test = {name: [] for name in folder_names + ("Contempt",)}
    for label, pixels, usage in rows:
        if usage == "PrivateTest":
            test[folder_names[label]].append(pixels)
    test["Contempt"] = [rows[0][1], rows[1][1], rows[2][1]]
    fx.write_class_folders(root / "folder", {"train": test, "test": test}, suffix=".png")
    faces = np.stack([p for _, p, usage in rows if usage == "PrivateTest"])[..., None]
    return root / "fer", root / "folder", faces


@pytest.fixture(scope="module")
def fer_model(tmp_path_factory, fer_data):
    """A 7-class model named in FER2013's own spelling, and the same weights without names."""
    import jax

    from arm_jax.forward import apply_to_images

    root = tmp_path_factory.mktemp("models")
    # The plain classifier (GAP + fc over 512 features) at FER's native 48 px: no resizing
    # anywhere, so the CSV's and the folder's pixels reach the network identical.
    model = ARMResNet18(7, image_size=48, arrangement=False, de_albino=False, affinity=False)
    variables = plain_variables(model, 0)
    # Random features share a large mean: centre the logits on these faces (fc bias), so
    # that the predictions spread over the classes.
    logits = np.asarray(jax.jit(lambda v, x: apply_to_images(model, v, x))(variables, fer_data[2]))
    variables["params"]["fc"]["bias"] = -logits.mean(axis=0).astype(np.float32)
    named = save_model(root / "named", variables, model, classes.DATASET_CLASSES["fer2013"])
    nameless = shutil.copytree(named, root / "nameless")  # as `convert` writes a .pth's model
    description = json.loads((nameless / MODEL_FILE).read_text())
    (nameless / MODEL_FILE).write_text(json.dumps({**description, "class_names": None}))
    return named, nameless


@pytest.mark.slow  # fast tier: evaluates across data sets (11 s of CPU)
def test_cross_data_set_evaluation_by_name(fer_model, fer_data):
    named, _ = fer_model
    assert load_any_model(named).class_names == ORDERS["fer2013"]  # canonical on loading
    own = evaluate(named, "fer2013", fer_data[0], progress=False)
    other = evaluate(named, "folder", fer_data[1], progress=False)
    assert other.class_names == ("anger", "contempt", "disgust", "fear", "happiness", "neutral",
                                 "sadness", "surprise")           # the folder's sorted order
    assert len(set(np.argmax(own.confusion, axis=1))) >= 3        # predictions are spread
    assert other.per_class == pytest.approx(own.per_class) and set(own.per_class) == set(ORDERS["fer2013"])
    assert other.ua == pytest.approx(own.ua) and other.ua_classes == tuple(
        n for n in other.class_names if n != "contempt")
    assert other.unpredictable == {"contempt": 3} and other.count == own.count + 3
    assert other.wa == pytest.approx(own.wa * own.count / (own.count + 3))  # contempt: errors
    for name in ORDERS["fer2013"]:                                # rows re-ordered, same counts
        own_row = own.confusion[own.class_names.index(name)]
        row = other.confusion[other.class_names.index(name)]
        assert [row[other.class_names.index(n)] for n in own.class_names] == own_row
    assert other.confusion[other.class_names.index("contempt")][1] == 0  # never predicted
    assert any("no class contempt" in note for note in other.notes)


def test_nameless_model_is_warned_about_and_named_by_option(fer_model, fer_data):
    named, nameless = fer_model
    assumed = evaluate(nameless, "fer2013", fer_data[0], progress=False)
    assert any("carries no class names: assuming fer2013's order" in n and "--model-classes" in n
               for n in assumed.notes)
    as_raf = evaluate(nameless, "fer2013", fer_data[0], progress=False, model_classes="raf_db")
    assert not any("carries no class names" in n for n in as_raf.notes)
    assert as_raf.model_class_names == ORDERS["raf_db"]
    # The same predictions, read in RAF-DB's order: model id j now means raf_db's class j.
    own = np.asarray(assumed.confusion)  # rows and columns in FER order = the model's ids
    for i, name in enumerate(ORDERS["fer2013"]):
        expected = own[i, ORDERS["raf_db"].index(name)] / own[i].sum()
        assert as_raf.per_class[name] == pytest.approx(expected)
    with pytest.raises(UserError, match="carries its class names"):
        evaluate(named, "fer2013", fer_data[0], progress=False, model_classes="raf_db")
