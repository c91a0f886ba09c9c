"""scripts/gpu_check.py --smoke: the GPU check's whole path on the CPU, one JSON file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~40 s on an idle 2-core machine (two compilations of the model), minutes under load
def test_gpu_check_smoke_writes_one_consistent_json(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), str(tmp_path), "--smoke"],
                   check=True, timeout=600, capture_output=True, cwd=tmp_path)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["smoke"] is True and report["environment"]["jax_devices"]
    (result,) = report["benchmark"]["results"]
    assert (result["mode"], result["image_size"]) == ("forward", 48)
    assert set(result["images_per_s"]) == {"arm-jax float32"} and result["images_per_s"]["arm-jax float32"] > 0
    training = report["training"]
    assert training["status"] == "done"
    assert training["steps"] == 12 // 4  # max_train_examples // batch: one epoch
    assert training["config"]["dtype"] == "bfloat16" and training["config"]["worker_count"] == 1
    assert training["steady_images_per_s"] > 0
    assert 0.0 <= training["input_wait_share"] <= 1.0
    assert 0.0 < training["first_batch_wait_s"] < training["wall_s"]
    pipeline = report["input_pipeline"]
    assert pipeline["workers"] == 1 and pipeline["records"] == 16
    assert pipeline["synthetic_images_per_s"] > 0 and pipeline["raf_db_images_per_s"] > 0
    assert report["bottleneck"] == ("the input pipeline" if pipeline["synthetic_images_per_s"]
                                    < training["steady_images_per_s"] else "the training step")
