"""Forward images/s of the exported ONNX model (onnxruntime), arm-jax (jit) and the PyTorch reference, interleaved.

    python scripts/benchmark_export.py [--image-size 224] [--batches 1,32] [--rounds 5]

ONNX and JAX run the whole inference path (uint8 NHWC images in, ImageNet
normalisation, running GAR, softmax); PyTorch runs arm_jax/interop/torch_reference.py's
model on normalised float NCHW input (normalisation is a negligible share).
Each contender is warmed up, then all run in turns (A, B, C, A, B, C, ...) so
that a change of machine load hits them alike; each rate is the median over
the rounds, printed with the load average.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ and arm_jax from a checkout

import arm_jax  # noqa: E402

arm_jax.configure_cpu()  # XLA_FLAGS, before JAX starts its backend: as the arm-jax command runs
import jax  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402
import torch  # noqa: E402

from arm_jax.interop.export import build_onnx, jax_inference_fn  # noqa: E402
from tests.small_models import small_model  # noqa: E402
from arm_jax.interop.torch_reference import TorchARMResNet18  # noqa: E402

import results_table  # noqa: E402  (scripts/, beside this file)


def contenders(size: int, batch: int):
    """name -> a callable running one forward pass of `batch` images, blocking until done."""
    loaded = small_model(image_size=size)
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    session = onnxruntime.InferenceSession(build_onnx(loaded).SerializeToString(), providers=["CPUExecutionProvider"])
    infer = jax.jit(jax_inference_fn(loaded))
    torch_model = TorchARMResNet18(num_classes=7, image_size=size).eval()
    x = torch.randn(batch, 3, size, size)

    def run_torch():
        with torch.no_grad():
            torch_model(x)

    return {
        "ONNX (onnxruntime)": lambda: session.run(["probabilities"], {"image": images}),
        "arm-jax (jit)": lambda: jax.block_until_ready(infer(images)),
        "PyTorch (eager)": run_torch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--rounds", type=int, default=5)
    results_table.add_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"forward, {args.image_size} px, float32; onnxruntime {onnxruntime.__version__}, jax {jax.__version__}, "
          f"PyTorch {torch.__version__} ({torch.get_num_threads()} threads); {os.cpu_count()} CPU cores")
    stamp, rows = results_table.stamp(), []
    for batch in map(int, args.batches.split(",")):
        runners = contenders(args.image_size, batch)
        for run in runners.values():  # compile / warm up
            run()
            run()
        times = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, run in runners.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        load = os.getloadavg()[0]
        rates = {name: batch / float(np.median(measured)) for name, measured in times.items()}
        for name, rate in rates.items():
            print(f"batch {batch:3d}  {name:20s} {rate:8.1f} images/s  (load {load:.1f})")
        rows.append({**stamp, "run": f"forward, {args.image_size} px, batch {batch}", "load average": f"{load:.1f}",
                     **{f"{name} images/s": f"{rate:.1f}" for name, rate in rates.items()}})
    if args.markdown:
        results_table.write_rows(args.markdown, "benchmark_export", rows)


if __name__ == "__main__":
    main()
