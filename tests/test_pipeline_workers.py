"""Worker counts: `--workers auto` fits the cores present; bad values are one-line errors."""

import os

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
