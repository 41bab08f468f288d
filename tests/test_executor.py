"""The executors: local (in order, in process), processes (worker processes sharing this machine's
cores) and Ray (tasks with declared resources); the demo's training jobs give bit-identical
adapters under all three."""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings

import pytest
import torch

from pmixed.executor import (
    Job,
    LocalExecutor,
    ProcessExecutor,
    RayExecutor,
    Resources,
    make_executor,
)


def _square(x: int) -> int:
    return x * x


def _threads_and_gpus() -> tuple[int, list]:
    import ray
    import torch

    return torch.get_num_threads(), ray.get_gpu_ids()


def _fail(x: int) -> int:
    raise ValueError(f"job {x} failed")


def _where() -> tuple[int, int]:
    """(process id, torch threads) of the process running the job."""
    return os.getpid(), torch.get_num_threads()


def _sleep_then_where(path: str) -> tuple[int, int]:
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(0.5)
    return _where()


def _block(path: str) -> None:
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)


def _fail_once_started(path: str) -> None:
    while not os.path.exists(path):
        time.sleep(0.05)
    raise ValueError("job failed while another ran")


def _wait_for(path: str) -> bool:
    while not os.path.exists(path):
        time.sleep(0.05)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_local_executor_runs_in_order_with_progress():
    done = []
    out = LocalExecutor().map([Job(_square, (i,)) for i in range(5)], progress=done.append)
    assert out == [0, 1, 4, 9, 16] and done == [1, 2, 3, 4, 5]


def test_bad_executor_settings_are_refused_by_flag():
    with pytest.raises(ValueError, match="--executor must be one of local, processes, ray"):
        make_executor("dask")
    with pytest.raises(ValueError, match="--ray-address needs --executor ray"):
        make_executor("local", "auto")
    with pytest.raises(ValueError, match="--ray-address needs --executor ray"):
        make_executor("processes", "auto")
    with pytest.raises(ValueError, match="num_cpus must be an integer >= 1"):
        Resources(num_cpus=0)
    with pytest.raises(ValueError, match="cores must be an integer >= 1. Found 0"):
        ProcessExecutor(cores=0)
    assert isinstance(make_executor("processes"), ProcessExecutor)


def test_local_submit_runs_nothing_until_the_results_are_asked_for(tmp_path):
    flag = tmp_path / "ran"
    pending = LocalExecutor().submit([Job(_sleep_then_where, (str(flag),))])
    assert not flag.exists()
    assert pending.results() == [(os.getpid(), torch.get_num_threads())] and flag.exists()


def test_process_executor_keeps_job_order_and_declared_threads_in_other_processes():
    done = []
    ex = ProcessExecutor(cores=2)
    assert ex.map([Job(_square, (i,)) for i in range(5)], progress=done.append) == [
        0,
        1,
        4,
        9,
        16,
    ]
    assert done[-1] == 5 and done == sorted(done)
    (pid1, one), (pid2, two) = ex.map(
        [Job(_where, (), Resources(num_cpus=1)), Job(_where, (), Resources(num_cpus=2))]
    )
    assert one == 1 and two == 2 and os.getpid() not in (pid1, pid2)
    # One core: nothing to share, the jobs run here.
    assert ProcessExecutor(cores=1).map([Job(_where, ())]) == [
        (os.getpid(), torch.get_num_threads())
    ]


def test_submitted_jobs_run_beside_this_process_which_keeps_one_thread(tmp_path):
    before = torch.get_num_threads()
    started = tmp_path / "started"
    pending = ProcessExecutor(cores=2).submit([Job(_sleep_then_where, (str(started),))])
    try:
        assert torch.get_num_threads() == 1  # this process's share while the job runs
        while not started.exists():  # the job runs while this process does something else
            time.sleep(0.05)
    finally:
        [(pid, threads)] = pending.results()
    assert pid != os.getpid() and threads == 1
    assert torch.get_num_threads() == before  # given back once collected


def test_a_failed_job_raises_and_kills_the_running_ones(tmp_path):
    started = tmp_path / "blocker"
    pending = ProcessExecutor(cores=2).submit(
        [Job(_block, (str(started),)), Job(_fail_once_started, (str(started),))]
    )
    with pytest.raises(ValueError, match="job failed while another ran"):
        pending.results()
    blocker = int(started.read_text())
    for _ in range(200):  # killed, not waited for (it would sleep ten minutes)
        if not _alive(blocker):
            break
        time.sleep(0.05)
    assert not _alive(blocker)
    # Cancelling a submitted batch kills it the same way (an audit that failed elsewhere).
    started.unlink()
    pending = ProcessExecutor(cores=2).submit([Job(_block, (str(started),))])
    while not started.exists():
        time.sleep(0.05)
    pending.cancel()
    blocker = int(started.read_text())
    for _ in range(200):
        if not _alive(blocker):
            break
        time.sleep(0.05)
    assert not _alive(blocker) and torch.get_num_threads() >= 1


def test_ray_executor_keeps_job_order_and_declared_resources(ray_cluster):
    ex = RayExecutor()  # joins the session's cluster
    done = []
    assert ex.map([Job(_square, (i,)) for i in range(6)], progress=done.append) == [
        0,
        1,
        4,
        9,
        16,
        25,
    ]
    assert done == list(range(1, 7))
    one, two = ex.map(
        [
            Job(_threads_and_gpus, (), Resources(num_cpus=1)),
            Job(_threads_and_gpus, (), Resources(num_cpus=2)),
        ]
    )
    assert one == (1, []) and two == (2, [])  # torch uses exactly the declared cores
    with pytest.raises(Exception, match="job 3 failed"):
        ex.map([Job(_square, (1,)), Job(_fail, (3,))])


def test_ray_trained_ensemble_equals_the_local_one_file_for_file(ray_cluster, tiny_run, tmp_path):
    """Issue acceptance: with the same seeds the Ray executor gives bit-identical members."""
    from campaign.run import run_demo
    from tests.tiny_demo import TINY, quiet

    local, _ = tiny_run  # trained by the default (local) executor
    out = tmp_path / "ray-run"
    out.mkdir()
    for stage in ("tokenizer", "public"):  # only the ensemble stage is retrained
        shutil.copytree(local / stage, out / stage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        run_demo(TINY, out, quiet, evaluate=False, executor=RayExecutor())
    ours = json.loads((out / "ensemble" / "stage.json").read_text())
    theirs = json.loads((local / "ensemble" / "stage.json").read_text())
    assert ours["hash"] == theirs["hash"]
    assert ours["files"] == theirs["files"]  # every adapter and dpsgd.json, by SHA-256
    assert len(ours["files"]) == TINY.n_members + 4  # + finetuned, dpsgd, adapters.json, dpsgd.json


def test_processes_run_equals_the_local_one_file_for_file(tiny_run, tmp_path):
    """The default executor of the command line: the same ensemble files, metrics and audit as the
    local run, although a background job (the demo's power stage, here one that waits for this
    test) kept this process at one thread from the public model on, and the audit's DP-SGD runs
    trained beside its other work."""
    from campaign.run import run_demo
    from tests.tiny_demo import TINY, quiet

    local, _ = tiny_run  # trained and audited by the local executor
    out = tmp_path / "processes-run"
    out.mkdir()
    for stage in ("tokenizer", "public"):
        shutil.copytree(local / stage, out / stage)
    threads = torch.get_num_threads()
    ex, release, beside = ProcessExecutor(cores=2), tmp_path / "release", []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        run_demo(
            TINY,
            out,
            quiet,
            executor=ex,
            after_public=lambda: beside.append(ex.submit([Job(_wait_for, (str(release),))])),
        )
    assert torch.get_num_threads() == 1  # the background job still runs
    release.touch()
    assert beside[0].results() == [True] and torch.get_num_threads() == threads
    ours = json.loads((out / "ensemble" / "stage.json").read_text())
    theirs = json.loads((local / "ensemble" / "stage.json").read_text())
    assert ours["files"] == theirs["files"]
    for name in ("metrics.json", "audit.json"):
        assert (out / name).read_bytes() == (local / name).read_bytes(), name
