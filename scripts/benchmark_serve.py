"""Time to ready, latency (p50, p99) and throughput of `arm-jax serve` with 1, 4 and 16 concurrent clients.

    python scripts/benchmark_serve.py [--model MODEL] [--image-size 224] [--seconds 10] [--clients 1,4,16]

Two servers run side by side on the same model: its ONNX export (onnxruntime) and
the model itself (JAX), each with the default batching (--max-batch 16,
--max-wait-ms 10). Two paths: `crop` posts an aligned face crop at the model's
size (PNG), `detect` posts the 512 px astronaut photo (JPEG, one face) with
?detect_faces=true. Each client is a thread of this process with its own HTTP
connection, sending one request after another; the measurements of the two back
ends are interleaved (crop/1 client ONNX, then JAX, ...) so that a change of the
machine's load hits both alike. Without --model a random ARM model of
--image-size is built (speed does not depend on the weights). The clients share
the server's CPU: on a 2-core machine their HTTP work is part of what is measured.

Time to ready: each server starts twice with caches of its own (ARM_JAX_CACHE and
JAX's compilation cache in a new folder): the first start finds them empty (JAX
exports and compiles), the second finds what the first left (after its background
warm-up ended). The measurements run on the second.
"""

import argparse
import io
import os
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ and arm_jax from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_table

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import results_table  # noqa: E402  (scripts/, beside this file)
from tests.serving import ServerProcess  # noqa: E402


@dataclass(frozen=True)
class Row:
    """One measurement: a back end, a path, a number of clients."""

    backend: str
    path: str
    clients: int
    requests: int
    p50_ms: float
    p99_ms: float
    per_s: float
    faces_per_call: float


def markdown_table(rows: list[Row], machine: str) -> str:
    """The rows as a markdown table under a line naming the machine."""
    lines = [machine, "", "| back end | path | clients | requests | p50 ms | p99 ms | requests/s | faces per call |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.backend} | {r.path} | {r.clients} | {r.requests} | {r.p50_ms:.0f} | {r.p99_ms:.0f} | "
              f"{r.per_s:.1f} | {r.faces_per_call:.1f} |" for r in rows]
    return "\n".join(lines)


def images(image_size: int) -> dict[str, tuple[bytes, str, str]]:
    """path name -> (body, media type, query): the astronaut's face crop, and the whole photo."""
    from skimage import data

    from arm_jax.inference.detection import FaceDetector, crop_face

    photo = data.astronaut()
    (box,) = FaceDetector().detect(photo)
    crop, whole = io.BytesIO(), io.BytesIO()
    Image.fromarray(crop_face(photo, box, image_size)).save(crop, "PNG")
    Image.fromarray(photo).save(whole, "JPEG", quality=90)
    return {"crop": (crop.getvalue(), "image/png", "detect_faces=false"),
            "detect": (whole.getvalue(), "image/jpeg", "detect_faces=true")}


READY_SPLIT = re.compile(r"model loaded in ([\d.]+) s, first image in ([\d.]+) s")
SIZES_READY = re.compile(r"batch sizes [\d, ]+ ready ([\d.]+) s after the first")


@dataclass(frozen=True)
class Start:
    """One start of a server: seconds from launch to its 'ready' line, and that line's split."""

    ready_s: float
    load_s: float
    first_image_s: float
    other_sizes_s: float | None  # JAX: the background warm-up of the larger batch sizes


def start_server(model: Path, log: Path, *, wait_for_warm_up: bool) -> tuple[ServerProcess, Start]:
    """A server and how its start went; with wait_for_warm_up, once its larger batch sizes are ready too."""
    server = ServerProcess(model, log, "--no-access-log", ready_within_s=600)
    deadline = time.monotonic() + 600
    while wait_for_warm_up and not SIZES_READY.search(server.log()) and time.monotonic() < deadline:
        time.sleep(0.2)
    load_s, first_image_s = map(float, READY_SPLIT.search(server.log()).groups())
    warm = SIZES_READY.search(server.log())
    return server, Start(server.ready_s, load_s, first_image_s, float(warm[1]) if warm else None)


def stats(url: str) -> dict:
    return httpx.get(f"{url}/v1/stats").json()


def measure(url: str, body: bytes, media_type: str, query: str, clients: int, seconds: float) -> tuple:
    """(latencies in s, elapsed s, faces per classifier call) of `clients` threads posting for `seconds`."""
    before = stats(url)["faces_per_batch"]
    latencies, lock, stop_at = [], threading.Lock(), [0.0]
    # All clients start together, once each has its warm connection; the clock starts then.
    start = threading.Barrier(clients + 1, action=lambda: stop_at.__setitem__(0, time.perf_counter() + seconds))

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as session:
            post = lambda: session.post(f"/v1/predict?{query}", content=body, headers={"content-type": media_type})
            post().raise_for_status()  # a warm connection
            start.wait()
            while time.perf_counter() < stop_at[0]:
                sent = time.perf_counter()
                post().raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - sent)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - (stop_at[0] - seconds)
    after = stats(url)["faces_per_batch"]
    calls = {int(k): v - before.get(k, 0) for k, v in after.items()}
    faces_per_call = sum(k * v for k, v in calls.items()) / max(1, sum(calls.values()))
    return latencies, elapsed, faces_per_call


def model_files(model: str | None, image_size: int, root: Path) -> tuple[Path, Path]:
    """(the model JAX serves, its ONNX export)."""
    import onnx

    from arm_jax.interop.export import build_onnx, export_model

    if model is None:
        from tests.small_models import small_model, write_small_model

        model_dir = write_small_model(root / "model", image_size=image_size)
        onnx.save_model(build_onnx(small_model(image_size)), root / "arm.onnx")
        return model_dir, root / "arm.onnx"
    export_model(model, root / "arm.onnx")
    return Path(model), root / "arm.onnx"


def image_size_of(onnx_model: Path) -> int:
    from arm_jax.inference.predict import OnnxClassifier

    return OnnxClassifier(onnx_model).image_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model directory or workdir (default: a random one)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--clients", default="1,4,16")
    results_table.add_option(parser)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="benchmark-serve-"))
    jax_model, onnx_model = model_files(args.model, args.image_size, root)
    bodies = images(image_size_of(onnx_model))
    load_before = os.getloadavg()[0]
    os.environ["ARM_JAX_CACHE"] = str(root / "cache")  # empty: the first start is a first start
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(root / "cache" / "jax-compile")
    servers, starts = {}, {}
    try:
        for backend, model in (("onnxruntime", onnx_model), ("jax", jax_model)):
            first, first_start = start_server(model, root / f"{backend}-1.log", wait_for_warm_up=backend == "jax")
            first.terminate()
            servers[backend], second_start = start_server(model, root / f"{backend}-2.log", wait_for_warm_up=False)
            starts[backend] = (first_start, second_start)
            print(f"{backend}: ready {first_start.ready_s:.1f} s after launch (first start), "
                  f"{second_start.ready_s:.1f} s (second)", file=sys.stderr)
        rows = []
        for path, (body, media_type, query) in bodies.items():
            for clients in map(int, args.clients.split(",")):
                for backend, server in servers.items():
                    latencies, elapsed, faces_per_call = measure(server.url, body, media_type, query, clients,
                                                                 args.seconds)
                    milliseconds = 1000 * np.asarray(latencies)
                    rows.append(Row(backend, path, clients, len(latencies), float(np.percentile(milliseconds, 50)),
                                    float(np.percentile(milliseconds, 99)), len(latencies) / elapsed,
                                    faces_per_call))
                    print(markdown_table(rows[-1:], "").splitlines()[-1], file=sys.stderr)
    finally:
        for server in servers.values():
            server.terminate()
    load_after = os.getloadavg()[0]
    machine = (f"{results_table.cpu()}, {args.image_size} px model, {args.seconds:g} s per row, "
               f"load average {load_before:.1f} before / {load_after:.1f} after")
    print(markdown_table(rows, machine))
    for backend, (first, second) in starts.items():
        print(f"{backend}: ready {first.ready_s:.1f} s after launch on a first start ({first.load_s:.1f} s loading, "
              f"{first.first_image_s:.1f} s to the first image), {second.ready_s:.1f} s on a second "
              f"({second.load_s:.1f} + {second.first_image_s:.1f} s)" + (
                  f"; larger batch sizes {first.other_sizes_s:.1f} s later in the background on the first start"
                  if first.other_sizes_s is not None else ""))
    if args.markdown:
        write_markdown(args.markdown, starts, rows, args.image_size, f"{load_before:.1f} / {load_after:.1f}")


def write_markdown(path: Path, starts: dict, rows: list[Row], image_size: int, load: str) -> None:
    """This machine's rows of the two tables: one row per back end (time to ready), and one per
    back end and path with the 1 / 4 / 16 clients' numbers side by side in each cell."""
    stamp = results_table.stamp()
    results_table.write_rows(path, "benchmark_serve_ready", [
        {**stamp, "run": f"{backend}, {image_size} px",
         "first start: ready s (load + first image)": f"{first.ready_s:.1f} ({first.load_s:.1f} + {first.first_image_s:.1f})",
         "second start: ready s": f"{second.ready_s:.1f}",
         "other batch sizes ready s later": "-" if first.other_sizes_s is None else f"{first.other_sizes_s:.1f}"}
        for backend, (first, second) in starts.items()])
    by_run: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        by_run.setdefault((row.backend, row.path), []).append(row)
    clients = " / ".join(str(r.clients) for r in next(iter(by_run.values())))

    def cell(group: list[Row], value) -> str:
        return " / ".join(value(r) for r in group)

    results_table.write_rows(path, "benchmark_serve", [
        {**stamp, "run": f"{backend}, {path_name}, {image_size} px", "load average": load,
         f"requests/s, {clients} clients": cell(group, lambda r: f"{r.per_s:.1f}"),
         "p50 ms": cell(group, lambda r: f"{r.p50_ms:.0f}"), "p99 ms": cell(group, lambda r: f"{r.p99_ms:.0f}"),
         "faces per call": cell(group, lambda r: f"{r.faces_per_call:.1f}")}
        for (backend, path_name), group in by_run.items()])

if __name__ == "__main__":
    main()
