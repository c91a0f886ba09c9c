"""evaluate / predict / calibrate on real files: an authors'-format .pth, PNG faces, the CLI."""

import copy
import gc
import json
import logging

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from arm_jax.inference.calibrate import calibrate_gar
from arm_jax.data.synthetic import CLASS_NAMES, SyntheticSplit
from tests.numpy_preprocess import host_preprocess
from arm_jax.errors import UserError
from arm_jax.inference.evaluate import predict_split
from arm_jax.inference.runner import batched_logits
from arm_jax.interop.model_files import load_any_model, save_model
from arm_jax.models import with_runtime
from arm_jax.inference.predict import predict
from cli.main import cli

torch = pytest.importorskip("torch")
from arm_jax.interop.torch_reference import randomised_arm

SIZE = 96  # a 3x3 representation: enough for a random model to spread its predictions
BATCH = 32


@pytest.fixture(scope="module")
def authors_checkpoint(tmp_path_factory):
    """A randomly initialised ARM model saved the way the authors' training script saves it."""
    model = randomised_arm(0, image_size=SIZE)
    with torch.no_grad():  # a spread of classes, so that agreeing predictions mean something
        model.fc.weight.normal_(0.0, 30.0, generator=torch.Generator().manual_seed(1))
        model.fc.bias.zero_()
    path = tmp_path_factory.mktemp("authors") / "ARM_epoch70.pth"
    torch.save({"iter": 70, "model_state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return path, model.eval()


def torch_batch_logits(torch_model, split, batch_size: int) -> np.ndarray:
    """The PyTorch model over the split in file order, batch by batch (its GAR is per batch)."""
    outputs = []
    for start in range(0, len(split), batch_size):
        images = np.stack([split[i]["image"] for i in range(start, min(start + batch_size, len(split)))])
        x = host_preprocess(images, np.zeros((len(images), 4), np.int32), image_size=SIZE)
        with torch.no_grad():
            outputs.append(torch_model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy())
    return np.concatenate(outputs)


@pytest.mark.slow  # fast tier: both frameworks over 101 images (16 s of CPU)
def test_authors_checkpoint_predictions_match_pytorch(authors_checkpoint):
    path, torch_model = authors_checkpoint
    split = SyntheticSplit("test", size=3 * BATCH + 5)  # a short last batch too
    loaded = load_any_model(path).named(CLASS_NAMES, "test")
    model = with_runtime(loaded.model, gar_mode="batch")
    expected = torch_batch_logits(torch_model, split, BATCH)
    from arm_jax.data.pipeline import make_loader

    loader = make_loader(split, batch_size=BATCH, seed=0, epoch=0, train=False, image_size=SIZE)
    got = np.concatenate([logits for _, logits in batched_logits(loaded, model, iter(loader))])
    assert np.abs(got - expected).max() <= 1e-3  # uint8 -> 224 resize on device vs numpy twin, then the net
    labels, predictions = predict_split(loaded, model, split, batch_size=BATCH, seed=0, shuffled=False)
    np.testing.assert_array_equal(labels, split.labels)
    np.testing.assert_array_equal(predictions, expected.argmax(-1))
    assert len(set(predictions.tolist())) >= 2


def _png_cell_shades(path, rows: int, columns: int) -> np.ndarray:
    """The red level inside each cell of report.confusion_png's grid (64 px cells at (120, 90))."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    return np.array([[pixels[90 + 64 * i + 56, 120 + 64 * j + 56, 0] for j in range(columns)] for i in range(rows)])


@pytest.mark.slow  # three evaluations of the 700 test images
def test_evaluate_cli_json_table_and_png(authors_checkpoint, tmp_path):
    path, torch_model = authors_checkpoint
    runner = CliRunner()
    base = ["evaluate", "--checkpoint", str(path), "--dataset", "synthetic", "--gar", "batch", "--batch-size", "64"]
    result = runner.invoke(cli, [*base, "--json", "-", "--png", str(tmp_path / "cm.png")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    confusion = np.asarray(report["confusion"])
    assert confusion.sum() == report["count"] == 700 and report["shuffled"] and report["batch_size"] == 64
    # Rows are the TRUE classes: each row holds that class's 100 test images (predictions are not balanced).
    labels = SyntheticSplit("test").labels
    np.testing.assert_array_equal(confusion.sum(axis=1), np.bincount(labels, minlength=7))
    assert report["wa"] == pytest.approx(np.trace(confusion) / confusion.sum())
    recalls = np.diag(confusion) / confusion.sum(axis=1)
    assert report["ua"] == pytest.approx(recalls.mean())
    assert [report["per_class"][name] for name in CLASS_NAMES] == pytest.approx(list(recalls))
    assert report["class_names"] == list(CLASS_NAMES)
    # The PNG draws that matrix, row-normalised, a row per true class.
    shades = _png_cell_shades(tmp_path / "cm.png", 7, 7)
    np.testing.assert_array_equal(shades, (255 * (1 - confusion / confusion.sum(axis=1, keepdims=True))).astype(int))

    # --no-shuffle: file order, so the batches (and the batch GARs) are PyTorch's in file order.
    table = runner.invoke(cli, [*base, "--no-shuffle", "--json", str(tmp_path / "ordered.json"),
                                "--png", str(tmp_path / "cm2.png")])
    assert table.exit_code == 0 and "WA (accuracy)" in table.output and "batch size 64 (in file order, seed 0)" in table.output
    ordered = np.asarray(json.loads((tmp_path / "ordered.json").read_text())["confusion"])
    expected = np.zeros((7, 7), np.int64)
    np.add.at(expected, (labels, torch_batch_logits(torch_model, SyntheticSplit("test"), 64).argmax(-1)), 1)
    np.testing.assert_array_equal(ordered, expected)
    # Shuffled batches hold other images together, so batch-GAR predictions change; --seed picks the order.
    other_seed = runner.invoke(cli, [*base, "--seed", "1", "--json", "-", "--png", str(tmp_path / "cm3.png")])
    reseeded = np.asarray(json.loads(other_seed.stdout)["confusion"])
    assert not np.array_equal(confusion, ordered) and not np.array_equal(confusion, reseeded)


def test_running_gar_is_required_or_calibrated(authors_checkpoint):
    path, _ = authors_checkpoint
    result = CliRunner().invoke(cli, ["evaluate", "--checkpoint", str(path), "--dataset", "synthetic"])
    assert result.exit_code == 2 and "has no running GAR" in result.output and "--calibrate" in result.output
    bad = CliRunner().invoke(cli, ["evaluate", "--checkpoint", str(path), "--gar", "mean"])
    assert bad.exit_code == 2 and "--gar" in bad.output and "'batch'" in bad.output


@pytest.mark.slow  # fast tier: starts grain worker processes
def test_evaluating_with_workers_leaves_no_batch_to_the_cyclic_collector(authors_checkpoint):
    """With workers, predictions are those without, and the loader is closed: grain keeps each
    worker's last batch in a reference cycle that only the cyclic collector frees, at exit too
    late for grain to unlink its shared memory (the resource tracker then warns of leaked
    shared_memory objects); closing collects it while grain can."""
    from grain.multiprocessing import SharedMemoryArray

    path, _ = authors_checkpoint
    loaded = load_any_model(path).named(CLASS_NAMES, "test")
    model = with_runtime(loaded.model, gar_mode="batch")
    split = SyntheticSplit("test", size=2 * BATCH + 5)
    expected = predict_split(loaded, model, split, batch_size=BATCH, seed=0, shuffled=False)
    gc.collect()
    gc.disable()  # so that nothing but the loader's close collects the cycle
    try:
        got = predict_split(loaded, model, split, batch_size=BATCH, seed=0, shuffled=False, worker_count=2)
        gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds now stays in gc.garbage, to look at
        gc.collect()
        left = [type(item).__name__ for item in gc.garbage if isinstance(item, SharedMemoryArray)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_calibrated_gar_is_the_mean_of_the_batch_gars(authors_checkpoint):
    """Calibration averages the training-mode GARs of ALL its batches, here against PyTorch's."""
    path, torch_model = authors_checkpoint
    loaded = load_any_model(path).named(CLASS_NAMES, "test")
    split, batch_size = SyntheticSplit("train", size=48), 16
    calibrated = calibrate_gar(loaded, split, batch_size=batch_size, seed=0, progress=False)
    # Second implementation: the PyTorch model in training mode (BatchNorm on batch statistics) over
    # the same shuffled batches calibration draws, each batch's mean representation, then their mean.
    from arm_jax.data.pipeline import make_loader

    loader = make_loader(split, batch_size=batch_size, seed=0, epoch=0, train=False, image_size=SIZE,
                         shuffle_eval=True)
    reference = copy.deepcopy(torch_model).train()
    batch_gars = []
    for batch in loader:
        x = host_preprocess(batch["image"], np.zeros((len(batch["image"]), 4), np.int32), image_size=SIZE)
        with torch.no_grad():
            arm = reference.arm
            arranged = arm.arrange(reference.features(torch.from_numpy(x).permute(0, 3, 1, 2)))
            planes = torch.cat([arm.de_albino(arranged[:, c : c + 1]) for c in range(arranged.shape[1])], dim=1)
            batch_gars.append(arm.bn(planes).mean(dim=1).mean(dim=0).numpy().reshape(-1))
    assert len(batch_gars) == 3
    expected = np.mean(batch_gars, axis=0)
    got = np.asarray(calibrated.variables["gar"]["arm"]["affinity"]["mean"]).reshape(-1)
    np.testing.assert_allclose(got, expected, atol=2e-3)
    # The batches' GARs differ far more than that: the last batch alone, or an average that
    # weights the batches unequally (an EMA), would not pass.
    assert np.abs(batch_gars[-1] - expected).max() > 0.05, batch_gars
    assert calibrated.gar_calibrated and not loaded.gar_calibrated


def test_calibration_stopped_by_unreadable_images_closes_its_loader(tmp_path, rng):
    """Training images that are gone when calibration reads them stop it early with a DatasetError,
    whose traceback (which a caller such as a notebook keeps) holds the loader's iterators:
    they must be closed, not left open for as long as the traceback lives."""
    import grain

    from arm_jax.data.base import FileSplit
    from arm_jax.errors import DatasetError
    from tests.fixtures import write_image
    from tests.small_models import small_model

    names = [f"face{i}.png" for i in range(16)]
    for name in names:
        write_image(tmp_path / name, rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    split = FileSplit("faces/train", CLASS_NAMES, np.arange(16) % 7, tmp_path, names, "RGB")
    for name in names[1:15]:  # most gone after the split was opened (a folder cleaned meanwhile); the
        if name not in ("face5.png", "face10.png"):  # ones make_loader decodes for their size remain
            (tmp_path / name).unlink()
    with pytest.raises(DatasetError, match="cannot be decoded") as stopped:
        calibrate_gar(small_model(64, calibrated=False), split, batch_size=8, progress=False)
    gc.collect()
    # grain's iterators mark themselves closed (`_closed`); an open one keeps its buffers and workers.
    left_open = [type(item).__name__ for item in gc.get_objects()
                 if isinstance(item, grain.DatasetIterator) and not getattr(item, "_closed", True)]
    assert stopped.traceback and left_open == []


def test_calibrate_command_writes_the_gar_at_the_given_batch_size(authors_checkpoint, tmp_path):
    """`arm-jax calibrate --batch-size B` stores the GAR that calibration at batch B computes."""
    path, _ = authors_checkpoint
    result = CliRunner().invoke(cli, ["calibrate", "--checkpoint", str(path), "--dataset", "synthetic",
                                      "--output", str(tmp_path / "model"), "--batch-size", "16",
                                      "--max-examples", "48"])
    assert result.exit_code == 0, result.output
    written = load_any_model(tmp_path / "model")
    assert written.gar_calibrated and int(written.variables["gar"]["arm"]["affinity"]["count"]) == 48
    expected = calibrate_gar(load_any_model(path), SyntheticSplit("train"), batch_size=16, max_examples=48,
                             progress=False)
    np.testing.assert_array_equal(written.variables["gar"]["arm"]["affinity"]["mean"],
                                  expected.variables["gar"]["arm"]["affinity"]["mean"])
    assert not np.allclose(expected.variables["gar"]["arm"]["affinity"]["mean"],  # batch size matters
                           calibrate_gar(load_any_model(path), SyntheticSplit("train"), batch_size=48,
                                         max_examples=48, progress=False).variables["gar"]["arm"]["affinity"]["mean"],
                           atol=1e-3)


def test_calibrate_names_a_nameless_model_as_told_or_warns(authors_checkpoint, tmp_path, caplog):
    """A .pth carries no names: calibrate writes the order given by --model-classes, else warns."""
    from arm_jax.data.classes import dataset_classes
    from arm_jax.inference.calibrate import calibrate_job

    path, _ = authors_checkpoint
    told = calibrate_job(path, "synthetic", None, tmp_path / "raf", batch_size=16, max_examples=16,
                         progress=False, model_classes="raf_db")
    assert told.class_names == load_any_model(tmp_path / "raf").class_names == dataset_classes("raf_db")
    runner_log = logging.getLogger("arm_jax.inference.runner")
    runner_log.addHandler(caplog.handler)  # direct: the CLI may have stopped 'arm_jax' propagating
    try:
        assumed = calibrate_job(path, "synthetic", None, tmp_path / "assumed", batch_size=16,
                                max_examples=16, progress=False)
    finally:
        runner_log.removeHandler(caplog.handler)
    assert assumed.class_names == dataset_classes("synthetic") != dataset_classes("raf_db")
    assert "carries no class names: assuming synthetic's order" in caplog.text


@pytest.mark.slow
def test_evaluate_calibrate_runs_at_the_training_batch_size(authors_checkpoint, monkeypatch):
    """`evaluate --calibrate --calibrate-batch-size B` calibrates on the train split at batch B."""
    import arm_jax.inference.evaluate as evaluate_module

    path, _ = authors_checkpoint
    seen = []

    def recording_calibrate_gar(loaded, train_split, **options):  # the real calibration, observed
        seen.append((train_split.name, options["batch_size"]))
        return calibrate_gar(loaded, train_split, **options)

    monkeypatch.setattr(evaluate_module, "calibrate_gar", recording_calibrate_gar)
    result = CliRunner().invoke(cli, ["evaluate", "--checkpoint", str(path), "--dataset", "synthetic",
                                      "--calibrate", "--calibrate-batch-size", "32", "--json", "-",
                                      "--png", str(path.parent / "cm.png")])
    assert result.exit_code == 0, result.output
    assert len(seen) == 1 and seen[0][1] == 32 and "train" in seen[0][0]
    assert json.loads(result.stdout)["gar"] == "running"


def test_bad_records_stop_evaluation(authors_checkpoint, tmp_path, rng):
    from tests.fixtures import write_raf_db_missing_images

    path, _ = authors_checkpoint
    data = write_raf_db_missing_images(tmp_path / "raf", rng)
    # The test split is fine; --calibrate must read the training split, whose bad records stop it.
    result = CliRunner().invoke(cli, ["evaluate", "--checkpoint", str(path), "--dataset", "raf_db", "--data-dir",
                                      str(data), "--calibrate", "--png", str(tmp_path / "cm.png")])
    assert result.exit_code == 2, result.output
    assert "7 bad record(s)" in result.output and "... and 2 more" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "cm.png").exists()


@pytest.mark.slow  # fast tier: calibrates, then predicts at several batch compositions (20 s under load)
def test_predict_answers_per_image_independently(authors_checkpoint, tmp_path):
    path, _ = authors_checkpoint
    loaded = calibrate_gar(load_any_model(path).named(CLASS_NAMES, "test"), SyntheticSplit("train", size=64),
                           batch_size=32, progress=False)
    model_dir = save_model(tmp_path / "model", loaded.variables, loaded.model, loaded.class_names)
    faces = tmp_path / "faces"
    faces.mkdir()
    split = SyntheticSplit("test", size=5)
    for i in range(5):
        Image.fromarray(split[i]["image"]).save(faces / f"face{i}.png")
    together = predict(model_dir, [faces], batch_size=5)
    alone = [predict(model_dir, [faces / f"face{i}.png"])[0] for i in (0, 3)]
    assert [p.path for p in together] == [str(faces / f"face{i}.png") for i in range(5)]
    for single in alone:
        match = next(p for p in together if p.path == single.path)
        assert match.label == single.label
        for name in CLASS_NAMES:
            assert match.probabilities[name] == pytest.approx(single.probabilities[name], abs=1e-5)

    result = CliRunner().invoke(cli, ["predict", "--checkpoint", str(model_dir), str(faces), "--json", "-"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["path"] for row in rows] == [p.path for p in together]
    assert all(abs(sum(row["probabilities"].values()) - 1) < 1e-4 for row in rows)

    (faces / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match="broken.jpg: not a readable image"):
        predict(model_dir, [faces])


def test_predict_refuses_an_uncalibrated_model(authors_checkpoint, tmp_path):
    path, _ = authors_checkpoint
    image = tmp_path / "face.png"
    Image.fromarray(SyntheticSplit("test", size=1)[0]["image"]).save(image)
    with pytest.raises(UserError, match="calibrate"):
        predict(path, [image])
