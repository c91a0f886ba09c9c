"""`arm-jax serve`: a real server process on 127.0.0.1, a real HTTP client (httpx), small models.

The API must answer what `predict --json` writes, batch concurrent requests, refuse what
it cannot take with a 4xx JSON error and go on serving, shed load with 503 at once, and
finish its requests on SIGTERM.
"""

import io
import json
import os
import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli.main import cli
from tests.serving import ServerProcess, png_bomb, write_models, write_workdir
from tests.small_models import EXPRESSIONS

TIMEOUT_S = 3  # the test server's --timeout-s: how long a slow body is waited for
MAX_BODY = 2**20  # --max-body-mb 1


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def expected(models):
    """onnxruntime's probabilities for each crop, one at a time (no server, no batching)."""
    from arm_jax.inference.predict import OnnxClassifier

    classifier = OnnxClassifier(models.onnx)
    return [classifier.probabilities(np.asarray(Image.open(p))[None])[0] for p in models.crops]


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    with ServerProcess(models.onnx, log, "--max-batch", "8", "--max-wait-ms", "20", "--max-queue", "32",
                       "--timeout-s", str(TIMEOUT_S), "--max-body-mb", "1", "--max-megapixels", "1",
                       "--no-access-log") as process:
        yield process


def post_image(url: str, content: bytes, *, name: str | None = None, media_type: str = "image/png",
               detect_faces: bool = False) -> httpx.Response:
    """The raw body (name None) or a multipart form with the image in its `image` field."""
    params = {"detect_faces": "true" if detect_faces else "false"}
    if name is None:
        return httpx.post(f"{url}/v1/predict", params=params, content=content, headers={"content-type": media_type},
                          timeout=60)
    return httpx.post(f"{url}/v1/predict", params=params, files={"image": (name, content, media_type)}, timeout=60)


def probabilities(answer: dict) -> np.ndarray:
    return np.array([answer["probabilities"][name] for name in EXPRESSIONS])


def assert_serves_a_good_request(url: str, models, expected) -> None:
    response = post_image(url, models.crops[3].read_bytes(), name="crop3.png")
    assert response.status_code == 200, response.text
    assert np.abs(probabilities(response.json()) - expected[3]).max() <= 1e-5


def test_answers_equal_predict_json(server, models):
    """A photo with ?detect_faces=true and an aligned crop: the JSON `arm-jax predict --json` writes for the file."""
    for detect_faces, image in ((True, models.astronaut), (False, models.crops[0])):
        options = ["--detect-faces"] if detect_faces else []
        cli_run = CliRunner().invoke(cli, ["predict", "--checkpoint", str(models.onnx), *options, str(image),
                                           "--json", "-"])
        assert cli_run.exit_code == 0, cli_run.output
        (from_cli,) = json.loads(cli_run.output)
        response = post_image(server.url, image.read_bytes(), name=image.name, detect_faces=detect_faces)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["path"] == image.name
        if detect_faces:
            photo_boxes = [f["box"] for f in answer["faces"]]
            assert photo_boxes == [f["box"] for f in from_cli["faces"]] and photo_boxes
            pairs = list(zip(answer["faces"], from_cli["faces"]))
            assert [a["expression"] for a, _ in pairs] == [c["expression"] for _, c in pairs]
            assert {k: v for k, v in answer.items() if k not in ("path", "faces")} == \
                {k: v for k, v in from_cli.items() if k not in ("path", "faces")}
        else:
            pairs = [(answer, from_cli)]
            assert (answer["label"], answer["class_name"]) == (from_cli["label"], from_cli["class_name"])
        for served, written in pairs:
            assert np.abs(probabilities(served) - probabilities(written)).max() <= 1e-5
    # The raw body answers as the form does; a photo without a face says so.
    raw = post_image(server.url, models.astronaut.read_bytes(), detect_faces=True).json()
    assert raw["path"] == "upload" and [f["box"] for f in raw["faces"]] == photo_boxes
    coffee = io.BytesIO()
    Image.fromarray(np.asarray(Image.open(models.crops[1]).resize((256, 256)))).save(coffee, "JPEG")
    no_face = post_image(server.url, coffee.getvalue(), name="coffee.jpg", media_type="image/jpeg", detect_faces=True)
    assert no_face.json()["faces"] == [] and no_face.json()["message"] == "no face found"


def test_model_info_health_page_and_json_errors(server):
    info = httpx.get(f"{server.url}/v1/model").json()
    assert info["class_names"] == list(EXPRESSIONS) and info["image_size"] == 64
    assert info["backend"] == "onnxruntime" and info["checkpoint_step"] is None and info["model"] == "arm.onnx"
    assert info["limits"] == {"max_batch": 8, "max_body_bytes": MAX_BODY, "max_pixels": 1_000_000,
                              "timeout_s": TIMEOUT_S}
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"] and 'id="file"' in page.text
    assert not re.search(r"""(src|href)\s*=\s*["']?[a-z]*:?//|url\(|@import""", page.text)  # nothing from elsewhere
    missing = httpx.get(f"{server.url}/v2/predict")
    assert missing.status_code == 404 and missing.json()["status"] == 404
    assert httpx.get(f"{server.url}/v1/predict").status_code == 405


def test_concurrent_clients_get_their_own_answers_in_batches(server, models, expected):
    """8 clients x 50 requests at once: every answer is that crop's; the classifier ran batches of several."""
    crops = [p.read_bytes() for p in models.crops]
    before = httpx.get(f"{server.url}/v1/stats").json()

    def client(number: int) -> list[tuple[int, int, dict]]:
        with httpx.Client(base_url=server.url, timeout=60) as session:
            answers = []
            for request in range(50):
                index = (number + request) % len(crops)
                response = session.post("/v1/predict", content=crops[index], headers={"content-type": "image/png"})
                answers.append((index, response.status_code, response.json()))
            return answers

    with ThreadPoolExecutor(8) as pool:
        answers = [a for client_answers in pool.map(client, range(8)) for a in client_answers]
    assert len(answers) == 400 and {status for _, status, _ in answers} == {200}
    worst = max(np.abs(probabilities(answer) - expected[index]).max() for index, _, answer in answers)
    assert worst <= 1e-5
    after = httpx.get(f"{server.url}/v1/stats").json()
    batched = {int(size): count - before["faces_per_batch"].get(size, 0)
               for size, count in after["faces_per_batch"].items()}
    assert sum(size * count for size, count in batched.items()) == 400
    assert max(size for size, count in batched.items() if count) > 1 and max(batched) <= 8
    assert after["in_progress"] == 0


def test_batcher_hands_each_caller_its_rows_in_batches_of_at_most_max_batch(models):
    """In process, on the real classifier: callers of 1-11 faces at once (11 > max_batch is run in slices)."""
    from arm_jax.inference.predict import OnnxClassifier
    from arm_jax.serving.batcher import Batcher

    classifier = OnnxClassifier(models.onnx)
    faces = np.random.default_rng(0).integers(0, 256, (24, 64, 64, 3), dtype=np.uint8)
    sizes = [3, 1, 2, 7, 11]
    jobs = np.split(faces[: sum(sizes)], np.cumsum(sizes)[:-1])
    batcher = Batcher(classifier, max_batch=4, max_wait_s=0.05)
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(batcher.probabilities, jobs))
        assert batcher.probabilities(faces[:0]).shape == (0, len(EXPRESSIONS))
        stats = batcher.stats()
    finally:
        batcher.close()
    for job, answer in zip(jobs, answers):
        assert np.abs(answer - classifier.probabilities(job)).max() <= 1e-5
    # Every face once, in calls of at most max_batch faces (a caller with more is run in slices).
    assert sum(int(size) * count for size, count in stats["faces_per_batch"].items()) == sum(sizes)
    assert max(map(int, stats["faces_per_batch"])) == 4
    with pytest.raises(RuntimeError, match="stopped"):
        batcher.probabilities(faces[:1])


def raw_request(url: str, head: bytes, body: bytes, wait_s: float) -> tuple[bytes, float]:
    """Send a request's head and part of its body over a socket, then read until the server closes it."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(head + body)
        started = time.monotonic()
        connection.settimeout(wait_s)
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
        return reply, time.monotonic() - started


@pytest.mark.slow  # fast tier: waits out the server's --timeout-s
def test_a_slow_body_gets_408_while_others_are_served(server, models, expected):
    """A client that announces 100 kB and sends 1 kB gets 408 after --timeout-s; others meanwhile are not held up."""
    head = (b"POST /v1/predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n"
            b"Content-Length: 100000\r\n\r\n")
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(raw_request, server.url, head, models.astronaut.read_bytes()[:1000], TIMEOUT_S + 30)
        time.sleep(0.5)
        assert_serves_a_good_request(server.url, models, expected)
        reply, waited = slow.result()
    status_line, _, body = reply.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 408 Request Timeout"
    assert b"--timeout-s" in body.split(b"\r\n\r\n", 1)[1]
    assert TIMEOUT_S - 0.5 <= waited <= TIMEOUT_S + 10
    assert_serves_a_good_request(server.url, models, expected)


def jpeg_of(path: Path) -> bytes:
    out = io.BytesIO()
    Image.open(path).save(out, "JPEG")
    return out.getvalue()


# name -> (the body, post_image's keywords, the status, a phrase the error must contain); bodies are built when used.
HOSTILE_UPLOADS = {
    "empty": (lambda m: b"", {}, 400, "upload: the image is empty"),
    "empty_file": (lambda m: b"", {"name": "face.png"}, 400, "face.png: the image is empty"),
    "truncated_png": (lambda m: m.astronaut.read_bytes()[:100_000], {"name": "face.png"}, 400, "truncated"),
    "truncated_jpeg": (lambda m: jpeg_of(m.astronaut)[:5000], {"name": "face.jpg", "media_type": "image/jpeg"}, 400,
                       "truncated"),
    "not_an_image": (lambda m: os.urandom(3000), {"name": "face.png"}, 415, "not a JPEG, PNG, BMP or WebP"),
    "text_file": (lambda m: b"hello\n" * 100, {"name": "notes.txt", "media_type": "text/plain"}, 415, "'.txt'"),
    "text_body": (lambda m: b"hello\n" * 100, {"media_type": "text/plain"}, 415, "'text/plain', not as an image"),
    "png_named_jpg": (lambda m: m.astronaut.read_bytes(), {"name": "face.jpg", "media_type": "image/jpeg"}, 415,
                       "JPEG (by its name or media type) but it is PNG"),
    "decompression_bomb": (lambda m: png_bomb(12_000), {"name": "bomb.png"}, 413, "refused from its header"),
    "too_large": (lambda m: bytes(MAX_BODY + 1), {"name": "big.png"}, 413, "--max-body-mb"),
    "too_large_chunked": (lambda m: iter([bytes(2**16)] * 17), {}, 413, "--max-body-mb"),  # sent chunked
}


@pytest.mark.parametrize("case", list(HOSTILE_UPLOADS))
def test_hostile_upload_gets_a_4xx_json_error_and_the_server_goes_on(server, models, expected, case):
    body, kwargs, status, phrase = HOSTILE_UPLOADS[case]
    started = time.monotonic()
    response = post_image(server.url, body(models), **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["status"] == status and phrase in response.json()["error"], response.json()
    assert time.monotonic() - started < TIMEOUT_S  # refused, not timed out (the bomb is never decoded)
    assert_serves_a_good_request(server.url, models, expected)


def test_bad_query_and_malformed_form(server, models, expected):
    response = httpx.post(f"{server.url}/v1/predict?detect_faces=maybe", content=b"x")
    assert response.status_code == 400 and "detect_faces=maybe" in response.json()["error"]
    form = httpx.post(f"{server.url}/v1/predict", content=b"--x\r\nnot a part",
                      headers={"content-type": "multipart/form-data; boundary=x"})
    assert form.status_code == 400 and form.json()["status"] == 400
    misnamed = httpx.post(f"{server.url}/v1/predict", files={"file": ("a.png", models.crops[0].read_bytes())})
    assert misnamed.status_code == 400 and "no file field 'image'" in misnamed.json()["error"]
    assert_serves_a_good_request(server.url, models, expected)


def wait_for_in_progress(url: str, count: int, within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    while httpx.get(f"{url}/v1/stats").json()["in_progress"] < count:
        assert time.monotonic() < deadline, f"never {count} requests in progress"
        time.sleep(0.02)


@pytest.mark.slow  # fast tier: starts a server of its own, whose batches wait 3 s
def test_full_queue_answers_503_at_once(models, expected, tmp_path):
    """--max-queue 2, and batches that wait 3 s for more faces: the third request is turned away at once."""
    crop = models.crops[3].read_bytes()
    with ServerProcess(models.onnx, tmp_path / "server.log", "--max-queue", "2", "--max-batch", "64",
                       "--max-wait-ms", "3000", "--no-access-log") as server:
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(post_image, server.url, crop) for _ in range(2)]
            wait_for_in_progress(server.url, 2)
            started = time.monotonic()
            refused = post_image(server.url, crop)
            refused_after = time.monotonic() - started
            answers = [job.result() for job in waiting]
        assert refused.status_code == 503 and "--max-queue" in refused.json()["error"]
        assert refused.headers["retry-after"] == "1" and refused_after < 1.5
        assert [a.status_code for a in answers] == [200, 200]
        assert all(np.abs(probabilities(a.json()) - expected[3]).max() <= 1e-5 for a in answers)
        stats = httpx.get(f"{server.url}/v1/stats").json()
        assert stats["requests_per_batch"] == {"2": 1} and stats["responses"] == {"200": 2, "503": 1}
        assert_serves_a_good_request(server.url, models, expected)


@pytest.mark.slow  # fast tier: starts and stops a server of its own
def test_sigterm_finishes_the_request_in_progress_and_refuses_new_ones(models, expected, tmp_path):
    crop = models.crops[3].read_bytes()
    server = ServerProcess(models.onnx, tmp_path / "server.log", "--max-batch", "64", "--max-wait-ms", "3000")
    try:
        with ThreadPoolExecutor(1) as pool:
            in_progress = pool.submit(post_image, server.url, crop)
            wait_for_in_progress(server.url, 1)
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{server.url}/healthz")
            answer = in_progress.result()
        assert answer.status_code == 200 and np.abs(probabilities(answer.json()) - expected[3]).max() <= 1e-5
        assert server.terminate(within_s=30) == -signal.SIGTERM
    finally:
        if server.process.poll() is None:
            server.process.kill()
    log = server.log()
    assert "predict answered 1 x 200" in log and "Application shutdown complete" in log


def test_jax_backend_serves_a_workdir_with_its_step(models, server, tmp_path):
    """A training workdir in JAX: its checkpoint's step, and the ONNX export's answers (to float32 rounding)."""
    workdir = write_workdir(tmp_path / "run", models.loaded, step=7)
    with ServerProcess(workdir, tmp_path / "jax.log", "--max-batch", "2", "--max-wait-ms", "50",
                       "--no-access-log") as jax_server:
        info = httpx.get(f"{jax_server.url}/v1/model").json()
        assert (info["backend"], info["checkpoint_step"], info["class_names"]) == ("jax", 7, list(EXPRESSIONS))
        crops = [p.read_bytes() for p in models.crops[:3]]
        with ThreadPoolExecutor(3) as pool:
            from_jax = list(pool.map(lambda crop: post_image(jax_server.url, crop).json(), crops))
        from_onnx = [post_image(server.url, crop).json() for crop in crops]
        assert max(np.abs(probabilities(a) - probabilities(b)).max() for a, b in zip(from_jax, from_onnx)) <= 1e-4
        assert [a["class_name"] for a in from_jax] == [b["class_name"] for b in from_onnx]
        assert "first image in" in jax_server.log()


def test_start_up_errors_are_one_line_messages(tmp_path):
    missing = CliRunner().invoke(cli, ["serve", str(tmp_path / "nothing.onnx"), "--port", "0"])
    assert missing.exit_code == 2 and "nothing.onnx: no such file" in missing.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = CliRunner().invoke(cli, ["serve", str(tmp_path / "m.onnx"), "--port", str(taken.getsockname()[1])])
    assert busy.exit_code == 2 and "choose another --port" in busy.output
    assert "Traceback" not in missing.output + busy.output
