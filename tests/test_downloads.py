"""`--pretrained imagenet` / `convert imagenet`: download from a server on 127.0.0.1, cache, verify."""

import functools
import hashlib
import http.server
import socket
import threading

import jax
import numpy as np
import pytest
from click.testing import CliRunner

from arm_jax.errors import UserError
from arm_jax.interop import downloads
from arm_jax.interop.convert import expected_shapes, flax_to_torch, save_safetensors
from arm_jax.interop.model_files import load_any_model
from arm_jax.interop.pretrained import with_pretrained_backbone
from arm_jax.models import ARMResNet18
from cli.main import cli


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    """(folder served, base URL, list of request paths) of an HTTP server on 127.0.0.1."""
    folder = tmp_path / "served"
    folder.mkdir()
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Handler, directory=str(folder)))
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}", httpd.requests
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(downloads.CACHE_VARIABLE, str(folder))
    return folder


def serve_named(folder, data: bytes, stem="resnet18", suffix=".pth", digest=None) -> str:
    """Write data as STEM-<sha256 prefix>SUFFIX (torchvision's naming); return the file name."""
    name = f"{stem}-{digest or hashlib.sha256(data).hexdigest()[:8]}{suffix}"
    (folder / name).write_bytes(data)
    return name


def test_download_then_cache_hit(server, cache, monkeypatch):
    folder, base, requests = server
    data = np.random.default_rng(0).bytes(3 << 20)  # a few chunks: the progress bar loops
    name = serve_named(folder, data)
    monkeypatch.setenv(downloads.URL_VARIABLE, f"{base}/{name}")
    path = downloads.resolve_weights("imagenet")
    assert path == cache / name and path.read_bytes() == data and requests == [f"/{name}"]
    assert downloads.resolve_weights("ImageNet") == path and len(requests) == 1  # cached
    assert not list(cache.glob("*.part"))


def test_wrong_hash_is_refused_and_not_cached(server, cache, monkeypatch):
    folder, base, _ = server
    name = serve_named(folder, b"not the weights", digest="f37072fd")
    monkeypatch.setenv(downloads.URL_VARIABLE, f"{base}/{name}")
    with pytest.raises(UserError, match="downloaded file refused: its SHA-256 .* does not start "
                                        "with f37072fd"):
        downloads.resolve_weights("imagenet")
    assert list(cache.iterdir()) == []
    (cache / name).write_bytes(b"damaged")  # a bad file put in the cache by hand
    with pytest.raises(UserError, match="does not start with f37072fd .*delete it"):
        downloads.resolve_weights("imagenet")


def test_offline_says_where_to_put_the_file(cache, monkeypatch):
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(downloads.URL_VARIABLE, f"http://127.0.0.1:{port}/resnet18-f37072fd.pth")
    with pytest.raises(UserError) as error:
        downloads.resolve_weights("imagenet")
    message = str(error.value)
    assert "cannot download" in message and f"put it at {cache / 'resnet18-f37072fd.pth'}" in message
    monkeypatch.delenv(downloads.URL_VARIABLE)
    assert downloads.imagenet_url() == "https://download.pytorch.org/models/resnet18-f37072fd.pth"


def random_variables(model, seed):
    """Random arrays of `model`'s variable shapes (no init: compiling ResNet-18 costs a minute)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                        expected_shapes(model))


def test_pretrained_imagenet_and_convert_imagenet(server, cache, monkeypatch, tmp_path):
    """The served file is a torchvision-named resnet18: train's init and convert both use it."""
    folder, base, requests = server
    plain = ARMResNet18(1000, image_size=64, arrangement=False, de_albino=False, affinity=False)
    variables = random_variables(plain, 1)
    weights = tmp_path / "weights.safetensors"
    save_safetensors(flax_to_torch(variables, plain, "torchvision"), weights)
    name = serve_named(folder, weights.read_bytes(), suffix=".safetensors")
    monkeypatch.setenv(downloads.URL_VARIABLE, f"{base}/{name}")

    arm_model = ARMResNet18(7, image_size=64)
    fresh = random_variables(arm_model, 2)
    arm = with_pretrained_backbone(fresh, arm_model, "imagenet")  # what init_variables does
    np.testing.assert_array_equal(arm["params"]["backbone"]["layer4_1"]["conv2"]["kernel"],
                                  variables["params"]["backbone"]["layer4_1"]["conv2"]["kernel"])
    np.testing.assert_array_equal(arm["params"]["fc"]["kernel"], fresh["params"]["fc"]["kernel"])
    result = CliRunner().invoke(cli, ["convert", "imagenet", str(tmp_path / "resnet18")])
    assert result.exit_code == 0, result.output
    converted = load_any_model(tmp_path / "resnet18")
    assert converted.model.num_classes == 1000 and len(requests) == 1  # the cached copy
    np.testing.assert_array_equal(converted.variables["params"]["fc"]["kernel"],
                                  variables["params"]["fc"]["kernel"])
