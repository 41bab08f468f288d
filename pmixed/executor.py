"""Where independent runs execute: here, one after another (``local``), or as Ray tasks (``ray``).

A job is a module-level function and its arguments: specs, seeds, tensors and paths. It writes its
artefacts into the run directory and returns something small (a digest, a result record): the
object store carries inputs and summaries, never models. The same jobs with the same seeds give
the same files under either executor (each job seeds itself; nothing depends on the order in which
jobs run or on which process runs them).

Ray is optional (``pip install pmixed-audit[ray]``). ``RayExecutor()`` starts a local cluster
sized to this machine unless one is running; ``RayExecutor("ray://head:10001")`` or
``address="auto"`` joins an existing one (``ray start --head`` on the head node, ``ray start
--address HEAD:6379`` on the others; every node needs this package and the run directory on a
shared path).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["EXECUTORS", "Job", "LocalExecutor", "RayExecutor", "Resources", "make_executor"]


@dataclass(frozen=True)
class Resources:
    """What one job needs: CPU cores (its torch thread count under Ray) and GPUs."""

    num_cpus: int = 1
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        if int(self.num_cpus) != self.num_cpus or self.num_cpus < 1:
            raise ValueError(f"num_cpus must be an integer >= 1. Found {self.num_cpus}.")
        if not self.num_gpus >= 0:
            raise ValueError(f"num_gpus must be >= 0. Found {self.num_gpus}.")


@dataclass(frozen=True)
class Job:
    """One call ``fn(*args)`` with the resources it declares."""

    fn: Callable
    args: tuple
    resources: Resources = Resources()


class LocalExecutor:
    """Runs jobs in this process, in order (the default; no Ray needed)."""

    name = "local"

    def map(self, jobs: Sequence[Job], progress: Callable[[int], None] | None = None) -> list:
        """Each job's return value, in job order; ``progress(done)`` after each job."""
        out = []
        for job in jobs:
            out.append(job.fn(*job.args))
            if progress is not None:
                progress(len(out))
        return out


def _run_with_threads(fn: Callable, threads: int, *args):
    """A Ray task body: the job with torch using exactly its declared cores."""
    import torch

    torch.set_num_threads(threads)
    return fn(*args)


class RayExecutor:
    """Runs jobs as Ray tasks with their declared ``num_cpus``/``num_gpus``.

    Args:
        address: an existing cluster (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); None
            starts a local one unless Ray is already initialised in this process.
        num_cpus: cores of a local cluster (default: all of this machine's).
        object_store_memory: bytes for a local cluster's object store (default 256 MiB: jobs
            pass data blocks and small results only, and a small /dev/shm must not stop it).
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: int | None = None,
        object_store_memory: int = 256 * 2**20,
    ) -> None:
        try:
            import ray
        except ImportError as e:
            raise ValueError("--executor ray needs Ray: pip install 'pmixed-audit[ray]'.") from e
        self._ray = ray
        if not ray.is_initialized():
            if address is None:
                ray.init(
                    num_cpus=num_cpus,
                    object_store_memory=object_store_memory,
                    include_dashboard=False,
                    log_to_driver=False,
                )
            else:
                ray.init(address=address, log_to_driver=False)

    def map(self, jobs: Sequence[Job], progress: Callable[[int], None] | None = None) -> list:
        """Each job's return value, in job order; ``progress(done)`` as jobs finish."""
        ray = self._ray
        body = ray.remote(_run_with_threads)
        refs = [
            body.options(
                num_cpus=j.resources.num_cpus, num_gpus=j.resources.num_gpus, max_retries=0
            ).remote(j.fn, j.resources.num_cpus, *j.args)
            for j in jobs
        ]
        pending, done = list(refs), 0
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(ready)  # a failed job raises here, with its traceback
            except BaseException:
                for ref in pending:  # the others would only write files nobody commits
                    ray.cancel(ref, force=True)
                raise
            done += 1
            if progress is not None:
                progress(done)
        return ray.get(refs)


EXECUTORS = ("local", "ray")


def make_executor(name: str = "local", address: str | None = None):
    """``local`` or ``ray`` (``address``: an existing Ray cluster; only with ``ray``)."""
    if name not in EXECUTORS:
        raise ValueError(f"--executor must be one of {', '.join(EXECUTORS)}. Found {name!r}.")
    if name == "local":
        if address is not None:
            raise ValueError("--ray-address needs --executor ray.")
        return LocalExecutor()
    return RayExecutor(address)
