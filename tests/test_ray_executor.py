"""The Ray executor (issue 12, phase 4) on a local Ray cluster this module starts: tensor
parallel size 2 with rank 1 in a Ray actor gives one rank's greedy tokens through chunked
prefill, preemption and prefix caching (tp_workload, as the mp executor); a killed actor fails
the engine at once naming its rank, a hung one after distributed_timeout_seconds; shutdown
leaves no actor, process or placement group; a cluster too small for the ranks fails the load
naming tensor_parallel_size; without a cluster (no RAY_ADDRESS) the engine starts its own and
shuts it down with itself. With async scheduling the actor gives the same tokens."""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist
from tp_workload import (
    ARCHITECTURE,
    ENGINE,
    GREEDY,
    HANG_TIMEOUT_S,
    RAY,
    all_gone,
    assert_a_hang_fails_the_run,
    assert_a_kill_fails_the_run,
    assert_same,
    executor_of,
    gone,
    greedy,
    one_rank_reference,
)

from pagedserve import LLM, SamplingParams
from pagedserve.errors import EngineDeadError

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'pagedserve[ray]')")
from pagedserve.executor.ray_executor import RayExecutor  # noqa: E402  (needs ray)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs: rank 0's bundle and rank 1's actor."""
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as e:  # no /dev/shm, no ports, ...
        pytest.skip(f"a local Ray cluster cannot start here: {type(e).__name__}: {e}")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return str(tiny_model_dir(ARCHITECTURE))


def test_without_a_cluster_the_engine_starts_and_stops_its_own(model, monkeypatch):
    # First in the module: before the cluster fixture starts the test's own.
    if ray.is_initialized():
        pytest.skip("runs before the module's Ray cluster starts (run the whole module)")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    llm = LLM(model, **RAY, **ENGINE)
    executor = executor_of(llm, RayExecutor)
    assert executor._workers.started_ray and ray.is_initialized()
    assert ray.cluster_resources().get("CPU") == 2.0  # tensor_parallel_size CPUs
    [pid] = executor.worker_pids
    params = SamplingParams(max_tokens=4, **GREEDY)
    assert len(llm.generate("Own cluster", params, use_tqdm=False)[0].outputs[0].token_ids) == 4
    llm.engine.shutdown()
    assert not ray.is_initialized()  # the cluster it started is shut down with it
    assert all_gone([pid]) and not dist.is_initialized()


def test_ray_ranks_give_one_ranks_tokens_and_leave_nothing(cluster, model):
    expected = one_rank_reference(model)
    llm = LLM(model, **RAY, **ENGINE)
    assert llm.engine.config.executor_backend == "ray"
    executor = executor_of(llm, RayExecutor)
    [pid] = executor.worker_pids
    assert not gone(pid)
    assert ray.available_resources().get("CPU", 0.0) == 0.0  # both ranks' bundles held
    assert_same(greedy(llm), expected)
    stats = llm.engine.get_stats()
    assert stats.num_preemptions_total > 0 and stats.prefix_cache_hits_total > 0

    serving = list(executor._workers.serving)
    llm.engine.shutdown()
    # Told to stop: its serve call returned (no error), then the actor was ended.
    assert ray.get(serving, timeout=0) == [None]
    assert all_gone([pid])
    assert not dist.is_initialized()
    # The placement group is gone, its CPUs free again; the test's cluster is still up.
    deadline = time.monotonic() + 5.0
    while ray.available_resources().get("CPU", 0.0) < 2.0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ray.available_resources().get("CPU", 0.0) == 2.0
    assert ray.is_initialized()
    llm.engine.shutdown()  # idempotent
    with pytest.raises(EngineDeadError, match="shut down"):
        llm.engine.step()


def test_ray_ranks_with_async_scheduling_give_one_ranks_tokens(cluster, model):
    # The actor launches each step as rank 0 does and takes its tokens within it.
    llm = LLM(model, **RAY, async_scheduling=True, **ENGINE)
    assert llm.engine.config.async_scheduling
    try:
        assert_same(greedy(llm), one_rank_reference(model))
    finally:
        llm.engine.shutdown()


def test_a_killed_actor_fails_the_requests_at_once(cluster, model):
    llm = LLM(model, **RAY, **ENGINE)
    executor = executor_of(llm, RayExecutor)
    [actor], [pid] = executor._workers.actors, executor.worker_pids
    assert_a_kill_fails_the_run(
        llm, lambda: ray.kill(actor),
        rf"tensor-parallel worker rank 1 \(Ray actor pid {pid} on [^)]+\) died: .+")
    assert all_gone([pid])
    assert not dist.is_initialized()


def test_a_cluster_too_small_fails_the_load_naming_tensor_parallel_size(cluster, model):
    with pytest.raises(ValueError, match=r"'tensor_parallel_size' \(4\) needs 4 CPU in the "
                                         r"Ray cluster \(one per rank\), and 2 are free"):
        LLM(model, tensor_parallel_size=4, distributed_executor_backend="ray", **ENGINE)
    assert ray.available_resources().get("CPU", 0.0) == 2.0


def test_a_hung_actor_fails_the_step_after_the_timeout(cluster, model):
    llm = LLM(model, **RAY, distributed_timeout_seconds=HANG_TIMEOUT_S, **ENGINE)
    [pid] = executor_of(llm, RayExecutor).worker_pids
    assert_a_hang_fails_the_run(llm, pid)  # alive to Ray, but it answers nothing
    assert all_gone([pid])
