"""Inject plausible bugs, one at a time, into throwaway copies of the checkout and show which fast-tier
tests fail on each (issue 26: the fast tier must catch a bug in every area).

    python scripts/inject_bugs.py                  # every bug below, its area's test files, -m "not slow" (45 min on a busy 2-core machine)
    python scripts/inject_bugs.py steps-loss-mean loop-best-by-loss --tests-from main   # the tests of another revision
    python scripts/inject_bugs.py --list

Each bug replaces one string of one file (it must occur exactly once: a bug whose string the code no
longer contains is reported, not skipped). The copy holds the checkout's tracked and untracked
(not ignored) files; the checkout itself is never edited. With --tests-from REV the copy's tests/
is REV's (`git archive REV tests`), to show what the suite of that revision let through; files it
lacks are left out of the run. Prints one markdown row per bug: the failing tests, or "passed".
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STEPS = ("tests/test_steps.py",)
LOOP = ("tests/test_train_small.py",)
CHECKPOINTS = ("tests/test_checkpoint.py", "tests/test_train_small.py")
PRECISION = ("tests/test_batchnorm.py", "tests/test_steps.py", "tests/test_train_small.py")
DATA = ("tests/test_pipeline.py", "tests/test_sampling.py", "tests/test_feed.py", "tests/test_train_small.py")
AUGMENTATION = ("tests/test_transforms.py", "tests/test_steps.py", "tests/test_train_small.py")


@dataclass(frozen=True)
class Bug:
    name: str
    what: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


BUGS = (
    # The training and evaluation steps.
    Bug("steps-loss-mean", "the step reports the batch's mean loss as its loss sum", "arm_jax/training/steps.py",
        '"loss_sum": losses.sum(),', '"loss_sum": losses.mean(),', STEPS),
    Bug("steps-confusion-transposed", "the confusion matrix transposed (rows the prediction)", "arm_jax/training/steps.py",
        'jnp.einsum("nc,nd->cd"', 'jnp.einsum("nc,nd->dc"', STEPS),
    Bug("steps-bn-not-updated", "the training step drops the BatchNorm statistics' update", "arm_jax/training/steps.py",
        'batch_stats=updates.get("batch_stats", state.batch_stats),', "batch_stats=state.batch_stats,", STEPS),
    # The training loop.
    Bug("loop-best-by-loss", "best chosen by validation loss compared with the best WA", "arm_jax/training/loop.py",
        'best = progress.best_wa is None or val["wa"] > progress.best_wa',
        'best = progress.best_wa is None or val["loss"] < progress.best_wa', LOOP),
    Bug("loop-best-is-last", "every epoch saved as best", "arm_jax/training/loop.py",
        'best = progress.best_wa is None or val["wa"] > progress.best_wa', "best = True", LOOP),
    Bug("loop-best-ge", "an equalled WA replaces the best", "arm_jax/training/loop.py",
        'val["wa"] > progress.best_wa', 'val["wa"] >= progress.best_wa', LOOP),
    Bug("loop-schedule-off-by-one", "the lr schedule counts one step more per epoch", "arm_jax/training/loop.py",
        "tx = make_optimizer(config, steps_per_epoch)", "tx = make_optimizer(config, steps_per_epoch + 1)", LOOP),
    Bug("loop-resume-drops-epoch-sums", "a mid-epoch resume restarts the epoch's loss/accuracy sums",
        "arm_jax/training/loop.py", 'sums = _Sums(progress.sums, run.par.fetch)',
        "sums = _Sums(None, run.par.fetch)", LOOP),
    # Checkpoints.
    Bug("ckpt-restores-oldest", "a resume restores the oldest kept checkpoint", "arm_jax/training/checkpoints.py",
        "for step in sorted(self.manager.all_steps(), reverse=True):", "for step in sorted(self.manager.all_steps()):",
        CHECKPOINTS),
    Bug("ckpt-best-not-kept", "the best is not kept once older than the last few", "arm_jax/training/checkpoints.py",
        "AnyPreservationPolicy([ocp.checkpoint_managers.LatestN(keep), best])",
        "AnyPreservationPolicy([ocp.checkpoint_managers.LatestN(keep)])", CHECKPOINTS),
    # bfloat16.
    Bug("bn-moments-in-bf16", "a bf16 model's BatchNorm moments computed in bf16", "arm_jax/models/batchnorm.py",
        "mean, var, count = self._batch_moments(x.astype(stats_dtype))",
        "mean, var, count = self._batch_moments(x)", PRECISION),
    Bug("loop-params-in-bf16", "--dtype bfloat16 makes the parameters bf16", "arm_jax/training/loop.py",
        'dtype=jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32)',
        'dtype=jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32, '
        'param_dtype=jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32)', PRECISION),
    # Data.
    Bug("data-loader-epoch-off-by-one", "a loader over epochs serves epoch e+1's order in epoch e",
        "arm_jax/data/sampling.py", "epoch, step = self._first + batch // self._steps, batch % self._steps",
        "epoch, step = self._first + 1 + batch // self._steps, batch % self._steps", DATA),
    Bug("data-neighbours-label", "each record served with the next record's label", "arm_jax/data/pipeline.py",
        "images, labels = self._split.read_images(records), self._split.labels[records]",
        "images, labels = self._split.read_images(records), self._split.labels[(records + 1) % len(self._split)]",
        DATA),
    Bug("data-eval-short-batch-dropped", "evaluation drops a pass's short last batch", "arm_jax/data/sampling.py",
        "return -(-len(labels) // batch_size)", "return len(labels) // batch_size", DATA),
    # Augmentation, on the device.
    Bug("augment-noise-variance-20", "Gaussian noise of variance 20, not 30", "arm_jax/data/transforms.py",
        "noise = jax.random.normal(noise_key, image.shape, image.dtype) * math.sqrt(variance)",
        "noise = jax.random.normal(noise_key, image.shape, image.dtype) * math.sqrt(20.0)", AUGMENTATION),
    Bug("augment-p-0.6", "flip or noise applied with probability 0.6, not 0.5", "arm_jax/data/transforms.py",
        "augmented = jax.random.uniform(apply_key) < BASIC_AUG_P", "augmented = jax.random.uniform(apply_key) < 0.6",
        AUGMENTATION),
    Bug("augment-flip-only", "the basic augmentation always flips, never noises", "arm_jax/data/transforms.py",
        "flip = jax.random.bernoulli(which_key)", "flip = True", AUGMENTATION),
    Bug("augment-epoch-ignored", "a record draws the same augmentation every epoch", "arm_jax/data/transforms.py",
        "jax.random.fold_in(jax.random.fold_in(root, epoch), position)", "jax.random.fold_in(root, position)",
        AUGMENTATION),
    Bug("augment-erase-sides-swapped", "the erasing box's height and width swapped", "arm_jax/data/transforms.py",
        "jnp.stack([top, left, height, width])", "jnp.stack([top, left, width, height])", AUGMENTATION),
)


def checkout_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode()
    return [name for name in listed.split("\0") if name and (ROOT / name).is_file()]


def make_copy(bug: Bug, where: Path, tests_from: str | None) -> None:
    for name in checkout_files():
        (where / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, where / name)
    path = where / bug.file
    text = path.read_text()
    if text.count(bug.old) != 1:
        raise SystemExit(f"{bug.name}: {bug.old!r} occurs {text.count(bug.old)} times in {bug.file}, not once")
    path.write_text(text.replace(bug.old, bug.new))
    if tests_from:
        shutil.rmtree(where / "tests")
        archive = subprocess.run(["git", "archive", tests_from, "tests"], cwd=ROOT, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)


def run_tests(bug: Bug, where: Path, tests: tuple[str, ...], pytest_args: list[str]) -> tuple[str, str]:
    """(summary, pytest's output) of the test files in the copy, fast tier."""
    env = dict(os.environ, PYTHONPATH=str(where))
    check = "import arm_jax, tests, sys; print(arm_jax.__file__); print(tests.__file__)"
    imported = subprocess.run([sys.executable, "-c", check], cwd=where, env=env, capture_output=True, text=True)
    if not all(line.startswith(str(where)) for line in imported.stdout.split()):
        raise SystemExit(f"{bug.name}: the copy imports {imported.stdout.split()} {imported.stderr}")
    files = [name for name in dict.fromkeys(tests) if (where / name).exists()]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "-m", "not slow",
                             *pytest_args, *files], cwd=where, env=env, capture_output=True, text=True)
    failed = re.findall(r"^FAILED (\S+)", result.stdout, re.M)
    if failed:
        return ", ".join(f"`{name.removeprefix('tests/')}`" for name in failed), result.stdout
    if result.returncode == 0:
        return f"passed ({', '.join(name.removeprefix('tests/') for name in files)})", result.stdout
    return f"pytest exit {result.returncode}, no failed test", result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="bugs to inject (default: all)")
    parser.add_argument("--list", action="store_true", help="list the bugs and exit")
    parser.add_argument("--tests-from", metavar="REV", help="run the tests of git revision REV instead")
    parser.add_argument("--keep", metavar="DIR", help="keep each copy and its pytest output under DIR")
    parser.add_argument("--tests", nargs="+", metavar="FILE", help="run these test files instead of the bug's own")
    parser.add_argument("--pytest-args", default="", help='extra pytest arguments, e.g. "-n 0"')
    args = parser.parse_args()
    by_name = {bug.name: bug for bug in BUGS}
    if args.list:
        for bug in BUGS:
            print(f"{bug.name:34} {bug.file:32} {bug.what}")
        return
    unknown = [name for name in args.names if name not in by_name]
    if unknown:
        raise SystemExit(f"unknown bug(s) {unknown}; --list lists them")
    print(f"| bug | file | failing fast-tier tests{f' (tests of {args.tests_from})' if args.tests_from else ''} |")
    print("|---|---|---|")
    for bug in [by_name[name] for name in args.names] or BUGS:
        with tempfile.TemporaryDirectory(prefix=f"arm-jax-bug-{bug.name}-") as scratch:
            where = Path(args.keep) / bug.name if args.keep else Path(scratch)
            shutil.rmtree(where, ignore_errors=True)
            make_copy(bug, where, args.tests_from)
            summary, output = run_tests(bug, where, tuple(args.tests or bug.tests), args.pytest_args.split())
            (where / "pytest-output.txt").write_text(output)
        print(f"| {bug.what} | `{bug.file}` | {summary} |", flush=True)


if __name__ == "__main__":
    main()
