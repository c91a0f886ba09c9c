"""Worker processes: `--workers auto` fits the cores; a run loader starts its workers once for all epochs."""

import os

import numpy as np
import pytest
from click.testing import CliRunner

from arm_jax.errors import UserError
from arm_jax.training.config import MAX_AUTO_WORKERS, worker_count_option
from cli.train import train


def test_auto_workers_leave_one_core_to_the_training_loop():
    expected = max(1, min(MAX_AUTO_WORKERS, os.cpu_count() - 1))
    assert worker_count_option("auto") == worker_count_option(" AUTO ") == expected
    assert worker_count_option("0") == 0 and worker_count_option(3) == 3


@pytest.mark.parametrize("value", ["x", "-1", "1.5", ""])
def test_bad_worker_counts_are_user_errors(value):
    with pytest.raises(UserError, match="--workers"):
        worker_count_option(value)


def test_cli_rejects_a_bad_worker_count_before_training(tmp_path):
    result = CliRunner().invoke(train, ["--workdir", str(tmp_path / "run"), "--workers", "many"])
    assert result.exit_code != 0 and isinstance(result.exception, UserError)
    assert "--workers" in str(result.exception) and not (tmp_path / "run").exists()


@pytest.mark.slow  # fast tier: grain worker processes over several epochs (36 s under load)
def test_a_loader_over_epochs_starts_workers_once_and_equals_one_epoch_loaders():
    """Three MRR epochs from one loader with 2 workers: same batches as three per-epoch loaders, same pids."""
    import multiprocessing

    from arm_jax.data import pipeline
    from tests.test_pipeline import TinySplit, _loader, _same

    # 3 classes of 31/30/29 records: MRR draws 87 per epoch, a new draw each epoch; batch 4: 21 steps,
    # an odd count, so epoch 2 starts on the other worker.
    split = TinySplit(n=90, labels=np.r_[np.zeros(31), np.ones(30), np.full(29, 2)])
    per_epoch = [list(_loader(split, sampler="mrr", batch_size=4, epoch=e)) for e in range(3)]
    steps = pipeline.steps_in_epoch(split, 4, sampler="mrr", train=True)
    assert steps == 21 and all(len(batches) == steps for batches in per_epoch)
    options = dict(batch_size=4, seed=0, train=True, sampler="mrr", image_size=16, shard_index=0, shard_count=1,
                   worker_count=2, epochs=(0, 3))
    # Children of earlier loaders (an earlier test's, in this process) may still be exiting:
    # only processes started by this loader count as its workers.
    earlier = {child.pid for child in multiprocessing.active_children()}
    iterator = iter(pipeline.make_loader(split, **options))
    pids = []
    for epoch in range(3):
        _same([next(iterator) for _ in range(steps)], per_epoch[epoch])
        pids.append(sorted(child.pid for child in multiprocessing.active_children() if child.pid not in earlier))
        if epoch == 1:  # mid-run state after epoch 1 batch 0: a fresh loader resumes exactly
            head = next(iterator)
            state = iterator.get_state()
            resumed = iter(pipeline.make_loader(split, **options))
            resumed.set_state(state)
            _same([head] + [next(resumed) for _ in range(steps - 1)], per_epoch[2])
            break
    assert len(pids[0]) >= 2 and pids[0] == pids[1]  # the same worker processes served both epochs
    _same([next(iterator) for _ in range(steps - 1)], per_epoch[2][1:])
    with pytest.raises(StopIteration):
        next(iterator)


@pytest.mark.slow  # fast tier: grain worker processes over several passes
def test_validation_workers_start_once_and_serve_every_pass_as_a_per_epoch_loader():
    """Three validation passes with 2 workers: each pass equals the per-epoch evaluation loader
    (without workers), and the same worker processes serve all three."""
    import multiprocessing

    from arm_jax.data.pipeline import make_loader
    from arm_jax.training.feed import ValidationBatches
    from tests.test_pipeline import TinySplit, _loader, _same

    # 45 / 10: 5 batches per pass, the last of 5 records; an odd count, so pass 2 starts on the other worker.
    split = TinySplit(n=45)
    expected = list(_loader(split, train=False, batch_size=10, shuffle_eval=True, seed=4))
    validation = ValidationBatches(lambda: make_loader(split, epochs=(0, 3), train=False, batch_size=10, seed=4,
                                                       image_size=16, shuffle_eval=True, worker_count=2),
                                   records=45, batch_size=10)
    pids = []
    for _ in range(3):
        validation.prepare()
        _same(list(validation.batches()), expected)
        pids.append(sorted(child.pid for child in multiprocessing.active_children()))
    validation.close()
    assert len(pids[0]) >= 2 and pids[0] == pids[1] == pids[2], pids


_OPEN_A_LOADER_AND_WAIT = """
import sys, time
from arm_jax.data.pipeline import make_loader
from arm_jax.data.synthetic import SyntheticSplit
batches = iter(make_loader(SyntheticSplit("train", size=64), batch_size=8, seed=0, train=True, epochs=(0, 3),
                           image_size=64, worker_count=2))
next(batches)
print("serving", flush=True)
time.sleep(600)
"""


def _children(pid: int) -> set[int]:
    """The pids whose parent is `pid` (from /proc)."""
    found = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # not a process, or it ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.add(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow  # fast tier: starts grain worker processes
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads processes from /proc (Linux)")
def test_worker_processes_end_when_their_training_process_is_killed():
    """SIGKILL cannot be caught, so grain cannot stop its workers; they must notice by themselves
    (they used to live on, idle, ~220 MB each)."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    proc = subprocess.Popen([sys.executable, "-c", _OPEN_A_LOADER_AND_WAIT], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout.readline().strip() == "serving"
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers  # grain's 2 workers (and multiprocessing's resource tracker)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in workers if _alive(pid)]
    for pid in left:  # do not leave them to the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert not left, f"{len(left)} of {len(workers)} child processes outlived the killed loader"


@pytest.mark.slow  # fast tier: starts grain worker processes
@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="looks for the batches' segments in /dev/shm (Linux)")
@pytest.mark.parametrize("left_after", [None, 2], ids=["read-to-the-end", "left-after-2-batches"])
def test_read_through_stops_its_workers_and_unlinks_its_batches(left_after):
    """Read to the end, or left early, `read_through` shuts the loader's workers down and leaves
    none of the segments its batches came in, with the cyclic collector off, which would
    otherwise free each worker's last batch (and let grain unlink it) only by chance."""
    import gc
    import multiprocessing

    from arm_jax.data.pipeline import make_loader, read_through
    from tests.test_feed import _segment_names, _segments_left
    from tests.test_pipeline import TinySplit

    split = TinySplit(n=48)  # 6 batches of 8, 3 per worker
    loader = make_loader(split, batch_size=8, seed=0, epoch=0, train=False, image_size=16, worker_count=2)
    names, read = set(), 0
    gc.disable()
    try:
        batches = read_through(loader)
        for batch in batches:
            names.update(_segment_names(batch))
            del batch  # done with it before the loader closes, as a reader that keeps no batch
            read += 1
            if read == left_after:
                break
        batches.close()  # what dropping the generator does; said explicitly
        workers_left = multiprocessing.active_children()
    finally:
        gc.enable()
    assert read == (left_after or 6)
    assert len(names) == 2 * read  # image and label of every batch came in shared memory
    assert _segments_left(names) == []
    assert workers_left == []
