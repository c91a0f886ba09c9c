"""The HTTP side of `arm-jax serve` (Starlette): routes, admission, bounded and timed uploads, JSON errors.

POST /v1/predict answers what `predict --json` writes for one image: an aligned
crop (default) or, with ?detect_faces=true, the faces found in a photo. Each
request is read here (at most max_body_bytes, within timeout_s), then decoded,
searched for faces and cropped in a worker thread; the classifier runs in the
batcher's thread on faces gathered from all requests. At most max_queue
requests are inside at once: the next one is answered 503 before its body is read.
"""

import asyncio
import base64
import hashlib
import logging
import re
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib import resources
from pathlib import Path

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from arm_jax.inference.predict import FacePipeline, crop_prediction, face_at_size
from arm_jax.serving.backend import ServedModel
from arm_jax.serving.batcher import Batcher
from arm_jax.serving.limits import ServeConfig, UploadError, decode_upload

log = logging.getLogger(__name__)

FILE_FIELD = "image"  # multipart: curl -F image=@photo.jpg
RAW_UPLOAD_NAME = "upload"  # the `path` of an image sent as the raw body
MULTIPART = "multipart/form-data"


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


class Admission:
    """At most `limit` requests inside at once; `enter` says False at once when full."""

    def __init__(self, limit: int):
        self.limit, self._inside, self._lock = limit, 0, threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self._inside >= self.limit:
                return False
            self._inside += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._inside -= 1

    @property
    def inside(self) -> int:
        return self._inside


def page_with_policy() -> tuple[str, str]:
    """The page, and a Content-Security-Policy that lets the browser run its own inline script and style
    only (by their hashes) and fetch only from this server: the page cannot load anything from elsewhere."""
    page = resources.files("arm_jax.serving").joinpath("static/index.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    policy = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
              "connect-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
              "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return page, policy


class Service:
    """The state behind the routes: the model, the batcher, the worker threads, the counters."""

    def __init__(self, served: ServedModel, config: ServeConfig):
        self.served, self.config = served, config
        self.admission = Admission(config.max_queue)
        self.batcher: Batcher | None = None
        self.workers: ThreadPoolExecutor | None = None
        self._pipelines = threading.local()  # one FacePipeline (OpenCV cascades) per worker thread
        self._answered: Counter = Counter()  # HTTP status -> count, for /v1/stats
        self._lock = threading.Lock()

    def start(self) -> None:
        self.batcher = Batcher(self.served.classifier, self.config.max_batch, self.config.max_wait_ms / 1000)
        # One thread per admitted request, so none waits for a thread behind a slow one.
        self.workers = ThreadPoolExecutor(self.config.max_queue, thread_name_prefix="arm-jax-request")

    def stop(self) -> None:
        """After the server's last request: stop the threads."""
        self.workers.shutdown(wait=True)
        self.batcher.close()
        answered = ", ".join(f"{count} x {status}" for status, count in self.stats()["responses"].items())
        log.info("stopped; predict answered %s", answered or "nothing")

    def count(self, status: int) -> None:
        with self._lock:
            self._answered[status] += 1

    def stats(self) -> dict:
        with self._lock:
            responses = {str(k): v for k, v in sorted(self._answered.items())}
        return {"in_progress": self.admission.inside, "responses": responses, **self.batcher.stats()}

    def answer(self, data: bytes, name: str, media_type: str | None, detect_faces: bool) -> dict:
        """In a worker thread: the JSON `predict --json` writes for this image."""
        image = decode_upload(data, name, media_type, self.config.max_pixels)
        if detect_faces:
            pipeline = getattr(self._pipelines, "pipeline", None)
            if pipeline is None:
                pipeline = self._pipelines.pipeline = FacePipeline(self.batcher)
            return pipeline.photo(Path(name), image, annotate_dir=None).as_dict()
        face = face_at_size(image, self.batcher.image_size)
        return asdict(crop_prediction(name, self.batcher.probabilities(face[None])[0], self.batcher.class_names))


def parse_flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name, "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise UploadError(400, f"?{name}={value}: expected true or false")
    return value in ("true", "1")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise UploadError(413, f"the body is {int(declared):,} bytes, more than the server's limit of "
                               f"{limit:,} (--max-body-mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise UploadError(413, f"the body is more than the server's limit of {limit:,} bytes (--max-body-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_upload(request: Request, limit: int) -> tuple[bytes, str, str | None]:
    """(image bytes, its name, its declared media type): the raw body, or the `image` file of a multipart form."""
    body = await read_body(request, limit)
    media_type = request.headers.get("content-type", "")
    if media_type.split(";")[0].strip().lower() != MULTIPART:
        return body, RAW_UPLOAD_NAME, media_type

    async def replay():  # the form parser reads the body already read, from memory
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
    try:
        upload = form.get(FILE_FIELD)
        if not isinstance(upload, UploadFile):
            raise UploadError(400, f"the multipart form has no file field '{FILE_FIELD}' (curl -F "
                                   f"{FILE_FIELD}=@photo.jpg); its fields: {', '.join(form.keys()) or 'none'}")
        return await upload.read(), upload.filename or RAW_UPLOAD_NAME, upload.content_type
    finally:
        await form.close()


def create_app(served: ServedModel, config: ServeConfig) -> Starlette:
    """The ASGI application; the batcher and worker threads live from its start-up to its shutdown."""
    service = Service(served, config)
    page, policy = page_with_policy()

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Content-Security-Policy": policy, "Cache-Control": "no-cache"})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def model(request: Request) -> Response:
        limits = {"max_batch": config.max_batch, "max_body_bytes": config.max_body_bytes,
                  "max_pixels": config.max_pixels, "timeout_s": config.timeout_s}
        return JSONResponse({**served.info, "limits": limits})

    async def stats(request: Request) -> Response:
        return JSONResponse(service.stats())

    async def predict(request: Request) -> Response:
        response = await predict_response(request)
        service.count(response.status_code)
        return response

    async def predict_response(request: Request) -> Response:
        if not service.admission.enter():
            return error_response(503, f"the server is busy: {config.max_queue} requests are in progress "
                                       "(--max-queue); retry later", headers={"Retry-After": "1"})
        handed_over = False
        try:
            detect_faces = parse_flag(request, "detect_faces")
            async with asyncio.timeout(config.timeout_s):
                data, name, media_type = await read_upload(request, config.max_body_bytes)
                job = service.workers.submit(service.answer, data, name, media_type, detect_faces)
                job.add_done_callback(lambda _: service.admission.leave())  # when done, even after a timeout
                handed_over = True
                return JSONResponse(await asyncio.wrap_future(job))
        except UploadError as error:
            return error_response(error.status, error.message)
        except HTTPException as error:  # a malformed multipart form
            return error_response(error.status_code, error.detail)
        except TimeoutError:
            if handed_over:
                return error_response(503, f"no answer within {config.timeout_s:g} s (--timeout-s)")
            return error_response(408, f"the request's body did not arrive within {config.timeout_s:g} s "
                                       "(--timeout-s)")
        except ClientDisconnect:
            return Response(status_code=499)  # nobody reads it; counted in the stats
        except Exception as error:
            log.exception("POST /v1/predict failed")
            return error_response(500, f"internal error ({type(error).__name__}); the server's log has the details")
        finally:
            if not handed_over:
                service.admission.leave()

    async def http_error(request: Request, error: HTTPException) -> Response:
        return error_response(error.status_code, error.detail, headers=error.headers)

    async def server_error(request: Request, error: Exception) -> Response:
        return error_response(500, f"internal error ({type(error).__name__}); the server's log has the details")

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        finally:
            service.stop()

    routes = [Route("/", index), Route("/healthz", healthz), Route("/v1/model", model), Route("/v1/stats", stats),
              Route("/v1/predict", predict, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error, Exception: server_error})
