"""One command for a machine with one NVIDIA GPU: model speed and a short real training run, as one JSON file.

    python scripts/gpu_check.py OUT_DIR            # GPU, at most ~8 minutes
    python scripts/gpu_check.py OUT_DIR --smoke    # CPU, tiny sizes (what the test suite runs)

Needs `pip install -e '.[cuda12,dev]'` (jax[cuda12]; PyTorch with CUDA for the
comparison, optional: without it only arm-jax is measured). Writes
OUT_DIR/gpu_check.json with:
  benchmark: scripts/benchmark_model.py --device gpu at 224 px, batch 256, arm-jax
    bfloat16 and float32 against PyTorch float32 / AMP bf16 / torch.compile
    (forward and train, interleaved medians);
  training: `train` on the synthetic set, 1 epoch at 224 px, --dtype bfloat16,
    workers for the cores present: steady images/s (steps after the first two)
    and the input pipeline's share (time the loop waited for a training batch /
    wall time of those steps), plus validation seconds;
  input_pipeline: the training input pipeline alone (no model), one epoch at the same
    batch and size with the same workers, on the synthetic faces the training run reads and
    on RAF-DB-format JPEGs (100x100, written by scripts/benchmark_data.py's writer): its
    images/s beside the training's steady images/s say which side a run waits on.

Workers default to what `arm-jax train --workers auto` chooses for the cores present.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import results_table  # noqa: E402  (scripts/, beside this file)

FULL = {"device": "gpu", "batch": 256, "image_size": 224, "train_batch": 256, "rounds": 5,
        "benchmark_timeout_s": 330, "max_train_examples": None, "pipeline_records": 4096}
SMOKE = {"device": "cpu", "batch": 2, "image_size": 48, "train_batch": 4, "rounds": 1,
         "benchmark_timeout_s": 300, "max_train_examples": 12, "pipeline_records": 16}


def environment() -> dict:
    """What ran: host, accelerator, versions."""
    import jax

    info = {"host": platform.node(), "cpu_cores": os.cpu_count(), "python": platform.python_version(),
            "jax": jax.__version__, "jax_devices": [d.device_kind for d in jax.devices()],
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_average": os.getloadavg()}
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        info["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True).stdout.strip()
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.cuda.is_available()
    except ImportError:
        info["torch"] = None
    return info


def run_benchmark(sizes: dict, out_dir: Path, smoke: bool, markdown: Path | None = None) -> dict:
    """scripts/benchmark_model.py in a subprocess (its own JAX/PyTorch memory), results from its --json
    (and, given `markdown`, its rows in that file's `benchmark_model gpu` table)."""
    target = out_dir / "benchmark_model.json"
    command = [sys.executable, str(REPO / "scripts" / "benchmark_model.py"), "--device", sizes["device"],
               "--batch", str(sizes["batch"]), "--image-size", str(sizes["image_size"]),
               "--rounds", str(sizes["rounds"]), "--json", str(target)]
    if smoke:  # as little compiling as possible: arm-jax float32 forward only
        command += ["--dtype", "float32", "--modes", "forward", "--no-torch", "--warmup", "1", "--inner", "1"]
    else:
        command += ["--dtype", "bfloat16", "float32"] + (["--markdown", str(markdown.resolve())] if markdown else [])
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=sizes["benchmark_timeout_s"], cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {sizes['benchmark_timeout_s']} s", "command": command}
    result = {"command": " ".join(command), "seconds": time.perf_counter() - started, "stdout": done.stdout}
    if done.returncode != 0:
        return {**result, "error": done.stderr.strip().splitlines()[-1:] or ["failed"]}
    return {**result, **json.loads(target.read_text())}


def run_training(sizes: dict, out_dir: Path, workers: int) -> dict:
    """One synthetic epoch through the real training loop, timing its waits for batches."""
    from arm_jax.training import loop
    from arm_jax.training.config import TrainConfig
    from arm_jax.training.feed import Timings

    step_times, timings = [], Timings()
    config = TrainConfig(dataset="synthetic", image_size=sizes["image_size"], batch_size=sizes["train_batch"],
                         epochs=1, dtype="bfloat16", worker_count=workers, workdir=str(out_dir / "train"),
                         max_train_examples=sizes["max_train_examples"],
                         max_eval_examples=sizes["max_train_examples"], quiet=True, checkpoint_every_steps=0)
    started = time.perf_counter()
    summary = loop.train(config, after_step=lambda step, stop: step_times.append(time.perf_counter()),
                         timings=timings)
    wall = time.perf_counter() - started
    # Steady state: from the end of step 2 (compiled, queue filled) to the last step.
    steady = step_times[2:] if len(step_times) > 3 else step_times[1:]
    seconds = steady[-1] - steady[0] if len(steady) > 1 else float("nan")
    train_waits = [(start, end) for what, _, start, end in timings.events if what == "batch"]
    waited = sum(end - start for start, end in train_waits if steady and steady[0] <= start < steady[-1])
    records = [json.loads(line) for line in (out_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    return {
        "config": {k: getattr(config, k) for k in ("image_size", "batch_size", "dtype", "worker_count", "epochs")},
        "steps": len(step_times), "wall_s": wall, "status": summary.get("status"),
        "steady_images_per_s": (len(steady) - 1) * config.batch_size / seconds if seconds == seconds else None,
        "input_wait_share": waited / seconds if seconds == seconds and seconds > 0 else None,
        "first_batch_wait_s": train_waits[0][1] - train_waits[0][0] if train_waits else None,
        "validation_s": sum(end - start for what, _, start, end in timings.events if what == "validate"),
        "epoch_time_s": records[-1].get("time_s"), "val_wa": records[-1].get("val_wa"),
    }


def run_pipeline(sizes: dict, out_dir: Path, workers: int) -> dict:
    """The training input pipeline alone: images/s of one epoch after its first batch."""
    import tempfile

    import numpy as np

    import benchmark_data  # scripts/, beside this file
    from arm_jax.data import open_split
    from arm_jax.data.base import Subset

    def images_per_s(split) -> float:
        _, rate, _, _ = benchmark_data.run_epoch(split, workers=workers,
                                                 batch_size=sizes["train_batch"], image_size=sizes["image_size"])
        return rate

    result = {"workers": workers, "records": sizes["pipeline_records"]}
    synthetic = open_split("synthetic", None, "train")
    result["synthetic_images_per_s"] = images_per_s(Subset(synthetic, sizes["pipeline_records"], 0))
    with tempfile.TemporaryDirectory(dir=out_dir) as folder:
        dataset = benchmark_data.write_dataset("raf_db", Path(folder), sizes["pipeline_records"],
                                               np.random.default_rng(0))
        result["raf_db_images_per_s"] = images_per_s(open_split(dataset, folder, "train", prepared=False))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, seconds")
    parser.add_argument("--workers", type=int, default=None,
                        help="default: as `arm-jax train --workers auto` for these cores (smoke: 1)")
    results_table.add_option(parser)
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else FULL
    if args.smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import arm_jax

    arm_jax.configure_cpu()  # XLA_FLAGS, before JAX starts its backend: as the arm-jax command runs
    import jax

    if not args.smoke and jax.default_backend() != "gpu":
        sys.exit(f"gpu_check: JAX sees no GPU (backend {jax.default_backend()}); install jax[cuda12] or use --smoke")
    from arm_jax.training.config import worker_count_option

    workers = args.workers if args.workers is not None else (1 if args.smoke else worker_count_option("auto"))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {"smoke": args.smoke, "environment": environment()}
    report["benchmark"] = run_benchmark(sizes, args.out_dir, args.smoke, args.markdown)
    report["training"] = run_training(sizes, args.out_dir, workers)
    report["input_pipeline"] = pipeline_report = run_pipeline(sizes, args.out_dir, workers)
    steady = report["training"]["steady_images_per_s"] or float("nan")
    report["bottleneck"] = ("the input pipeline" if pipeline_report["synthetic_images_per_s"] < steady
                            else "the training step")
    report["load_average_end"] = os.getloadavg()
    (args.out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({k: report[k] for k in ("training", "input_pipeline", "bottleneck")}, indent=1, default=str))
    print(report["benchmark"].get("stdout", report["benchmark"].get("error")))
    print(f"wrote {args.out_dir / 'gpu_check.json'}")
    if args.markdown:
        training = report["training"]
        device = report["environment"]["jax_devices"][0]
        row = {**results_table.stamp(f"{device} (host: {results_table.cpu()})"),
               "run": "synthetic, {image_size} px, batch {batch_size}, {dtype}, {worker_count} workers, "
                      "{epochs} epoch".format(**training["config"]) + (" (--smoke)" if args.smoke else ""),
               "steady images/s": f"{training['steady_images_per_s'] or float('nan'):.1f}",
               "input pipeline alone, images/s (synthetic / RAF-DB JPEG)":
                   f"{pipeline_report['synthetic_images_per_s']:.0f} / {pipeline_report['raf_db_images_per_s']:.0f}",
               "input wait share": f"{training['input_wait_share'] or float('nan'):.1%}",
               "validation s": f"{training['validation_s']:.1f}"}
        results_table.write_rows(args.markdown, "gpu_check", [row])


if __name__ == "__main__":
    main()
