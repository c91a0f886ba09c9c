"""The `arm-jax serve` process: bind, load and warm the model, serve with uvicorn, stop on SIGTERM.

The port is bound before the model loads (a taken port fails at once) but listens
only once the model has answered one image, so a client never waits on a half-started server:
until the "ready" line it is refused, afterwards answered. On SIGTERM or Ctrl-C
uvicorn stops listening, lets the requests in progress finish (at most the
request timeout), then the batcher stops; the process then ends by that signal.
"""

import copy
import logging
import socket
import time
from pathlib import Path

from arm_jax.errors import UserError
from arm_jax.serving.limits import ServeConfig

log = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (port 0: any free one), not yet listening."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as error:
        raise UserError(f"--host {host}: not an address of this machine ({error})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise UserError(f"cannot serve on {host}:{port} ({error.strerror}); choose another --port or --host") from None
    return sock


def logging_config() -> dict:
    """uvicorn's logging, with this package's messages on the same stream in the same format."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["arm_jax"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def serve(model: str | Path, *, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig = ServeConfig(),
          access_log: bool = True) -> None:
    """Serve MODEL (as `predict --checkpoint` takes it) until SIGTERM or Ctrl-C."""
    try:
        import uvicorn

        from arm_jax.serving.app import create_app
    except ImportError as error:
        raise UserError(f"arm-jax serve needs the 'serve' extra ({error.name} is missing): "
                        "pip install 'arm-jax[serve]'") from None
    from arm_jax.serving.backend import open_model

    started = time.perf_counter()
    sock = bind(host, port)
    try:
        served = open_model(model, config.max_batch)
    except BaseException:
        sock.close()
        raise
    address = sock.getsockname()
    url = f"http://{host if ':' not in host else f'[{host}]'}:{address[1]}"

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if not self.should_exit:
                log.info("ready: %s (%s) on %s; model loaded in %.1f s, first image in %.1f s, listening %.1f s "
                         "after the command's imports", model, served.info["backend"], url, served.load_s,
                         served.warm_up_s, time.perf_counter() - started)

    app = create_app(served, config)
    server = Server(uvicorn.Config(app, log_config=logging_config(), access_log=access_log, lifespan="on",
                                   timeout_graceful_shutdown=int(config.timeout_s) + 5))
    server.run(sockets=[sock])
