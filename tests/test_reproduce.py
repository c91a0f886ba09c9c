"""`arm-jax reproduce`: its plans and commands, SLURM arrays, missing data sets, results beside the
paper's numbers, progress lines and figures (fast); a scaled-down `table2` end to end, a second
invocation that trains nothing and an interrupted row that resumes (slow)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from arm_jax.errors import UserError
from arm_jax.inference.evaluate import EvaluationReport
from arm_jax.reproduce import plots
from arm_jax.reproduce.plan import Options, build_plan
from arm_jax.reproduce.results import collect, render_markdown, write_results
from arm_jax.reproduce.runner import Progress, is_finished
from arm_jax.reproduce.targets import ROWS
from arm_jax.training.config import TrainConfig, check_resumable, from_overrides, save_config
from cli.main import cli
from cli.reproduce import expand_seeds
from tests.fixtures import random_image, write_raf_db

REPO = Path(__file__).resolve().parents[1]
RAF_CLASSES = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")
SCALED = ["--epochs", "1", "--image-size", "64", "--batch-size", "4", "--pretrained", "none", "--workers", "0"]


def raf_root(tmp_path: Path, train_per_class: int = 2) -> Path:
    """A data root holding RAF-DB as distributed (RAF-DB/basic/...): 100x100 JPEGs, 7 test images."""
    rng = np.random.default_rng(0)
    entries = [(f"train_{i:05d}.jpg", 1 + i % 7, random_image(rng, (100, 100, 3)))
               for i in range(1, 7 * train_per_class + 1)]
    entries += [(f"test_{i:04d}.jpg", 1 + i % 7, random_image(rng, (100, 100, 3))) for i in range(1, 8)]
    write_raf_db(tmp_path / "data" / "RAF-DB" / "basic", entries)
    return tmp_path / "data"


def trained_config(words: list[str]) -> TrainConfig:
    """The TrainConfig an `arm-jax train ...` command line trains (parsed by the real command)."""
    from cli.train import train

    params = dict(train.make_context("train", words[2:]).params)
    params.pop("verbose")
    return from_overrides(params)


def command_lines(text: str, command: str) -> list[list[str]]:
    return [shlex.split(line.strip()) for line in text.splitlines() if line.strip().startswith(f"arm-jax {command}")]


# ---- plans and commands ----------------------------------------------------------------------

def test_dry_run_names_every_row_and_its_commands_train_the_planned_configs(tmp_path):
    root, out = raf_root(tmp_path), tmp_path / "out"
    result = CliRunner().invoke(cli, ["reproduce", "table2", "--data-root", str(root), "--out", str(out),
                                      "--seeds", "0", "1", "--dry-run", *SCALED])
    assert result.exit_code == 0, result.output
    plan = build_plan(Options("table2", root, out, seeds=(0, 1), epochs=1, image_size=64, batch_size=4,
                              pretrained="none", workers="0"))
    for row in ROWS["table2"]:
        assert f"# table2 {row.name}" in result.output
    # 64 px: a 2x2 backbone map, smaller than the raw De-albino's 3x3 kernel of rows DA and DA+SA.
    assert {row.name for row, _ in plan.left_out} == {"da", "da-sa"}
    assert "# table2 da: left out (does not fit 64 px" in result.output and "3x3 kernel" in result.output
    trains = command_lines(result.output, "train")
    assert [trained_config(words) for words in trains] == [run.config for run in plan.runs]
    assert len(plan.runs) == 10  # 5 rows x 2 seeds
    from cli.evaluate import evaluate

    evaluations = [evaluate.make_context("evaluate", words[2:]).params
                   for words in command_lines(result.output, "evaluate")]
    expected = [(str(run.workdir), gar) for run in plan.runs for gar in run.gar_modes]
    assert [(str(p["checkpoint"]), p["gar"]) for p in evaluations] == expected
    assert all(p["split"] == "test" and p["batch_size"] == 64 for p in evaluations)
    assert not out.exists()  # a dry run writes nothing


def test_table3_uses_each_data_sets_recipe_and_fig6_names_the_kernels_that_do_not_fit(tmp_path):
    root = raf_root(tmp_path)
    (root / "fer2013").mkdir()
    (root / "fer2013" / "fer2013.csv").write_text("emotion,pixels,Usage\n")
    (root / "AffectNet" / "Manually_Annotated_file_lists").mkdir(parents=True)
    plan = build_plan(Options("table3", root, tmp_path / "out", dtype="bfloat16"))
    configs = {run.row.name: run.config for run in plan.runs}
    assert set(configs) == {"raf_db", "fer2013", "affectnet7", "affectnet8"}
    assert configs["raf_db"].data_dir == str(root / "RAF-DB" / "basic")
    for name, config in configs.items():
        assert (config.epochs, config.batch_size, config.image_size, config.pretrained, config.dtype) == \
            (70, 256, 224, "imagenet", "bfloat16")
        assert config.sampler == ("mrr" if name.startswith("affectnet") else "shuffle")
        assert config.lr_gamma == (0.78 if name.startswith("affectnet") else 0.9)
    fig6 = build_plan(Options("fig6", root, tmp_path / "out", image_size=96))
    assert [run.config.raw_kernel for run in fig6.runs] == [1, 2, 3]  # 96 px: a 3x3 raw map
    assert all(not run.config.arrangement and run.config.de_albino and not run.config.affinity for run in fig6.runs)
    assert [row.name for row, _ in fig6.left_out] == ["k4", "k5", "k6", "k7"]


def test_seeds_take_several_values_after_one_option():
    assert expand_seeds(["table2", "--seeds", "0", "1", "2", "--epochs", "3"]) == \
        ["table2", "--seeds", "0", "--seeds", "1", "--seeds", "2", "--epochs", "3"]
    assert expand_seeds(["--seeds", "--epochs", "3"]) == ["--seeds", "--epochs", "3"]  # click then names it


def test_slurm_array_has_one_task_per_row_and_seed(tmp_path):
    root, out = raf_root(tmp_path), tmp_path / "out"
    result = CliRunner().invoke(cli, ["reproduce", "table2", "--data-root", str(root), "--out", str(out),
                                      "--seeds", "0", "1", "--launcher", "slurm"])
    assert result.exit_code == 0, result.output
    script = (out / "table2" / "slurm.sh").read_text()
    subprocess.run(["bash", "-n", str(out / "table2" / "slurm.sh")], check=True)  # parses as bash
    plan = build_plan(Options("table2", root, out, seeds=(0, 1), launcher="slurm"))
    assert "#SBATCH --array=0-13" in script  # 7 rows x 2 seeds at 224 px
    for index, run in enumerate(plan.runs):
        assert f"  {index})  # {run.name}\n" in script
    assert [trained_config(words) for words in command_lines(script, "train")] == [run.config for run in plan.runs]
    assert all(run.config.dtype == "bfloat16" for run in plan.runs)  # SLURM: GPUs
    assert json.loads((out / "table2" / "plan.json").read_text())["runs"][13]["workdir"] == str(plan.runs[13].workdir)
    _fake_run(plan.runs[13], 4 / 7)  # what task 13 (fa-da-sa, seed 1) leaves behind
    result = CliRunner().invoke(cli, ["reproduce", "table2", "--data-root", str(root), "--out", str(out),
                                      "--seeds", "0", "1", "--launcher", "slurm", "--collect"])
    assert result.exit_code == 0, result.output
    rows = {row["row"]: row for row in json.loads((out / "results.json").read_text())["targets"]["table2"]["rows"]}
    assert rows["fa-da-sa"]["status"] == "1 of 2 seeds finished"
    assert rows["fa-da-sa"]["wa_batch"]["values"] == [pytest.approx(400 / 7)]
    assert rows["fa-da-sa"]["seeds"][0]["device"].startswith("not recorded")


def test_a_missing_data_set_is_named_and_skip_missing_runs_the_other_rows(tmp_path):
    root, out = raf_root(tmp_path), tmp_path / "out"
    result = CliRunner().invoke(cli, ["reproduce", "table3", "--data-root", str(root), "--out", str(out), "--dry-run"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    for dataset, looked in (("fer2013", "fer2013/fer2013.csv"), ("affectnet7", "Manually_Annotated_file_lists"),
                            ("affectnet8", "AffectNet")):
        assert f"  {dataset}: looked for" in result.output and looked in result.output
    assert "--skip-missing" in result.output and "raf_db:" not in result.output
    result = CliRunner().invoke(cli, ["reproduce", "table3", "--data-root", str(root), "--out", str(out),
                                      "--dry-run", "--skip-missing"])
    assert result.exit_code == 0, result.output
    assert len(command_lines(result.output, "train")) == 1
    assert "# table3 fer2013: left out (data set fer2013 not found under" in result.output
    with pytest.raises(UserError, match="--rows: nope not in table2"):
        build_plan(Options("table2", root, out, rows=("nope",)))


# ---- results ----------------------------------------------------------------------------------

def _fake_run(run, wa: float, gar_modes=None, epochs: int | None = None) -> None:
    """A workdir as training and evaluation leave it: config.json, metrics.jsonl, evaluation JSONs."""
    save_config(run.config, run.workdir)
    epochs = run.config.epochs if epochs is None else epochs
    with open(run.workdir / "metrics.jsonl", "w") as f:
        for epoch in range(1, epochs + 1):
            f.write(json.dumps({"epoch": epoch, "step": 3 * epoch, "val_wa": wa / 2 + epoch / 100,
                                "images_per_s": 10.0}) + "\n")
    correct = round(7 * wa)
    confusion = np.zeros((7, 7), int)
    confusion[np.arange(7), np.where(np.arange(7) < correct, np.arange(7), (np.arange(7) + 1) % 7)] = 1
    for gar in gar_modes or run.gar_modes:
        report = EvaluationReport(str(run.workdir), "raf_db", "test", gar, 64, gar == "batch", run.seed, RAF_CLASSES,
                                  confusion.tolist(), correct / 7, correct / 7, {}, 7, 0.1)
        run.evaluation_path(gar).write_text(report.to_json())


def test_results_are_the_mean_and_sd_over_seeds_beside_the_papers(tmp_path):
    root, out = raf_root(tmp_path), tmp_path / "out"
    options = Options("table2", root, out, seeds=(0, 1, 2), epochs=2, image_size=96, batch_size=4, pretrained="none")
    plan = build_plan(options)
    from arm_jax.reproduce.plan import save_plan

    save_plan(plan)
    runs = {(run.row.name, run.seed): run for run in plan.runs}
    for seed, wa in ((0, 3 / 7), (1, 4 / 7), (2, 6 / 7)):
        _fake_run(runs["fa-da-sa", seed], wa)
    _fake_run(runs["none", 0], 2 / 7)
    _fake_run(runs["none", 1], 5 / 7, epochs=1)  # one epoch of two: not finished
    _fake_run(runs["sa", 0], 1 / 7)
    stale = runs["sa", 0].evaluation_path("running")
    os.utime(stale, (1, 1))  # written before the training it should describe
    assert is_finished(runs["fa-da-sa", 0]) and not is_finished(runs["none", 1]) and not is_finished(runs["sa", 0])

    results = collect(out)
    rows = {row["row"]: row for row in results["targets"]["table2"]["rows"]}
    full = rows["fa-da-sa"]
    values = 100 * np.array([3, 4, 6]) / 7
    assert full["wa_batch"]["mean"] == pytest.approx(values.mean()) and full["status"] == "done"
    assert full["wa_batch"]["sd"] == pytest.approx(values.std(ddof=1))
    assert full["paper_wa"] == 90.55 and rows["none"]["paper_wa"] == 84.68
    assert np.trace(full["confusion_batch"]) == 3 + 4 + 6 and np.sum(full["confusion_batch"]) == 21
    assert rows["none"]["status"] == "1 of 3 seeds finished" and rows["none"]["wa_batch"]["sd"] is None
    assert rows["sa"]["status"] == "0 of 3 seeds finished"
    assert rows["da"]["status"] == "0 of 3 seeds finished"  # 96 px: a 3x3 map, k = 3 fits
    assert full["val_wa_last"]["mean"] == pytest.approx(100 * (values / 100 / 2 + 0.02).mean())

    markdown = render_markdown(results)
    assert ("**Scaled down, not comparable with the paper**: epochs 2 (paper 70); image size (px) 96 (paper 224)"
            in markdown)
    line = next(line for line in markdown.splitlines() if line.startswith("| fa-da-sa |"))
    assert f"| 90.55 | {values.mean():.2f} ± {values.std(ddof=1):.2f} |" in line
    none_line = next(line for line in markdown.splitlines() if line.startswith("| none |"))
    assert "(no SA)" in none_line and "84.68" in none_line

    write_results(out)
    assert json.loads((out / "results.json").read_text())["targets"]["table2"]["rows"][6]["row"] == "fa-da-sa"
    assert (out / "results.md").read_text().count("| ") > 7 and Image.open(out / "table2.png").size[0] > 100


def test_progress_line_gives_epoch_rate_and_eta(tmp_path):
    root = raf_root(tmp_path)
    run = build_plan(Options("table2", root, tmp_path / "out", epochs=3, batch_size=4, rows=("none",))).runs[0]
    run.workdir.mkdir(parents=True)
    now, lines = [100.0], []
    progress = Progress(run, "[table2 1/1] none seed 0", lines.append, every_s=30, clock=lambda: now[0])
    progress(1, None)  # compiled: rates count from here
    now[0] += 10
    progress(6, None)  # 10 s later, not yet due
    assert lines == ["[table2 1/1] none seed 0: training started at step 1"]
    (run.workdir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "step": 10, "val_wa": 0.5}) + "\n")
    now[0] += 10
    progress(11, None)  # a new epoch: 10 steps in 20 s, 30 steps in all
    assert lines[-1] == ("[table2 1/1] none seed 0: epoch 2/3, step 11, 2.0 img/s, "
                         "ETA 0:00:38 (training steps only)")


# ---- figures ----------------------------------------------------------------------------------

def test_line_panel_draws_points_and_bands_where_the_data_are():
    blue = plots.PALETTE[0]
    series = plots.Series("a", (1, 2, 3), (10.0, 30.0, 20.0), (5.0, 20.0, 15.0), (15.0, 40.0, 25.0), blue)
    image, axes = plots.line_panel([series], title="t", x_label="x", y_label="y", y_range=(0.0, 50.0))
    pixels = np.asarray(image).astype(int)
    for x, y in zip(series.x, series.y):
        px, py = axes.pixel(x, y)
        assert tuple(pixels[round(py), round(px)]) == blue
    px, py = axes.pixel(1.5, 27.0)  # inside the band between x=1 and x=2, off the line
    tint = tuple(round(255 + (c - 255) * plots.BAND_ALPHA / 255) for c in blue)
    assert np.abs(pixels[round(py), round(px)] - tint).max() <= 2
    px, py = axes.pixel(1.5, 45.0)  # above the band: background
    assert tuple(pixels[round(py), round(px)]) == (255, 255, 255)


def test_confusion_panel_shades_each_cell_by_its_share_of_the_row():
    matrix = np.array([[3, 1], [0, 4]])
    pixels = np.asarray(plots.confusion_panel(matrix, ["a", "b"], "t", cell=40)).astype(int)
    left, top = 90, 60  # the panel's margins
    for i, j, share in ((0, 0, 0.75), (0, 1, 0.25), (1, 0, 0.0)):
        shade = round(255 * (1 - share))
        assert tuple(pixels[top + i * 40 + 3, left + j * 40 + 3]) == (shade, shade, 255)


# ---- `arm-jax train --raw-kernel` and configs saved before a field existed ---------------------

def test_raw_kernel_reaches_the_model(tmp_path):
    from arm_jax.training.loop import train

    config = TrainConfig(workdir=str(tmp_path / "w"), image_size=96, arrangement=False, affinity=False,
                         raw_kernel=4, batch_size=16, max_train_examples=16, parallel="none", epochs=1)
    with pytest.raises(UserError, match="3x3 map at the De-albino block, smaller than its 4x4 kernel"):
        train(config)
    assert trained_config(["arm-jax", "train", "--no-arrangement", "--raw-kernel", "5"]).raw_kernel == 5


def test_a_saved_config_without_a_newer_field_resumes_at_its_default(tmp_path):
    config = TrainConfig(workdir=str(tmp_path))
    saved = json.loads(config.to_json())
    del saved["raw_kernel"]  # a run saved before raw_kernel existed ran at the default, 3
    (tmp_path / "config.json").write_text(json.dumps(saved))
    check_resumable(config, tmp_path)
    with pytest.raises(UserError, match="raw_kernel: saved 3, now 5"):
        check_resumable(config.replace(raw_kernel=5), tmp_path)


# ---- a scaled-down table2, end to end ---------------------------------------------------------

# Compiling is most of a tiny run's time (five architectures, each a training step, an
# initialisation and evaluation programs); XLA's cheaper optimisation cuts it by about a third
# (measured on the 2-core EPYC) and changes nothing this module checks.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    """`arm-jax ARGS` in a new process, compiling with FAST_COMPILE."""
    return run_cli_program("from cli.main import cli; cli()", *args)


def run_cli_program(program: str, *args: str) -> subprocess.CompletedProcess:
    """A Python program run like run_cli's commands (same XLA flags: the same compiled programs)."""
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()}
    return subprocess.run([sys.executable, "-c", program, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1800)


@pytest.fixture(scope="module")
def table2_run(tmp_path_factory):
    """`arm-jax reproduce table2 --epochs 1 --image-size 64` on 14 training and 7 test images."""
    tmp_path = tmp_path_factory.mktemp("reproduce")
    root, out = raf_root(tmp_path), tmp_path / "out"
    args = ["reproduce", "table2", "--data-root", str(root), "--out", str(out), *SCALED]
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, out, args, result.stderr + result.stdout


@pytest.mark.slow
def test_table2_writes_every_row_beside_the_paper_and_its_figure(table2_run):
    root, out, _, output = table2_run
    results = json.loads((out / "results.json").read_text())
    rows = results["targets"]["table2"]["rows"]
    assert [row["row"] for row in rows] == [row.name for row in ROWS["table2"]]
    assert [row["paper_wa"] for row in rows] == [84.68, 87.32, 87.03, 88.54, 87.40, 87.38, 90.55]
    for row in rows:
        if row["row"] in ("da", "da-sa"):
            assert row["status"].startswith("left out: does not fit 64 px") and not row["seeds"]
            continue
        assert row["status"] == "done", row
        seed = row["seeds"][0]
        confusion = np.array(seed["confusion_batch"])
        assert confusion.sum() == 7 and seed["wa_batch"] == pytest.approx(100 * np.trace(confusion) / 7)
        if not row["sa"]:
            assert seed["wa_running"] == seed["wa_batch"]
        assert "[table2" in output and f"] {row['row']} seed 0: done in" in output
    markdown = (out / "results.md").read_text()
    assert "**Scaled down, not comparable with the paper**: epochs 1 (paper 70)" in markdown
    assert "| da | - / DA / - | 87.32 |" in markdown and "![Table 2, measured beside the paper](table2.png)" in markdown
    image = Image.open(out / "table2.png")
    assert image.size == (760, 400)
    workdir = out / "table2" / "fa-da-sa" / "seed0"
    assert json.loads((workdir / "run-info.json").read_text())["device"].startswith("cpu")
    for gar in ("batch", "running"):
        assert json.loads((workdir / f"evaluation-gar-{gar}.json").read_text())["batch_size"] == 64


@pytest.mark.slow
def test_a_second_invocation_trains_nothing(table2_run):
    _, out, args, _ = table2_run
    metrics = sorted(out.glob("table2/*/seed0/metrics.jsonl"))
    before = [path.stat().st_mtime_ns for path in metrics]
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("finished earlier, skipped") == 5 and "training started" not in result.stderr
    assert [path.stat().st_mtime_ns for path in metrics] == before


@pytest.mark.slow
def test_an_interrupted_row_resumes_where_it_stopped(table2_run):
    root, _, _, _ = table2_run
    out = root.parent / "resumed"  # its own results: the other tests read table2_run's
    # Stopped (as by SIGTERM) after its first step, through reproduce's after_step hook...
    stopped = run_cli_program(
        "import json, signal, sys\n"
        "from arm_jax.reproduce.job import reproduce\n"
        "from arm_jax.reproduce.plan import Options\n"
        "options = Options('table2', sys.argv[1], sys.argv[2], seeds=(1,), rows=('none',), epochs=1, image_size=64,\n"
        "                  batch_size=4, pretrained='none', workers='0')\n"
        "result = reproduce(options, after_step=lambda step, stop: stop.request(signal.SIGTERM))\n"
        "sys.exit(result.interrupted_signum or 0)\n", str(root), str(out))
    assert stopped.returncode == signal.SIGTERM, stopped.stderr[-3000:]
    workdir = out / "table2" / "none" / "seed1"
    assert not (workdir / "metrics.jsonl").exists() and not (workdir / "evaluation-gar-batch.json").exists()
    # ...then the same command as a user would type it continues from step 2 of 3 (14 images, batch 4).
    resumed = run_cli(["reproduce", "table2", "--data-root", str(root), "--out", str(out), "--seeds", "1",
                       "--rows", "none", *SCALED])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "none seed 1: training started at step 2" in resumed.stderr
    assert json.loads((workdir / "metrics.jsonl").read_text())["step"] == 3
    rows = {row["row"]: row for row in json.loads((out / "results.json").read_text())["targets"]["table2"]["rows"]}
    assert rows["none"]["status"] == "done" and [s["seed"] for s in rows["none"]["seeds"]] == [1]

def test_figure5_lays_out_the_table3_confusion_matrices(tmp_path):
    root, out = raf_root(tmp_path), tmp_path / "out"
    (root / "fer2013").mkdir()
    (root / "fer2013" / "fer2013.csv").write_text("emotion,pixels,Usage\n")
    (root / "AffectNet" / "train_set").mkdir(parents=True)
    plan = build_plan(Options("table3", root, out, epochs=1, image_size=64, batch_size=4, pretrained="none"))
    from arm_jax.reproduce.plan import save_plan

    save_plan(plan)
    _fake_run(plan.runs[0], 5 / 7)  # RAF-DB: 5 of its 7 classes right
    write_results(out)
    sheet = np.asarray(Image.open(out / "figure5.png")).astype(int)
    panel = plots.confusion_panel(np.eye(7), list(RAF_CLASSES), "t")  # the panels' geometry
    assert sheet.shape[1] == 2 * panel.width and sheet.shape[0] >= 2 * panel.height  # 2 x 2, as the paper
    left, top, cell = 90, 60, 46
    for i, share in ((0, 1.0), (6, 0.0)):  # row 0 right, row 6 predicted as class 0
        shade = round(255 * (1 - share))
        assert tuple(sheet[top + i * cell + 3, left + i * cell + 3]) == (shade, shade, 255)
    markdown = (out / "results.md").read_text()
    assert "| raf_db | RAF-DB | 90.55 | 82.29 | 71.43 |" in markdown and "![Figure 5" in markdown


def test_plans_of_other_rows_and_seeds_add_up_and_other_settings_replace_them(tmp_path):
    from arm_jax.reproduce.plan import save_plan

    root, out = raf_root(tmp_path), tmp_path / "out"
    common = dict(epochs=1, image_size=64, batch_size=4, pretrained="none")
    save_plan(build_plan(Options("table2", root, out, rows=("none",), **common)))
    path = save_plan(build_plan(Options("table2", root, out, rows=("sa", "da"), seeds=(0, 1), **common)))
    record = json.loads(path.read_text())
    assert [(run["row"], run["seed"]) for run in record["runs"]] == [("none", 0), ("sa", 0), ("sa", 1)]
    assert [item["row"] for item in record["left_out"]] == ["da"] and record["options"]["seeds"] == [0, 1]
    path = save_plan(build_plan(Options("table2", root, out, rows=("none",), **{**common, "epochs": 2})))
    assert [(run["row"], run["seed"]) for run in json.loads(path.read_text())["runs"]] == [("none", 0)]
