"""`arm-jax reproduce`: plan a target, then print its commands, write a SLURM array, or run it; then collect."""

from __future__ import annotations

import dataclasses
from typing import Callable

from arm_jax.reproduce.plan import Options, build_plan, describe, save_plan, slurm_script
from arm_jax.reproduce.results import write_results
from arm_jax.reproduce.runner import run_plan


@dataclasses.dataclass(frozen=True)
class JobResult:
    text: str  # what to print on standard output
    interrupted_signum: int | None = None


def reproduce(options: Options, *, dry_run: bool = False, collect: bool = False,
              echo: Callable[[str], None] | None = None, after_step=None) -> JobResult:
    """Run (or describe, or hand to SLURM, or only collect) one target; write results into options.out.

    dry_run: print every run's `arm-jax train` / `evaluate` commands and the rows left out; write nothing.
    collect: train nothing; gather what the runs' workdirs hold (e.g. after the SLURM array ran).
    `echo` receives the progress lines; `after_step(step, stop)` is passed to training (tests).
    """
    plan = build_plan(options)
    if dry_run:
        return JobResult(describe(plan))
    save_plan(plan)
    if options.launcher == "slurm" and not collect:
        script = plan.folder / "slurm.sh"
        script.write_text(slurm_script(plan))
        return JobResult(f"wrote {script}: {len(plan.runs)} task(s), one per row and seed; submit it with "
                         f"`sbatch {script}`, then run this command again with --collect")
    outcome = None if collect else run_plan(plan, echo=echo, after_step=after_step)
    results = write_results(options.out)
    section = results["targets"][options.target]
    done = sum(row["status"] == "done" for row in section["rows"])
    text = f"{options.target}: {done} of {len(section['rows'])} rows done; wrote {options.out / 'results.md'}"
    if outcome is not None and outcome.interrupted:
        return JobResult(text + "; interrupted: run the same command again to resume",
                         outcome.interrupted.get("signum"))
    return JobResult(text)
