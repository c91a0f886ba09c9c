"""Joining JAX's multi-controller runtime (`--distributed`): one process per host (or per
device group on one machine), all running the same command.

The coordinator, process count and process id come from JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID when set (a launch by hand); when none is set,
`jax.distributed.initialize()` detects them from the cluster (SLURM, Open MPI, Kubernetes,
Cloud TPU). jax itself reads only the address from the environment, so without this module a
by-hand launch fails with "Number of processes must be defined".
"""

from __future__ import annotations

import itertools
import logging
import os

import jax

from arm_jax.compat import distributed_client
from arm_jax.errors import UserError

log = logging.getLogger(__name__)

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# A process that sends no heartbeat for this long is declared dead and the others stop
# (jax's default is 100 s); short enough that a SIGKILLed peer ends the run within 2 minutes.
HEARTBEAT_TIMEOUT_S = 30
# How long a process waits for all the others to join (and at barriers) before giving up.
INITIALIZATION_TIMEOUT_S = 300
# How long an exiting process waits for the others to exit too.
SHUTDOWN_TIMEOUT_S = 60
_barriers = itertools.count()  # barrier ids: every process passes the same barriers in order


def launch_settings(environ=os.environ) -> dict:
    """jax.distributed.initialize's (coordinator_address, num_processes, process_id) from
    the environment: all three, or none (then jax detects the cluster)."""
    values = {name: environ.get(name) or None for name in ENV}
    given = [name for name, value in values.items() if value is not None]
    if not given:
        return {}
    if len(given) < len(ENV):
        missing = [name for name in ENV if name not in given]
        raise UserError(f"--distributed: {', '.join(given)} set but {', '.join(missing)} not; set all "
                        "three to launch by hand, or none to let jax detect the cluster (SLURM ...)")
    settings = {"coordinator_address": values["JAX_COORDINATOR_ADDRESS"]}
    for name, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        try:
            settings[key] = int(values[name])
        except ValueError:
            raise UserError(f"{name}={values[name]!r} is not an integer") from None
    if not 0 <= settings["process_id"] < settings["num_processes"]:
        raise UserError(f"JAX_PROCESS_ID={settings['process_id']} is not in 0..JAX_NUM_PROCESSES-1 "
                        f"(JAX_NUM_PROCESSES={settings['num_processes']})")
    return settings


def initialize(*, heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
               initialization_timeout_s: int = INITIALIZATION_TIMEOUT_S) -> None:
    """Join the run's processes; must come before anything touches a jax device."""
    settings = launch_settings()
    # Cross-process collectives on the CPU need an implementation; gloo ships with jaxlib.
    # It only affects the CPU client, so setting it on GPU hosts is harmless.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**settings, initialization_timeout=initialization_timeout_s,
                                   heartbeat_timeout_seconds=heartbeat_timeout_s,
                                   shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
    except (ValueError, RuntimeError) as err:
        where = settings.get("coordinator_address", "auto-detected cluster")
        raise UserError(f"--distributed: cannot join the run's processes ({where}): "
                        f"{str(err).splitlines()[0][:300]}") from err
    log.info("process %d of %d (%d local devices, %d in all)", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def barrier(name: str, timeout_s: int = INITIALIZATION_TIMEOUT_S) -> None:
    """Wait until every process of the run gets here (nothing to wait for with one process).

    gloo gives the processes 30 s to meet at each new collective; compilations and restores
    can drift apart by more than that on a busy machine, so the runtime's barrier (with its
    own timeout) brings them together first.
    """
    if jax.process_count() < 2:
        return
    distributed_client().wait_at_barrier(f"arm_jax/{next(_barriers)}/{name}", timeout_s * 1000)


# What a collective or barrier says when a peer process is gone.
_PEER_LOST = ("Gloo", "Connection reset", "Connection closed", "heartbeat", "unhealthy", "Broken pipe",
              "barrier", "Barrier")


def lost_peer_message(err: BaseException) -> str | None:
    """A one-line message if `err` says another process of the run is gone, else None.

    The coordination service knows which processes still send heartbeats; asking it waits
    for the surviving processes (which hit the same error), at most `HEARTBEAT_TIMEOUT_S`.
    """
    if jax.process_count() < 2:
        return None
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    if not any(word in str(e) for e in chain for word in _PEER_LOST):
        return None
    lost = _lost_processes()
    who = (f"process{'es' if len(lost) > 1 else ''} {', '.join(map(str, lost))} of the run stopped"
           if lost else "another process of the run stopped or cannot be reached")
    first = " ".join(str(chain[0]).split())[:200]
    return (f"process {jax.process_index()} of {jax.process_count()}: {who} ({type(chain[0]).__name__}: "
            f"{first}); stopping. Relaunch all {jax.process_count()} processes with the same command "
            "to resume from the last checkpoint")


def _lost_processes() -> list[int]:
    """Processes the coordination service no longer counts as alive ([] if it cannot say)."""
    import concurrent.futures

    client = distributed_client()
    everyone = list(range(jax.process_count()))
    if client is None:
        return []
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        alive = pool.submit(client.get_live_nodes, everyone).result(timeout=HEARTBEAT_TIMEOUT_S)
    except Exception:  # noqa: BLE001 -- the coordinator itself may be the lost process
        return []
    finally:
        pool.shutdown(wait=False)
    alive = set(alive) if not isinstance(alive, dict) else set(alive)
    return [p for p in everyone if p not in alive]
