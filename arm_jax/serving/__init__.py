"""`arm-jax serve`: a model kept loaded behind a JSON API and a web page.

limits.py: the server's settings and how an upload becomes pixels (or a 4xx error);
batcher.py: one thread that runs the classifier on batches gathered from concurrent requests;
backend.py: the model, its description and its warm-up; app.py: the HTTP routes (Starlette);
server.py: the process (uvicorn, binding, readiness, SIGTERM); static/index.html: the page.
"""
