"""The training loop: config checks, exact resume (epoch boundary and SIGTERM mid-epoch),
NaN stop, and an end-to-end run on the synthetic faces (`trained_workdir`, reused by the
evaluate/predict tests)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from arm_jax.training.checkpoints import Checkpoints, load_model_from_checkpoint
from arm_jax.training.config import TrainConfig, from_overrides
from arm_jax.errors import UserError
from arm_jax.training.loop import LossIsNaN, train

REPO = Path(__file__).resolve().parents[1]
# 96 px, not 64: at 64 the ARM representation is 1x1 (one BN-normalised value, a
# degenerate GAR); at 96 it is 3x3. 96 records / 16 = 6 steps per epoch; 32 validation
# images = 1 batch.
TINY = dict(dataset="synthetic", image_size=96, batch_size=16, eval_batch_size=32,
            max_train_examples=96, max_eval_examples=32, epochs=2, parallel="none",
            checkpoint_every_steps=0, quiet=True)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Share compiled steps between this module's runs (and its subprocess): same HLO."""
    directory = str(tmp_path_factory.mktemp("jax_cache"))
    old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield directory
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


def _final(workdir):
    """(variables, metrics.jsonl records without timings) of a finished run."""
    _, _, variables = load_model_from_checkpoint(workdir, which="latest")
    records = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        r.pop("time_s"), r.pop("images_per_s")
    return jax.tree.map(np.asarray, variables), records


def _assert_same_run(a, b):
    (va, ra), (vb, rb) = a, b
    assert ra == rb
    for x, y in zip(jax.tree.leaves(va), jax.tree.leaves(vb), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)  # bitwise


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    summary = train(TrainConfig(**TINY, workdir=str(workdir)))
    assert summary["status"] == "done" and summary["step"] == 12
    return _final(workdir)


def test_config_rejects_unknown_and_bad_options(tmp_path):
    with pytest.raises(UserError, match="unknown training option.*colour"):
        from_overrides({"colour": 1})
    with pytest.raises(UserError, match="sampler.*shuffle, mrr"):
        TrainConfig(sampler="random")
    with pytest.raises(UserError, match="epochs"):
        TrainConfig().replace(epochs="3")
    assert TrainConfig(sampler="mrr").lr_gamma == 0.78 and TrainConfig().lr_gamma == 0.9
    with pytest.raises(UserError, match="data_dir.*synthetic"):  # --data-dir without --dataset
        TrainConfig(data_dir=str(tmp_path))


def test_tensorboard_without_tensorboardx_is_a_clear_error(tmp_path):
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="needs the tensorboardX package"):
            train(TrainConfig(**TINY, workdir=str(tmp_path), tensorboard=True))
    else:
        pytest.skip("tensorboardX is installed")


def test_resume_at_an_epoch_boundary_is_bitwise(tmp_path, reference_run):
    first = train(TrainConfig(**{**TINY, "epochs": 1}, workdir=str(tmp_path)))
    assert first["epochs"] == 1
    with pytest.raises(UserError, match="different config.*lr"):
        train(TrainConfig(**TINY, workdir=str(tmp_path), lr=0.1))
    second = train(TrainConfig(**TINY, workdir=str(tmp_path)))  # only epochs raised: resumes
    assert second["status"] == "done" and second["step"] == 12
    _assert_same_run(reference_run, _final(tmp_path))


def test_sigterm_mid_epoch_saves_and_resumes_bitwise(tmp_path, reference_run, compilation_cache):
    args = [sys.executable, "-m", "cli.train", "--workdir", str(tmp_path), "--quiet"]
    for key, value in TINY.items():
        if key != "quiet":
            flag = {"checkpoint_every_steps": "checkpoint-every", "worker_count": "workers"}.get(key, key)
            args += [f"--{flag.replace('_', '-')}", str(value)]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=compilation_cache, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # wait until one step is done, then ask it to stop
        seen.append(line)
        if "first step done" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, "".join(seen) + err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM"
    assert summary["epoch"] == 0 and 1 <= summary["batches_done"] < 6  # mid-epoch
    assert Checkpoints(tmp_path).latest_step() == summary["batches_done"]
    assert "saved a checkpoint" in err

    resumed = train(TrainConfig(**TINY, workdir=str(tmp_path)))
    assert resumed["status"] == "done" and resumed["step"] == 12
    _assert_same_run(reference_run, _final(tmp_path))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = TrainConfig(**{**TINY, "epochs": 1, "checkpoint_every_steps": 1}, lr=1e30,
                         workdir=str(tmp_path))
    with pytest.raises(LossIsNaN, match=r"at step (\d+)") as caught:
        train(config)
    nan_step = int(caught.value.args[0].split("at step ")[1].split()[0])
    last = Checkpoints(tmp_path).latest_step()
    assert last is not None and last == nan_step - 1
    _, _, variables = load_model_from_checkpoint(tmp_path, which="latest")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(variables))


# -- end to end ---------------------------------------------------------------------------

# 2 epochs of the 2,100 synthetic training faces, from scratch: ~2.5 min on 2 CPU cores.
# Measured val WA (700 images) 0.23 / 0.55 / 0.71 after epochs 1 / 2 / 3.
E2E = dict(dataset="synthetic", image_size=96, batch_size=32, eval_batch_size=64, epochs=2,
           max_eval_examples=350, parallel="none", checkpoint_every_steps=0, quiet=True)
E2E_MIN_ACCURACY = 0.4  # chance is 1/7
# Measured 0.59: after 2 epochs the running GAR is an average over the last ~10 noisy batch GARs
# of a fast-changing model, while calibration averages 2,100 images; with BatchNorm's running
# statistics instead of batch statistics the difference was 1.03 and the accuracy lower.
CALIBRATION_TOLERANCE = 0.75


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """A workdir trained on the synthetic faces: checkpoints (best/latest), metrics.jsonl."""
    workdir = tmp_path_factory.mktemp("trained")
    summary = train(TrainConfig(**E2E, workdir=str(workdir)))
    assert summary["status"] == "done"
    return workdir


@pytest.mark.slow
def test_trains_well_above_chance_on_synthetic_faces(trained_workdir):
    records = [json.loads(x) for x in (trained_workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    best = max(r["val_wa"] for r in records)
    assert best >= E2E_MIN_ACCURACY, records
    arch, names, _ = load_model_from_checkpoint(trained_workdir, which="best")
    assert arch["num_classes"] == 7 and len(names) == 7 and arch["image_size"] == 96


@pytest.mark.slow
def test_evaluate_predict_and_calibrate_on_the_trained_checkpoint(trained_workdir, tmp_path):
    """The trained workdir through the user's commands: evaluate, predict, calibrate."""
    from click.testing import CliRunner
    from PIL import Image

    from arm_jax.inference.calibrate import calibrate_gar
    from arm_jax.data.synthetic import SyntheticSplit
    from arm_jax.inference.evaluate import predict_split
    from arm_jax.interop.model_files import LoadedModel, load_any_model
    from arm_jax.models import with_runtime
    from cli.main import cli

    runner = CliRunner()
    result = runner.invoke(cli, ["evaluate", "--checkpoint", str(trained_workdir), "--dataset", "synthetic",
                                 "--json", "-", "--png", str(tmp_path / "cm.png")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["gar"] == "running" and report["count"] == 700
    assert report["wa"] >= E2E_MIN_ACCURACY - 0.05, report

    # predict: image files in, one answer per file, the same answers as evaluation's pipeline.
    test = SyntheticSplit("test", size=35)
    faces = tmp_path / "faces"
    faces.mkdir()
    for i in range(len(test)):
        Image.fromarray(test[i]["image"]).save(faces / f"{i:03d}.png")
    result = runner.invoke(cli, ["predict", "--checkpoint", str(trained_workdir), str(faces), "--json", "-"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [Path(r["path"]).name for r in rows] == [f"{i:03d}.png" for i in range(len(test))]
    loaded = load_any_model(trained_workdir)
    model = with_runtime(loaded.model, gar_mode="running")
    _, evaluated = predict_split(loaded, model, test, batch_size=16, seed=0, shuffled=False)
    agreement = np.mean([r["label"] == int(p) for r, p in zip(rows, evaluated)])
    assert agreement >= 0.9  # host (PIL) vs device resizing of 64 -> 96 px may flip a near tie

    # calibrate: the GAR estimated from training images is close to the training-time running value,
    # and evaluating with it gives nearly the same accuracy.
    trained_gar = np.asarray(loaded.variables["gar"]["arm"]["affinity"]["mean"])
    calibrated = calibrate_gar(LoadedModel(loaded.model, loaded.variables, loaded.class_names),
                               SyntheticSplit("train"), batch_size=E2E["batch_size"], progress=False)
    estimate = np.asarray(calibrated.variables["gar"]["arm"]["affinity"]["mean"])
    relative = np.linalg.norm(estimate - trained_gar) / np.linalg.norm(trained_gar)
    print(f"calibrated vs training-time running GAR: relative difference {relative:.3f}")
    assert relative <= CALIBRATION_TOLERANCE
    val = SyntheticSplit("val")
    accuracies = [np.mean(predict_split(m, model, val, batch_size=64, seed=0, shuffled=False)[1] == val.labels)
                  for m in (loaded, calibrated)]
    print(f"val WA with the training-time GAR {accuracies[0]:.3f}, with the calibrated GAR {accuracies[1]:.3f}")
    assert abs(accuracies[0] - accuracies[1]) <= 0.05
