"""train() with the options the other tests reach only below the loop: `--parallel pmap` (and
its resume), `--sampler mrr`, `dtype=bfloat16` and `--pretrained FILE`.

Every run is test_train's TINY (96 px, batch 16: the train step it compiles comes from the
session's compilation cache after the first) cut to 32 training images (2 steps an epoch) and
stopped where the claim shows: most checks need one step.
"""

import json
import signal
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from arm_jax.training.checkpoints import Checkpoints
from arm_jax.training.config import TrainConfig
from arm_jax.training.loop import train
from tests import fixtures as fx
from tests.test_train import TINY, _assert_same_run, _final

SHORT = dict(TINY, max_train_examples=32, epochs=1)  # 2 steps


def _run(workdir, *, stop_at=None, **overrides):
    """train() on SHORT + overrides; with stop_at, a stop is requested after that step."""
    hook = None if stop_at is None else (lambda step, stop: step == stop_at and stop.request(signal.SIGTERM))
    summary = train(TrainConfig(**{**SHORT, **overrides}, workdir=str(workdir)), after_step=hook)
    if stop_at is not None:
        assert summary["status"] == "interrupted" and summary["step"] == stop_at
    return summary


def _stored(workdir, item: str):
    """A checkpoint item ('variables', 'optimizer') as written: stored dtypes, no target to cast to."""
    step = Checkpoints(workdir).latest_step()
    return ocp.PyTreeCheckpointer().restore(Path(workdir, "checkpoints", str(step), item).absolute())


def _progress(workdir) -> dict:
    step = Checkpoints(workdir).latest_step()
    directory = Path(workdir, "checkpoints", str(step), "progress")
    files = [p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("_")]
    return json.loads(files[0].read_text()) if len(files) == 1 else \
        ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(directory.absolute())


def _first_step_loss(workdir) -> float:
    sums = _progress(workdir)["sums"]
    assert sums["count"] == SHORT["batch_size"]
    return sums["loss_sum"] / sums["count"]


def _flat(tree) -> dict:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


@pytest.fixture(scope="module")
def first_step(tmp_path_factory):
    """The float32 `--parallel none` run stopped after its first step (the reference of this module)."""
    workdir = tmp_path_factory.mktemp("first_step")
    _run(workdir, stop_at=1)
    return workdir


# -- --parallel pmap -------------------------------------------------------------------------

# pmap compiles another program (its collectives), which rounds differently. Adam's first
# step is about lr x sign(gradient), so a gradient at rounding level moves +lr in one run and
# -lr in the other: measured 2e-3 (2 lr) on one bn1 bias entry after one step; over 12 steps
# float32 runs part by up to 0.5 relative (float64 runs agree to 1.8e-11; tests/test_parallel.py).
# So what is compared is what the first step computed, with bounds that hold on any CPU:
# - the BatchNorm/GAR statistics, from the forward pass, which is continuous in the rounding
#   (ReLU and max-pool are continuous): a few float32 roundings (~1e-7) apart, amplified by the
#   network's forward conditioning, not chaotically. Bound: 1e-4 of each array's largest
#   magnitude (the GAR's scale: 1, BatchNorm-normalised values); measured 1.2e-6 absolute at most;
# - the gradient (Adam's first moment, 0.1 x the gradient after one step) per array, relative L2.
#   A ReLU input within rounding of zero passes or blocks its gradient depending on the kernels'
#   rounding, and one such flip moves a tensor by up to 2e-2 (tests/test_parity.py, where all the
#   near-zero ReLUs flipping at once moved the worst tensor by 2.9e-2): measured here 5.4e-3 with
#   Eigen's convolutions, 6.3e-6 with YNNPACK's (no flip). Bound: 1e-1, as test_parity's float32
#   gradients with their own ReLU decisions; a wrong gradient (another batch, a missing term) is
#   off by O(1).
# Parameters then follow from the gradients: both runs took Adam's first step from the same start.
PMAP_GRADIENT_RTOL = 1e-1
PMAP_STATS_TOLERANCE = 1e-4
PMAP_PARAM_ATOL = 1e-6  # float32 rounding: a few ulps of parameters of magnitude <= 1 (measured 1.2e-7); a step of lr = 1e-3 is what could go wrong


def _adam_moments(workdir, which: str = "mu") -> dict:
    """Adam's first ('mu') or second ('nu') moment per parameter (key: the parameter's path)."""
    moments = {}
    for path, value in jax.tree_util.tree_leaves_with_path(_stored(workdir, "optimizer")):
        names = tuple(getattr(p, "key", getattr(p, "idx", None)) for p in path)
        if which in names:
            moments[names[names.index(which) + 1:]] = np.asarray(value)
    return moments


@pytest.mark.slow
def test_parallel_pmap_through_train_resume_and_evaluate(tmp_path, first_step):
    """pmap's first step is none's; its SIGTERM resume is bitwise; its checkpoint evaluates as trained."""
    from arm_jax.data.splits import open_split
    from arm_jax.inference.evaluate import predict_split
    from arm_jax.interop.model_files import load_any_model
    from arm_jax.models import with_runtime
    from arm_jax.data.base import Subset

    stopped = tmp_path / "stopped"
    _run(stopped, stop_at=1, parallel="pmap")
    got, want = _flat(_stored(stopped, "variables")), _flat(_stored(first_step, "variables"))
    assert got.keys() == want.keys()
    worst = max(float(np.max(np.abs(got[k] - want[k]))) for k in want)
    print(f"pmap vs none after one step: largest difference {worst:.2e}")
    for key in want:  # same shapes: one unreplicated copy is saved, not one per device
        assert got[key].shape == want[key].shape and got[key].dtype == want[key].dtype, key
    got_mu, want_mu = _adam_moments(stopped), _adam_moments(first_step)
    got_nu, want_nu = _adam_moments(stopped, "nu"), _adam_moments(first_step, "nu")
    c = TrainConfig()

    def first_adam_step(mu, nu):  # optax.scale_by_adam at step 1 (bias-corrected), times lr
        return c.lr * (mu / (1 - c.b1)) / (np.sqrt(nu / (1 - c.b2)) + c.eps)

    assert got_mu.keys() == {k[1:] for k in want if k[0] == "params"}
    worst_mu = max(float(np.linalg.norm(got_mu[k] - v) / np.linalg.norm(v)) for k, v in want_mu.items())
    # Each statistic's difference in units of its array's scale (the GAR's: 1).
    stats = {k: float(np.abs(got[k] - v).max() / (1.0 if k[0] == "gar" else np.abs(v).max()))
             for k, v in want.items() if k[0] != "params" and k[-1] != "count"}
    worst_stats = max(stats.values())
    print(f"pmap vs none after one step: gradient {worst_mu:.2e} (relative L2, worst array), statistics {worst_stats:.2e} (of each array's scale)")
    for path, mu in want_mu.items():
        assert np.linalg.norm(got_mu[path] - mu) <= PMAP_GRADIENT_RTOL * np.linalg.norm(mu), path
        start = want[("params",) + path] + first_adam_step(mu, want_nu[path])
        np.testing.assert_allclose(got[("params",) + path], start - first_adam_step(got_mu[path], got_nu[path]),
                                   rtol=0, atol=PMAP_PARAM_ATOL, err_msg=str(path))
    assert len(stats) == 2 * 21 + 1 and worst_stats <= PMAP_STATS_TOLERANCE, max(stats, key=stats.get)
    for key in want:
        if key[-1] == "count":
            np.testing.assert_array_equal(got[key], want[key], err_msg=str(key))

    assert _run(stopped, parallel="pmap")["step"] == 2  # resumed mid-epoch
    whole = tmp_path / "whole"
    assert _run(whole, parallel="pmap")["step"] == 2
    _assert_same_run(_final(whole), _final(stopped))

    # The checkpoint loads as evaluate loads it and gives the validation WA the run logged.
    loaded = load_any_model(stopped)
    record = json.loads((stopped / "metrics.jsonl").read_text().splitlines()[-1])
    val = Subset(open_split("synthetic", None, "val"), SHORT["max_eval_examples"], TrainConfig().seed)
    labels, predicted = predict_split(loaded, with_runtime(loaded.model, gar_mode="running"), val,
                                      batch_size=SHORT["eval_batch_size"], seed=0, shuffled=False)
    assert float(np.mean(labels == predicted)) == pytest.approx(record["val_wa"], abs=1e-9)


# -- --sampler mrr ---------------------------------------------------------------------------

@pytest.mark.slow
def test_sampler_mrr_through_train(tmp_path, monkeypatch):
    """An imbalanced split (54 images, smallest class 5): an MRR epoch is 7 x 5 = 35 images, 5 of
    each class, 2 whole batches of 16 (shuffle would give 3), and 32 images are counted."""
    from arm_jax.data import sampling

    counts = [5, 12, 6, 9, 5, 7, 10]
    names = ["anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise"]
    rng = np.random.default_rng(0)
    images = lambda n: [fx.random_image(rng, (64, 64, 3)) for _ in range(n)]
    data = fx.write_class_folders(tmp_path / "data", {
        "train": {name: images(n) for name, n in zip(names, counts, strict=True)},
        "test": {name: images(1) for name in names}})

    epoch_sizes = []
    real = sampling.mrr_epoch_indices

    def recording(labels, **kwargs):
        indices = real(labels, **kwargs)
        epoch_sizes.append((len(indices), np.bincount(np.asarray(labels)[indices], minlength=7).tolist()))
        return indices

    monkeypatch.setattr(sampling, "mrr_epoch_indices", recording)
    workdir = tmp_path / "run"
    steps = []  # the loop numbers steps epoch x steps_per_epoch + batch: a wrong epoch length shows
    summary = train(TrainConfig(**{**TINY, "dataset": "folder", "max_train_examples": None, "epochs": 2,
                                   "sampler": "mrr"}, data_dir=str(data), workdir=str(workdir)),
                    after_step=lambda step, stop: steps.append(step))
    assert summary["status"] == "done" and summary["step"] == 4 and steps == [1, 2, 3, 4]  # 2 steps an epoch
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert (35, [5] * 7) in epoch_sizes  # every class gives the smallest class's count
    # The metrics count 32 images an epoch: train_acc is a whole number of 32ths.
    assert all(abs(r["train_acc"] * 32 - round(r["train_acc"] * 32)) < 1e-6 for r in records)
    assert records[-1]["lr"] == pytest.approx(1e-3 * 0.78)  # MRR's gamma


# -- bfloat16 --------------------------------------------------------------------------------

# Measured on the 2-core CPU: the first step's mean loss 2.0787 in bf16 against 2.0871 in float32,
# 4.1e-3 relative (bf16 keeps 8 bits of mantissa: 4e-3 relative per rounding). The bound is
# 5x that; a float32 computation gives the float32 loss exactly (checked: not equal), and wrong
# convolutions or statistics would be far off.
BF16_LOSS_RTOL = 2e-2


@pytest.mark.slow
def test_bfloat16_through_train_keeps_float32_state(tmp_path, first_step):
    _run(tmp_path, stop_at=1, dtype="bfloat16")
    for item in ("variables", "optimizer"):
        leaves = jax.tree_util.tree_leaves_with_path(_stored(tmp_path, item))
        floats = [(jax.tree_util.keystr(p), np.asarray(x).dtype) for p, x in leaves
                  if np.issubdtype(np.asarray(x).dtype, np.floating) or np.asarray(x).dtype.name == "bfloat16"]
        assert floats and all(dtype == np.float32 for _, dtype in floats), [f for f in floats if f[1] != np.float32]
    stored = _stored(tmp_path, "variables")
    assert {"params", "batch_stats", "gar"} <= set(stored)
    loss, reference = _first_step_loss(tmp_path), _first_step_loss(first_step)
    print(f"first-step loss bf16 {loss:.6f}, float32 {reference:.6f}")
    assert np.isfinite(loss) and loss != reference  # it did compute in bf16
    assert loss == pytest.approx(reference, rel=BF16_LOSS_RTOL)


# -- --pretrained FILE -----------------------------------------------------------------------

def _torchvision_resnet18_file(path: Path, seed: int, stats_shift: float = 0.0) -> dict:
    """A random torchvision-named resnet18 state dict as .safetensors (no PyTorch needed);
    returns its backbone as flax variables. Running statistics far from a fresh (0, 1)."""
    from arm_jax.interop.convert import expected_shapes, flax_to_torch, save_safetensors
    from arm_jax.models import ARMResNet18

    model = ARMResNet18(num_classes=1000, image_size=SHORT["image_size"], arrangement=False,
                        de_albino=False, affinity=False)
    rng = np.random.default_rng(seed)

    def draw(key_path, shape):
        name = jax.tree_util.keystr(key_path)
        if "'kernel'" in name:
            return rng.normal(0, np.sqrt(2 / max(1, int(np.prod(shape.shape[:-1])))), shape.shape)
        if "'var'" in name:
            return 2.0 + rng.random(shape.shape) + stats_shift
        if "'mean'" in name:
            return rng.normal(0.5, 0.5, shape.shape) + stats_shift
        if "'scale'" in name:
            return 0.5 + rng.random(shape.shape)
        return rng.normal(0, 0.1, shape.shape)

    variables = jax.tree_util.tree_map_with_path(
        lambda p, s: np.asarray(draw(p, s), s.dtype), expected_shapes(model))
    save_safetensors(flax_to_torch(variables, model, naming="torchvision"), path)
    return {c: _flat(variables[c]["backbone"]) for c in ("params", "batch_stats")}


@pytest.mark.slow
def test_pretrained_file_through_train(tmp_path, first_step):
    """The run starts from the file: after one Adam step (<= lr) the backbone is the file's; the
    running statistics are 0.9 x the file's + 0.1 x the batch's (two files that differ only in
    their statistics differ by exactly 0.9 x that); the head is the fresh one (the none run's)."""
    lr = TrainConfig().lr
    runs = {}
    for shift in (0.0, 1.0):
        weights = tmp_path / f"resnet18-{shift}.safetensors"
        source = _torchvision_resnet18_file(weights, seed=3, stats_shift=shift)
        _run(tmp_path / f"run-{shift}", stop_at=1, pretrained=str(weights))
        runs[shift] = source, _flat(_stored(tmp_path / f"run-{shift}", "variables"))

    source, trained = runs[0.0]
    for path, value in source["params"].items():
        moved = np.abs(trained[("params", "backbone") + path] - value).max()
        assert moved <= lr * 1.001, (path, moved)
    # With the file ignored both runs would start from the same fresh statistics.
    (_, a), (_, b) = runs[0.0], runs[1.0]
    for path in source["batch_stats"]:
        key = ("batch_stats", "backbone") + path
        np.testing.assert_allclose(a[key] - b[key], 0.9 * -1.0, rtol=0, atol=1e-4, err_msg=str(path))
    fresh = _flat(_stored(first_step, "variables"))
    for key in trained:
        if key[1] != "backbone" and key[0] == "params":
            # The head's first step depends on the backbone, so it is compared as "within one step".
            assert np.abs(trained[key] - fresh[key]).max() <= 2 * lr * 1.001, key


# -- evaluate against training's validation ------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("gar_mode", ["batch", "running"])
def test_evaluate_reports_the_validation_that_training_logged(tmp_path, gar_mode):
    """`arm-jax evaluate` on a run's checkpoint, its validation split, GAR mode and batch size
    (with the batch GAR, the batches shuffled as validation shuffles them: `--seed` the run's data
    seed; else in file order) reports the WA, UA, per-class accuracy and confusion matrix that the
    run logged for its last epoch: 14 validation images in batches of 8, so the short last batch
    counts too."""
    from arm_jax.training import loop

    from click.testing import CliRunner

    from cli.main import cli

    rng = np.random.default_rng(0)
    names = ["anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise"]
    # Each class a colour (plus noise): 96 px (a 3x3 representation; at 64 px the classifier
    # sees one number) learns them in a few epochs, so the answers differ between images.
    colours = rng.integers(0, 256, (len(names), 3))

    def faces(c: int, n: int) -> list[np.ndarray]:
        return [np.clip(colours[c] + rng.normal(0, 40, (64, 64, 3)), 0, 255).astype(np.uint8) for _ in range(n)]

    data = fx.write_class_folders(tmp_path / "data", {
        "train": {name: faces(c, 8) for c, name in enumerate(names)},
        "val": {name: faces(c, 2) for c, name in enumerate(names)},
        "test": {name: faces(c, 1) for c, name in enumerate(names)}})
    workdir = tmp_path / "run"
    train(TrainConfig(dataset="folder", data_dir=str(data), workdir=str(workdir), image_size=96, batch_size=8,
                      eval_batch_size=8, epochs=3, gar_mode=gar_mode, parallel="none", checkpoint_every_steps=0,
                      quiet=True))
    logged = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    latest = max((p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    # With the batch GAR an answer depends on its batch-mates: validation's batches, shuffled by the
    # data seed the run derives from its seed (loop._keys), are the ones to evaluate.
    order = ["--seed", str(loop._keys(TrainConfig().seed)[1])] if gar_mode == "batch" else ["--no-shuffle"]
    result = CliRunner().invoke(cli, ["evaluate", "--checkpoint", str(latest),
                                      "--dataset", "folder", "--data-dir", str(data), "--split", "val",
                                      "--gar", gar_mode, *order, "--batch-size", "8", "--json", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    print(json.dumps({"logged": {k: logged[k] for k in ("val_wa", "val_ua", "val_confusion")},
                      "evaluated": {k: report[k] for k in ("wa", "ua", "confusion")}}))
    assert report["confusion"] == logged["val_confusion"]
    assert report["wa"] == pytest.approx(logged["val_wa"], abs=1e-12)
    assert report["ua"] == pytest.approx(logged["val_ua"], abs=1e-12)
    assert report["per_class"] == pytest.approx(logged["val_per_class"], abs=1e-12)
