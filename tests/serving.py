"""For the serve tests: a real `arm-jax serve` process on a free port, the models and images it is sent."""

from __future__ import annotations

import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from tests.fixtures import write_image

READY = re.compile(r"ready: .* on (http://127\.0\.0\.1:\d+)")
SIZE = 64


class ServerProcess:
    """`arm-jax serve MODEL --port 0 OPTIONS` in a subprocess, its output in a log file; `url` once ready."""

    def __init__(self, model: Path, log_path: Path, *options: str, ready_within_s: float = 180):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        command = [sys.executable, "-c", "from cli.main import cli; cli()", "serve", str(model), "--port", "0",
                   *options]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        self.started = time.monotonic()
        self.url = self._wait_ready(ready_within_s)
        self.ready_s = time.monotonic() - self.started

    def _wait_ready(self, within_s: float) -> str:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            found = READY.search(self.log())
            if found:
                return found[1]
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited ({self.process.returncode}):\n{self.log()}")
            time.sleep(0.05)
        self.process.kill()
        raise AssertionError(f"the server was not ready within {within_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, within_s: float = 60) -> int:
        """SIGTERM, then its exit status (uvicorn ends by the signal after its graceful shutdown)."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            return self.process.wait(within_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        finally:
            self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.terminate()


def write_models(root: Path) -> SimpleNamespace:
    """A small random 64 px model (LoadedModel), its ONNX export, the astronaut photo and 8 aligned-size crops."""
    import onnx
    from skimage import data

    from arm_jax.interop.export import build_onnx
    from tests.small_models import small_model

    loaded = small_model(image_size=SIZE)
    onnx.save_model(build_onnx(loaded), root / "arm.onnx")
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    crops = []
    for index in range(8):  # different parts of real photos, at the model's size
        photo = photos[index % 4]
        top, left = 40 * (index // 4), 60 * (index // 4)
        crops.append(write_image(root / "crops" / f"crop{index}.png",
                                 np.ascontiguousarray(photo[top : top + 256 : 4, left : left + 256 : 4][:SIZE, :SIZE])))
    return SimpleNamespace(loaded=loaded, onnx=root / "arm.onnx", crops=crops,
                           astronaut=write_image(root / "astronaut.png", data.astronaut()))


def write_workdir(workdir: Path, loaded, step: int) -> Path:
    """`loaded` saved as a training run's checkpoint at `step` (the real orbax format `train` writes)."""
    import optax

    from arm_jax.models import architecture
    from arm_jax.training.checkpoints import Checkpoints, Progress
    from arm_jax.training.state import TrainState

    variables = loaded.variables
    state = TrainState(step=np.int32(step), params=variables["params"], batch_stats=variables["batch_stats"],
                       gar=variables["gar"], opt_state=optax.adam(1e-3).init(variables["params"]))
    checkpoints = Checkpoints(workdir)
    checkpoints.save(state, Progress(step_key=(0, 0), epoch=1), {"architecture": architecture(loaded.model),
                                                                  "class_names": list(loaded.class_names)})
    checkpoints.close()
    return workdir


def png_bomb(side: int) -> bytes:
    """A valid 1-bit gray PNG of side x side blank pixels: a few kB that decode to 3 * side**2 bytes of RGB."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row = bytes(1 + (side + 7) // 8)  # filter type 0, then the packed bits
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
