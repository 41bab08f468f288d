"""Where independent runs execute: here, one after another (``local``), in worker processes on this
machine (``processes``), or as Ray tasks (``ray``).

A job is a module-level function and its arguments: specs, seeds, tensors and paths. It writes its
artefacts into the run directory and returns something small (a digest, a result record): the
object store carries inputs and summaries, never models. The same jobs with the same seeds give
the same files under every executor (each job seeds itself; nothing depends on the order in which
jobs run, on which process runs them, or on its torch thread count).

``map(jobs)`` waits for the results; ``submit(jobs)`` starts them and returns at once, so this
process can do other work meanwhile (the audit stage runs its DP-SGD trainings beside its exact
audits), the executor's ``poll()`` now and then lets it see they have finished, and
``.results()`` waits for them. The local executor runs submitted jobs only when
their results are asked for: the same order of work as ``map``.

``processes`` (the standard library's process pool, spawned fresh) runs one job per core, each
with one torch thread: on two cores, two of the demo's trainings side by side do 1.3-1.5x the
work of one with two threads (small matrices and the serial dropout sampler do not use two
threads well). While submitted jobs run, this process works beside them with one thread.

Ray is optional (``pip install pmixed-audit[ray]``). ``RayExecutor()`` starts a local cluster
sized to this machine unless one is running; ``RayExecutor("ray://head:10001")`` or
``address="auto"`` joins an existing one (``ray start --head`` on the head node, ``ray start
--address HEAD:6379`` on the others; every node needs this package and the run directory on a
shared path).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "EXECUTORS",
    "Job",
    "LocalExecutor",
    "ProcessExecutor",
    "RayExecutor",
    "Resources",
    "available_cores",
    "make_executor",
    "polling",
]


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


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class _Deferred:
    """Submitted local jobs: they run, in order, when their results are asked for."""

    def __init__(self, jobs: Sequence[Job]) -> None:
        self._jobs = list(jobs)

    def results(self, progress: Callable[[int], None] | None = None) -> list:
        """Each job's return value, in job order; ``progress(done)`` after each job."""
        out = []
        for job in self._jobs:
            out.append(job.fn(*job.args))
            if progress is not None:
                progress(len(out))
        return out

    def cancel(self) -> None:
        """Nothing has run; nothing will."""
        self._jobs = []


class LocalExecutor:
    """Runs jobs in this process, in order (no Ray needed)."""

    name = "local"

    def submit(self, jobs: Sequence[Job]) -> _Deferred:
        """The jobs, to run when ``.results(progress)`` is called (nothing runs meanwhile)."""
        return _Deferred(jobs)

    def poll(self) -> None:
        """Nothing runs in the background."""

    def map(self, jobs: Sequence[Job], progress: Callable[[int], None] | None = None) -> list:
        """Each job's return value, in job order; ``progress(done)`` after each job."""
        return self.submit(jobs).results(progress)


def _run_with_threads(fn: Callable, threads: int, *args):
    """A worker's or Ray task's body: the job with torch using exactly its declared cores."""
    import torch

    torch.set_num_threads(threads)
    return fn(*args)


def _stop(pool) -> None:
    """Stops ``pool`` now: queued jobs are cancelled and running ones killed (their files are
    never committed), so a failure or Ctrl-C does not wait for a long training to finish."""
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        return
    # Before 3.14: the pool's own process table (taken before shutdown drops it).
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=10)  # reaped: no zombie left behind


class _Running:
    """Jobs submitted to a process pool; ``results`` waits for them. ``finished`` is called once
    when they are all done (or stopped): the executor then gives this process its threads back."""

    def __init__(
        self, jobs: Sequence[Job], workers: int, finished: Callable[[_Running], None] | None
    ) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self._finished, self._futures = finished, []
        self._pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn")
        )
        try:
            self._futures = [
                self._pool.submit(_run_with_threads, j.fn, j.resources.num_cpus, *j.args)
                for j in jobs
            ]
        except BaseException:
            self.cancel()
            raise

    def results(self, progress: Callable[[int], None] | None = None) -> list:
        """Each job's return value, in job order; ``progress(done)`` as jobs finish. A failed job
        raises here (with its traceback) and stops the others."""
        from concurrent.futures import FIRST_COMPLETED, wait

        try:
            pending, done = set(self._futures), 0
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    f.result()  # a failed job raises here
                done += len(finished)
                if progress is not None:
                    progress(done)
            out = [f.result() for f in self._futures]
        except BaseException:
            _stop(self._pool)
            raise
        finally:
            self._release()
        self._pool.shutdown(wait=True)
        return out

    def poll(self) -> None:
        """Tells the executor as soon as every job has finished, so that this process's own work
        need not wait for :meth:`results` to use all the cores again."""
        if all(f.done() for f in self._futures):
            self._release()

    def cancel(self) -> None:
        """Stops the jobs (queued ones never start, running ones are killed)."""
        try:
            _stop(self._pool)
        finally:
            self._release()

    def _release(self) -> None:
        finished, self._finished = self._finished, None
        if finished is not None:
            finished(self)


class ProcessExecutor:
    """Runs jobs in worker processes on this machine, sharing its ``cores`` (default: all this
    process may use) with this process.

    Both run ``cores // k`` jobs at a time, ``k`` the most cores a job declares, each job's torch
    on its declared cores. While any submitted batch runs, this process works beside it with one
    torch thread; :meth:`poll` (cheap: call it from progress bars) gives the threads back as soon
    as the last one finishes. Workers are spawned, never forked (a forked torch can deadlock),
    once per call; a script that uses this executor needs the ``if __name__ == "__main__":``
    guard that spawned processes require.
    """

    name = "processes"

    def __init__(self, cores: int | None = None) -> None:
        if cores is not None and (int(cores) != cores or cores < 1):
            raise ValueError(f"cores must be an integer >= 1. Found {cores}.")
        self.cores = int(cores) if cores is not None else available_cores()
        self._background: list[_Running] = []
        self._threads = 0  # this process's torch threads before the first background batch

    def submit(self, jobs: Sequence[Job]) -> _Running | _Deferred:
        """The jobs, started in the background; ``.results(progress)`` collects them. Meanwhile
        this process's torch uses one thread and the OS shares the cores between its work and
        the jobs (single-threaded processes share cores without the stalls of oversubscribed
        thread pools). On one core there is nothing to share: the jobs run when collected."""
        if self.cores < 2 or not jobs:
            return _Deferred(jobs)
        import torch

        if not self._background:
            self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        batch = _Running(jobs, self._workers(jobs), self._finished)
        self._background.append(batch)
        return batch

    def map(self, jobs: Sequence[Job], progress: Callable[[int], None] | None = None) -> list:
        """Each job's return value, in job order; ``progress(done)`` as jobs finish."""
        if self.cores < 2 or not jobs:
            return _Deferred(jobs).results(progress)
        return _Running(jobs, self._workers(jobs), None).results(progress)

    def _workers(self, jobs: Sequence[Job]) -> int:
        return min(len(jobs), max(1, self.cores // max(j.resources.num_cpus for j in jobs)))

    def poll(self) -> None:
        """Checks the background batches: once none runs, this process's threads are restored."""
        for batch in list(self._background):
            batch.poll()

    def _finished(self, batch: _Running) -> None:
        if batch in self._background:  # (not yet, if starting it failed)
            self._background.remove(batch)
        if not self._background:
            import torch

            torch.set_num_threads(self._threads)


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

    def submit(self, jobs: Sequence[Job]) -> _RayRunning:
        """The jobs, started as tasks; ``.results(progress)`` collects them."""
        body = self._ray.remote(_run_with_threads)
        refs = [
            body.options(
                num_cpus=j.resources.num_cpus, num_gpus=j.resources.num_gpus, max_retries=0
            ).remote(j.fn, j.resources.num_cpus, *j.args)
            for j in jobs
        ]
        return _RayRunning(self._ray, refs)

    def map(self, jobs: Sequence[Job], progress: Callable[[int], None] | None = None) -> list:
        """Each job's return value, in job order; ``progress(done)`` as jobs finish."""
        return self.submit(jobs).results(progress)

    def poll(self) -> None:
        """Nothing to give back: the tasks run on the cluster's cores."""


class _RayRunning:
    """Tasks submitted to Ray; ``results`` waits for them."""

    def __init__(self, ray, refs: list) -> None:
        self._ray, self._refs = ray, refs

    def results(self, progress: Callable[[int], None] | None = None) -> list:
        """Each task's return value, in job order; ``progress(done)`` as tasks finish. A failed
        task raises here (with its traceback) and cancels the others."""
        ray = self._ray
        pending, done = list(self._refs), 0
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
        return ray.get(self._refs)

    def cancel(self) -> None:
        """Stops the tasks."""
        for ref in self._refs:
            self._ray.cancel(ref, force=True)


def polling(progress: Callable[[str, int], Callable[[int], None]], executor):
    """``progress`` (a factory of progress bars: ``progress(name, total)(done)``) whose every
    update also calls ``executor.poll()``: the cheap, frequent moment at which this process takes
    its threads back once background jobs finish."""

    def bar(name: str, total: int) -> Callable[[int], None]:
        update = progress(name, total)

        def tick(done: int) -> None:
            executor.poll()
            update(done)

        return tick

    return bar


EXECUTORS = ("local", "processes", "ray")


def make_executor(name: str = "local", address: str | None = None):
    """``local``, ``processes`` or ``ray`` (``address``: an existing Ray cluster; only with
    ``ray``)."""
    if name not in EXECUTORS:
        raise ValueError(f"--executor must be one of {', '.join(EXECUTORS)}. Found {name!r}.")
    if name != "ray" and address is not None:
        raise ValueError("--ray-address needs --executor ray.")
    if name == "local":
        return LocalExecutor()
    if name == "processes":
        return ProcessExecutor()
    return RayExecutor(address)
