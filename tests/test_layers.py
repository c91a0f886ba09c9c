"""Imports run one way, from the CLI down to the models and data (STYLE.md): read from the source
of every arm_jax module, the imports inside functions included."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "arm_jax"

# Layer -> the arm_jax layers it must not import. Top-level modules (errors, metrics, xla_flags;
# forward, above models and data) are below every other package.
FORBIDDEN = {
    "data": {"models", "forward", "training", "inference", "interop"},
    # The model knows nothing of the command line: it raises ValueError, which the layers that
    # build it from options or files turn into messages naming the option or the file.
    "models": {"data", "forward", "training", "inference", "interop", "errors"},
    # The one forward pass (model + preprocessing) sits on the models and the data, under every user of it.
    "forward": {"training", "inference", "interop", "serving", "reproduce", "errors"},
    "training": {"inference"},
    "errors": {"data", "models", "training", "inference", "interop"},
    "metrics": {"data", "models", "training", "inference", "interop"},
    "xla_flags": {"data", "models", "training", "inference", "interop"},
    "compat": {"data", "models", "training", "inference", "interop", "errors", "metrics", "xla_flags"},
}

# JAX's and grain's private parts (see arm_jax/compat.py, the one module allowed to use them).
PRIVATE = ("jax._src", "_iterator", "_del_thread_pool", "last_seen_indices", "_backends")


def _layer(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else path.stem


def _imported_layers(tree: ast.AST) -> set[str]:
    """The arm_jax layers a module imports (absolute imports; the package uses no relative ones)."""
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, "relative import"
            modules.add(node.module)
            if node.module == "arm_jax":  # from arm_jax import metrics
                modules.update(f"arm_jax.{alias.name}" for alias in node.names)
    return {name.split(".")[1] for name in modules if name.startswith("arm_jax.")}


def test_no_module_imports_a_layer_above_its_own():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        above = _imported_layers(ast.parse(path.read_text())) & FORBIDDEN.get(_layer(path), set())
        wrong += [f"{path.relative_to(PACKAGE.parent)} imports arm_jax.{layer}" for layer in sorted(above)]
    assert wrong == []


def test_data_set_splits_are_defined_in_the_data_package():
    """A LabelledSplit subclass (a data set, or a part of one) is a data concept, whoever uses it."""
    outside = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    getattr(base, "id", getattr(base, "attr", None)) == "LabelledSplit" for base in node.bases):
                if _layer(path) != "data":
                    outside.append(f"{path.relative_to(PACKAGE.parent)}: {node.name}")
    assert outside == []


def test_private_apis_of_jax_and_grain_are_used_only_in_compat():
    """Names and strings of JAX's and grain's private parts appear in arm_jax/compat.py alone
    (attributes and imports through the AST; strings, since getattr(x, "_iterator") is one too)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "compat.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Attribute) and not (isinstance(node.value, ast.Name) and node.value.id == "self"):
                names.append(node.attr)  # an object's own `self._iterator` is not grain's
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module)
            elif isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.append(node.value)
            for name in names:
                if any(name == private or name.startswith(private + ".") for private in PRIVATE):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {name}")
    assert found == []


def test_the_model_meets_images_only_through_the_one_forward_pass():
    """Training, validation, evaluate, calibration, predict, serve and the StableHLO export apply the
    model through arm_jax.forward (its preprocessing: data/transforms.device_preprocess); only the
    ONNX graph, built node by node, reads the normalisation constants too (and its tests hold it to
    the forward pass). A second `model.apply` on images or a second resize/normalise fails here."""
    allowed = {
        "apply": {"forward.py"},
        "resize": {"data/transforms.py"},  # jax.image.resize: device_preprocess
        "IMAGENET_MEAN": {"data/transforms.py", "interop/export.py"},
        "IMAGENET_STD": {"data/transforms.py", "interop/export.py"},
    }
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE).as_posix()
        if where.startswith("models/"):  # the model's own submodules apply each other
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and \
                    node.value.attr == "image" and node.attr == "resize":
                name = "resize"
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "apply":
                name = "apply"
            elif isinstance(node, ast.Name) and node.id in allowed:
                name = node.id
            else:
                continue
            if where not in allowed[name]:
                found.append(f"arm_jax/{where}:{node.lineno}: {name}")
    assert found == []
