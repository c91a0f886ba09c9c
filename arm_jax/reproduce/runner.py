"""Train and evaluate a plan's runs one after another, skipping finished ones, with a progress line.

Each run is a plain training workdir: `arm_jax.training.loop.train` resumes it where it
stopped (an interrupted run continues from its last checkpoint), and
`arm_jax.inference.evaluate.evaluate` then measures the test split once per GAR mode. A run is
finished when its workdir holds the same config, all its epochs and evaluations written after
them, so running the same command again trains nothing.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Callable

from arm_jax.reproduce.plan import Plan, Run, evaluation_path
from arm_jax.reproduce.targets import PAPER_EVAL_BATCH
from arm_jax.training.config import RESUMABLE_CHANGES, TrainConfig

PROGRESS_EVERY_S = 30.0
RUN_INFO = "run-info.json"


def metrics_records(workdir: Path) -> list[dict]:
    """metrics.jsonl's per-epoch records (empty when there is none yet)."""
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def same_run(saved: dict, config: TrainConfig) -> bool:
    """Whether a saved config.json trains what `config` trains, to the same number of epochs."""
    defaults = dataclasses.asdict(TrainConfig())
    current = dataclasses.asdict(config)
    ignored = RESUMABLE_CHANGES - {"epochs"}
    return all(saved.get(k, defaults.get(k)) == current.get(k) for k in set(saved) | set(current) if k not in ignored)


def is_finished(run: Run) -> bool:
    """All epochs trained under this config, and every evaluation written after the last of them."""
    config_path = run.workdir / "config.json"
    if not config_path.is_file() or not same_run(json.loads(config_path.read_text()), run.config):
        return False
    return finished_evaluations(run.workdir, run.config.epochs, run.gar_modes) is not None


def finished_evaluations(workdir: Path, epochs: int, gar_modes) -> dict[str, dict] | None:
    """{gar: evaluation JSON} when `epochs` epochs are trained and each evaluation was written after them."""
    records = metrics_records(workdir)
    if not records or records[-1]["epoch"] != epochs:
        return None
    trained = (workdir / "metrics.jsonl").stat().st_mtime
    evaluations = {}
    for gar in gar_modes:
        path = evaluation_path(workdir, gar)
        if not path.is_file() or path.stat().st_mtime < trained:
            return None
        evaluations[gar] = json.loads(path.read_text())
    return evaluations


@dataclasses.dataclass
class Outcome:
    trained: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    interrupted: dict | None = None  # train()'s summary of the run that was stopped


class Progress:
    """after_step hook: a line every PROGRESS_EVERY_S seconds and at each epoch (row, epoch, rate, ETA).

    Steps per epoch are read from metrics.jsonl's first record, so the ETA appears once the
    first epoch of this workdir has ended (at once when resuming).
    """

    def __init__(self, run: Run, position: str, echo: Callable[[str], None], every_s: float = PROGRESS_EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.run, self.position, self.echo, self.every_s, self.clock = run, position, echo, every_s, clock
        self.start_step = self.start_time = None
        self.last_line = 0.0
        self.epochs_seen = len(metrics_records(run.workdir))
        metrics_path = run.workdir / "metrics.jsonl"
        self.metrics_size = metrics_path.stat().st_size if metrics_path.is_file() else 0
        self.steps_per_epoch = self._steps_per_epoch()

    def _steps_per_epoch(self) -> int | None:
        records = metrics_records(self.run.workdir)
        return records[0]["step"] // records[0]["epoch"] if records else None

    def __call__(self, step: int, stop) -> None:
        now = self.clock()
        if self.start_step is None:  # the first step includes compilation: rates count from here
            self.start_step, self.start_time, self.last_line = step, now, now
            self.echo(f"{self.position}: training started at step {step}")
            return
        metrics_path = self.run.workdir / "metrics.jsonl"
        size = metrics_path.stat().st_size if metrics_path.is_file() else 0
        new_epoch = size != self.metrics_size  # the loop appends one line per epoch
        if new_epoch:
            self.metrics_size = size
            self.epochs_seen = len(metrics_records(self.run.workdir))
            self.steps_per_epoch = self.steps_per_epoch or self._steps_per_epoch()
        if new_epoch or now - self.last_line >= self.every_s:
            self.last_line = now
            self.echo(self.line(step, now))

    def line(self, step: int, now: float) -> str:
        rate = (step - self.start_step) / max(now - self.start_time, 1e-9)  # steps/s
        c = self.run.config
        text = f"{self.position}: epoch {self.epochs_seen + 1}/{c.epochs}, step {step}, {rate * c.batch_size:.1f} img/s"
        if self.steps_per_epoch and rate > 0:
            left = (c.epochs * self.steps_per_epoch - step) / rate
            text += f", ETA {_duration(left)} (training steps only)"
        else:
            text += ", ETA after the first epoch"
        return text


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run_plan(plan: Plan, *, echo: Callable[[str], None] | None = None, after_step=None) -> Outcome:
    """Train and evaluate every unfinished run; stop at the first interrupted one.

    `after_step(step, stop)` (tests) runs after each training step, after the progress line.
    """
    from arm_jax.training.loop import train

    echo = echo or (lambda text: print(text, file=sys.stderr, flush=True))
    outcome = Outcome()
    for index, run in enumerate(plan.runs, start=1):
        position = f"[{plan.options.target} {index}/{len(plan.runs)}] {run.row.name} seed {run.seed}"
        if is_finished(run):
            echo(f"{position}: finished earlier, skipped")
            outcome.skipped.append(run.name)
            continue
        for gar in run.gar_modes:  # they describe an earlier state of this workdir
            run.evaluation_path(gar).unlink(missing_ok=True)
        progress = Progress(run, position, echo)

        def hook(step, stop, progress=progress):
            progress(step, stop)
            if after_step is not None:
                after_step(step, stop)

        started = time.monotonic()
        summary = train(run.config, after_step=hook)
        if summary["status"] != "done":
            echo(f"{position}: interrupted ({summary.get('signal')}); run the same command again to resume it")
            outcome.interrupted = summary
            return outcome
        results = evaluate_run(run)
        text = ", ".join(f"WA {100 * r['wa']:.2f}% (GAR {gar})" for gar, r in results.items())
        echo(f"{position}: done in {_duration(time.monotonic() - started)}; test {text}")
        outcome.trained.append(run.name)
    return outcome


def evaluate_run(run: Run) -> dict[str, dict]:
    """Evaluate the run's best checkpoint on the test split once per GAR mode; write JSON, PNG, run info."""
    import jax

    from arm_jax.inference.evaluate import evaluate
    from arm_jax.inference.report import confusion_png

    c = run.config
    results = {}
    for gar in run.gar_modes:
        report = evaluate(c.workdir, c.dataset, c.data_dir, split="test", batch_size=PAPER_EVAL_BATCH, gar=gar,
                          seed=run.seed, progress=False)
        confusion_png(report.confusion, list(report.class_names), run.confusion_path(gar),
                      title=f"{run.name}: test WA {100 * report.wa:.2f}% (GAR {gar})",
                      column_names=list(report.column_names))
        run.evaluation_path(gar).write_text(report.to_json() + "\n")
        results[gar] = {"wa": report.wa, "ua": report.ua}
    info = {"device": device_description(jax.devices()[0]), "dtype": c.dtype,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    (run.workdir / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return results


def device_description(device) -> str:
    """'gpu: NVIDIA H100 80GB HBM3', or for a CPU its model name and core count."""
    if device.platform != "cpu":
        return f"{device.platform}: {device.device_kind}"
    import os

    model = "unknown model"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu: {model}, {os.cpu_count()} cores"
