"""The executors: local (in order, in process) and Ray (tasks with declared resources); the demo's
training jobs give bit-identical adapters under both."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest

from pmixed.executor import Job, LocalExecutor, RayExecutor, Resources, make_executor


def _square(x: int) -> int:
    return x * x


def _threads_and_gpus() -> tuple[int, list]:
    import ray
    import torch

    return torch.get_num_threads(), ray.get_gpu_ids()


def _fail(x: int) -> int:
    raise ValueError(f"job {x} failed")


def test_local_executor_runs_in_order_with_progress():
    done = []
    out = LocalExecutor().map([Job(_square, (i,)) for i in range(5)], progress=done.append)
    assert out == [0, 1, 4, 9, 16] and done == [1, 2, 3, 4, 5]


def test_bad_executor_settings_are_refused_by_flag():
    with pytest.raises(ValueError, match="--executor must be one of local, ray"):
        make_executor("dask")
    with pytest.raises(ValueError, match="--ray-address needs --executor ray"):
        make_executor("local", "auto")
    with pytest.raises(ValueError, match="num_cpus must be an integer >= 1"):
        Resources(num_cpus=0)


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
