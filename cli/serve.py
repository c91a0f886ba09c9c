"""`arm-jax serve`."""

from pathlib import Path

import click

from arm_jax.serving.limits import ServeConfig

DEFAULTS = ServeConfig()


@click.command("serve")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. The default answers this machine only. Another address (0.0.0.0: every "
                   "interface) lets anyone who can reach it on the network send images and read the answers: "
                   "there is no login and no TLS, so put a reverse proxy with both (or a firewall) in front.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="0: any free port (the 'ready' line says which).")
@click.option("--max-batch", type=click.IntRange(min=1), default=DEFAULTS.max_batch, show_default=True,
              help="Faces from concurrent requests classified in one call.")
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=DEFAULTS.max_wait_ms, show_default=True,
              help="How long a batch waits for more faces after its first (0: it takes those already waiting).")
@click.option("--max-queue", type=click.IntRange(min=1), default=DEFAULTS.max_queue, show_default=True,
              help="Predict requests in progress at once; more are answered 503 at once. Each holds its decoded "
                   "photo until answered (up to 3 bytes per pixel).")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True),
              default=DEFAULTS.max_body_bytes / 2**20, show_default=True, help="Largest request body (MiB).")
@click.option("--max-megapixels", type=click.FloatRange(min=0, min_open=True),
              default=DEFAULTS.max_pixels / 1e6, show_default=True,
              help="Largest image (width x height, read from its header before decoding).")
@click.option("--timeout-s", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS.timeout_s,
              show_default=True, help="Per request: for its body to arrive and for its answer.")
@click.option("--access-log/--no-access-log", default=True, show_default=True, help="One line per request.")
def serve(model, host, port, max_batch, max_wait_ms, max_queue, max_body_mb, max_megapixels, timeout_s, access_log):
    """Keep MODEL loaded and answer over HTTP: a JSON API (POST /v1/predict) and a web page (GET /).

    MODEL is what `predict --checkpoint` takes: an exported .onnx file (onnxruntime), a training workdir or a
    model directory (JAX). It listens once the model has answered one image (the 'ready' line says how long
    loading and that took: about as long as a `predict` call once the caches hold the model; JAX's first
    start with a new architecture compiles, tens of seconds at 224 px on 2 cores, larger batch sizes in the
    background). Stop it with Ctrl-C or SIGTERM: requests in progress are answered first.
    """
    from arm_jax.serving.server import serve as run_server

    config = ServeConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                         max_body_bytes=int(max_body_mb * 2**20), max_pixels=int(max_megapixels * 1e6),
                         timeout_s=timeout_s)
    run_server(model, host=host, port=port, config=config, access_log=access_log)
