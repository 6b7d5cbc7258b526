"""Joining or starting Ray for a run or a QA report, the same way for both.

``ray.init(address=None)`` joins the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets
it), else the one ``ray start`` runs on this machine, else starts a local Ray; ``address:
"local"`` always starts a local one. The dashboard is started only when asked for: it costs a
local Ray seconds of start-up and a few hundred MB.

Ray 2.60 also logs, at ERROR level, once per process and for every Ray Data actor pool, that the
pool's actor "has constructor arguments in the object store and max_restarts > 0"
(ray-project/ray#53727, #57733): Ray Data itself hands each ``MapWorker`` its map transformer and
its ``DataContext`` as object references (``ray.put``), whatever the pool's own arguments, and
gives the actors ``max_restarts=-1``. The encoder pool needs those restarts (a crashed actor is
restarted and its batch redone), and Ray Data holds those references for the pool's whole life,
so the restart the message warns about cannot lose them. It cannot be avoided at its cause from
latentize's side; :func:`init_ray` spends Ray's once-per-process message on a throwaway actor
that is never scheduled, with this process's stderr pointed at ``/dev/null`` for that one call.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["init_ray"]

logger = logging.getLogger(__name__)

#: A node id no cluster has (valid hex, not Ray's nil id): the throwaway actor is never placed.
_NO_NODE = "00" * 27 + "01"


def init_ray(*, address: str | None, dashboard: bool) -> bool:
    """Joins or starts Ray unless this process is connected already; returns whether it did.

    Args:
        address: ``ray.init``'s address (None: ``RAY_ADDRESS``, a ``ray start`` cluster on this
            machine, else a new local Ray; ``local``: always a new local Ray).
        dashboard: start Ray's dashboard with a new local Ray (ignored when joining).
    """
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=dashboard)
    _spend_actor_restart_warning()
    return True


def _spend_actor_restart_warning() -> None:
    """Triggers Ray's once-per-process actor-restart message with stderr silenced (see the
    module docstring). Does nothing when stderr has no file descriptor; any failure is logged
    at debug level and leaves the message to appear where it would have."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        stderr_fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return

    class _Unplaced:
        def __init__(self, arg: object) -> None:  # pragma: no cover - never runs
            self.arg = arg

    remote: object = ray.remote(num_cpus=0, max_restarts=1)(_Unplaced)
    arg = ray.put(None)
    sys.stderr.flush()
    saved = os.dup(stderr_fd)
    actor = None
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), stderr_fd)
            try:
                strategy = NodeAffinitySchedulingStrategy(node_id=_NO_NODE, soft=False)
                actor = remote.options(scheduling_strategy=strategy).remote(arg)  # type: ignore[attr-defined]
            finally:
                os.dup2(saved, stderr_fd)
    except Exception as exc:  # noqa: BLE001 - cosmetic: Ray's message then shows as before
        logger.debug("could not pre-empt Ray's actor restart message (%s: %s)", type(exc).__name__, exc)
    finally:
        os.close(saved)
    if actor is not None:
        ray.kill(actor)
