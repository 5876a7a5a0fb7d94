"""The Ray executor across nodes (issue 12): a Ray cluster of three nodes on this machine (Ray's
own ``cluster_utils.Cluster``: a head without CPUs, where the engine's process connects, and two
nodes of one CPU each, each with its own raylet and object store), so that rank 0's bundle and
rank 1's actor must land on two other nodes. Tensor parallel size 2 gives one rank's greedy
tokens there; losing the node that runs rank 1 fails the run within seconds, naming the rank.

One machine stands in for several: what differs on real ones (addresses, environments shipped
to the nodes) is not covered here."""

from __future__ import annotations

import pytest
from tp_workload import (
    ARCHITECTURE,
    ENGINE,
    RAY,
    all_gone,
    assert_a_kill_fails_the_run,
    assert_same,
    executor_of,
    greedy,
    one_rank_reference,
)

from pagedserve import LLM

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'pagedserve[ray]')")
from ray.cluster_utils import Cluster  # noqa: E402  (needs ray)
from ray.util.placement_group import placement_group_table  # noqa: E402

from pagedserve.executor.ray_executor import RayExecutor  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """Three Ray nodes on this machine: a head with no CPU, two nodes of one CPU each."""
    if ray.is_initialized():
        ray.shutdown()
    try:
        nodes = Cluster(initialize_head=True,
                        head_node_args={"num_cpus": 0, "include_dashboard": False})
        for _ in range(2):
            nodes.add_node(num_cpus=1)
        nodes.wait_for_nodes()
        ray.init(address=nodes.address, log_to_driver=False)
    except Exception as e:  # no /dev/shm, no ports, ...
        pytest.skip(f"a local Ray cluster of three nodes cannot start here: "
                    f"{type(e).__name__}: {e}")
    yield nodes
    ray.shutdown()
    nodes.shutdown()


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return str(tiny_model_dir(ARCHITECTURE))


def _rank_nodes(llm: LLM) -> list[str]:
    """The node id of each rank's bundle, rank 0 first."""
    group = executor_of(llm, RayExecutor)._workers.group
    placed = placement_group_table(group)["bundles_to_node_id"]
    return [placed[rank] for rank in range(len(placed))]


def test_ranks_on_two_nodes_give_one_ranks_tokens(cluster, model):
    expected = one_rank_reference(model)
    llm = LLM(model, **RAY, **ENGINE)
    try:
        # No node holds both ranks' CPUs: the PACK placement spreads them over two nodes,
        # neither of them the head, where this process runs.
        rank_0, rank_1 = _rank_nodes(llm)
        head = ray.get_runtime_context().get_node_id()
        assert len({rank_0, rank_1, head}) == 3
        assert_same(greedy(llm), expected)
    finally:
        llm.engine.shutdown()


def test_losing_the_node_of_a_rank_fails_the_run_at_once(cluster, model):
    llm = LLM(model, **RAY, **ENGINE)
    [pid] = executor_of(llm, RayExecutor).worker_pids
    node_of_rank_1 = _rank_nodes(llm)[1]
    [victim] = [n for n in cluster.list_all_nodes() if n.node_id == node_of_rank_1]
    try:
        assert_a_kill_fails_the_run(
            llm, lambda: cluster.remove_node(victim, allow_graceful=False),
            r"tensor-parallel worker rank 1 \(Ray actor pid \d+ on [^)]+\) died")
        assert all_gone([pid])  # the node's processes end with its raylet
    finally:
        llm.engine.shutdown()
        cluster.add_node(num_cpus=1)  # whole again for whatever runs next
