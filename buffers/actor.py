"""The replay buffer as a Ray actor: ``ray.remote`` applied at launch (STYLE rule 3).

Concurrency: a *threaded* actor (``max_concurrency > 1``). ``sample`` and a blocking ``push`` wait on
the buffer's condition variable, which releases its lock, so while the learner waits for data the
rollout actors' pushes (which are what it waits for) and the driver's ``stats`` still run. With
``max_concurrency=1`` a blocked ``sample`` would hold the actor's only slot until its timeout and
starve the very pushes it waits for. Not an async actor: the buffer's work is file I/O and Arrow
kernels, both synchronous, and the plain class must run in tests without an event loop. Choose
``max_concurrency`` above the number of callers that may block at once (rollout actors + learner
ranks) plus one for the driver.

Failures: ``max_restarts`` restarts the process after a crash and the new instance recovers from
the files at ``uri`` (every accepted row is acknowledged or available again; leases are dropped).
``max_task_retries=-1`` re-runs the calls that were in flight on the restarted actor, which is safe
because every call is idempotent in effect: a retried push finds its rows already stored and
answers ``duplicate_traj_id`` for them, a retried ack counts ``already_retired``, and a retried
sample leases afresh (the first lease died with the process).
"""

from __future__ import annotations

import os

import ray
from ray.actor import ActorHandle

from buffers.config import BufferConfig
from buffers.replay import ReplayBuffer


class ReplayBufferService(ReplayBuffer):
    """:class:`ReplayBuffer` plus what only a separate process needs."""

    def pid(self) -> int:
        """The actor's process id (crash tests, operators attaching a profiler)."""
        return os.getpid()


def launch_buffer_actor(
    config: BufferConfig,
    uri: str,
    *,
    name: str | None = None,
    namespace: str | None = None,
    max_restarts: int = -1,
    max_task_retries: int = -1,
    max_concurrency: int = 16,
    num_cpus: float = 1.0,
) -> ActorHandle:
    """Start the replay buffer actor on ``uri`` (recovering what is already there).

    Args:
        config: buffer settings.
        uri: storage root (local path, ``file://``, ``s3://`` or any fsspec URI).
        name: Ray actor name, so other processes can ``ray.get_actor`` it.
        namespace: Ray namespace of ``name``.
        max_restarts: restarts after a crash (-1 = unlimited).
        max_task_retries: re-runs of calls interrupted by a crash (-1 = unlimited; all idempotent).
        max_concurrency: threads serving calls; see the module docstring.
        num_cpus: CPUs Ray reserves for it.

    Returns:
        The actor handle; its methods are those of :class:`ReplayBufferService`. Constructor errors
        (an unreadable URI, a schema mismatch) surface on the first call, as ``RayActorError``.
    """
    if max_concurrency < 2:
        raise ValueError(
            f"max_concurrency must be >= 2 so a blocked sample cannot starve pushes, got {max_concurrency}"
        )
    remote_cls = ray.remote(ReplayBufferService)
    return remote_cls.options(
        name=name,
        namespace=namespace,
        max_restarts=max_restarts,
        max_task_retries=max_task_retries,
        max_concurrency=max_concurrency,
        num_cpus=num_cpus,
    ).remote(config, uri)
