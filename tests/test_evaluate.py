"""evaluate / predict / calibrate on real files: an authors'-format .pth, PNG faces, the CLI."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from arm_jax.inference.calibrate import calibrate_gar
from arm_jax.data.synthetic import CLASS_NAMES, SyntheticSplit
from arm_jax.data.transforms import host_preprocess
from arm_jax.errors import UserError
from arm_jax.inference.evaluate import predict_split
from arm_jax.inference.runner import batched_logits
from arm_jax.interop.model_files import load_any_model, save_model
from arm_jax.models import with_runtime
from arm_jax.inference.predict import predict
from cli.main import cli
from tests.torch_reference import TorchARMResNet18, randomise_batchnorm

SIZE = 96  # a 3x3 representation: enough for a random model to spread its predictions
BATCH = 32


@pytest.fixture(scope="module")
def authors_checkpoint(tmp_path_factory):
    """A randomly initialised ARM model saved the way the authors' training script saves it."""
    torch.manual_seed(0)
    model = TorchARMResNet18(num_classes=7, image_size=SIZE)
    randomise_batchnorm(model, torch.Generator().manual_seed(0))
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


def test_evaluate_cli_json_table_and_png(authors_checkpoint, tmp_path):
    path, _ = authors_checkpoint
    runner = CliRunner()
    result = runner.invoke(cli, ["evaluate", "--checkpoint", str(path), "--dataset", "synthetic", "--gar", "batch",
                                 "--batch-size", "64", "--json", "-", "--png", str(tmp_path / "cm.png")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    confusion = np.asarray(report["confusion"])
    assert confusion.sum() == report["count"] == 700 and report["shuffled"] and report["batch_size"] == 64
    assert report["wa"] == pytest.approx(np.trace(confusion) / confusion.sum())
    recalls = np.diag(confusion) / confusion.sum(axis=1)
    assert report["ua"] == pytest.approx(recalls.mean())
    assert report["class_names"] == list(CLASS_NAMES)
    with Image.open(tmp_path / "cm.png") as image:
        assert image.size[0] > 300 and image.size[1] > 300

    table = runner.invoke(cli, ["evaluate", "--checkpoint", str(path), "--dataset", "synthetic", "--gar", "batch",
                                "--png", str(tmp_path / "cm2.png")])
    assert table.exit_code == 0 and "WA (accuracy)" in table.output and "batch size 64 (shuffled, seed 0)" in table.output


def test_running_gar_is_required_or_calibrated(authors_checkpoint):
    path, _ = authors_checkpoint
    result = CliRunner().invoke(cli, ["evaluate", "--checkpoint", str(path), "--dataset", "synthetic"])
    assert result.exit_code == 2 and "has no running GAR" in result.output and "--calibrate" in result.output
    bad = CliRunner().invoke(cli, ["evaluate", "--checkpoint", str(path), "--gar", "mean"])
    assert bad.exit_code == 2 and "--gar" in bad.output and "'batch'" in bad.output


def test_calibrated_gar_is_the_mean_representation(authors_checkpoint):
    path, _ = authors_checkpoint
    loaded = load_any_model(path).named(CLASS_NAMES, "test")
    split = SyntheticSplit("train", size=64)
    calibrated = calibrate_gar(loaded, split, batch_size=64, progress=False)
    # Second implementation: the training-mode GAR of one batch holding all 64 images,
    # which is what the running GAR accumulates during training.
    images = np.stack([split[i]["image"] for i in range(len(split))])
    x = host_preprocess(images, np.zeros((len(images), 4), np.int32), image_size=SIZE)
    _, updates = loaded.model.apply(loaded.variables, x, train=True, mutable=["batch_stats", "gar"])
    expected = updates["gar"]["arm"]["affinity"]["mean"]  # the first update takes the batch GAR as is
    np.testing.assert_allclose(calibrated.variables["gar"]["arm"]["affinity"]["mean"], expected, rtol=1e-4, atol=1e-5)
    assert calibrated.gar_calibrated and not loaded.gar_calibrated


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
