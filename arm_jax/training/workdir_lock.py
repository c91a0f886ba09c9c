"""One live training run per workdir: an advisory `fcntl.flock` on `<workdir>/train.lock`.

The kernel drops a flock when its process ends, however it ends (SIGKILL, out-of-memory
killer), so a killed run never leaves the workdir blocked: the lock file may stay, the lock
does not. The file records who holds it, for the refusal message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

from arm_jax.errors import UserError

LOCK_FILE = "train.lock"


@contextlib.contextmanager
def workdir_lock(workdir: str | Path, *, enabled: bool = True):
    """Hold the workdir's lock for the block; UserError if a live run holds it.

    With several processes only process 0 locks (`enabled`): they share the workdir.
    """
    if not enabled:
        yield
        return
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise UserError(f"{workdir}: in use by a running `arm-jax train` ({holder}, lock {path}); "
                            "wait for it to finish or stop it, or use another --workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
