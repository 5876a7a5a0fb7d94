"""The ray executor: rank 0 in the engine's process, ranks 1..tp-1 in Ray actors placed by a
placement group, on this machine or on other nodes of a Ray cluster; the steps, failures and
shutdown are multi_rank's, as for mp.

Which cluster: the one this process already joined (ray.init done), else the one RAY_ADDRESS
names (``auto``: the one ``ray start`` started on this machine), else a local one of tp CPUs
started here for this engine alone and shut down with it. Only an explicit address joins a
running cluster: one recorded by an earlier ``ray start`` may be long gone.

The placement group holds one bundle per rank, bundle 0 on this node for rank 0 (so that Ray
hands its CPU or GPU to nobody else), with the PACK strategy: on as few nodes as hold the
ranks (NCCL within a node is the fastest), yet across nodes when one is too small, which
STRICT_PACK would refuse (and SPREAD would scatter the ranks needlessly)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import time
from typing import Any, Optional

import ray
import torch
from ray.exceptions import GetTimeoutError, RayError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pagedserve.config import EngineConfig
from pagedserve.executor.multi_rank import (
    MultiRankExecutor,
    RankWorkers,
    free_port,
    refuse_second_group,
)
from pagedserve.executor.rank import STARTUP_TIMEOUT_S
from pagedserve.executor.ray_worker import RankActor
from pagedserve.models.model_config import ModelConfig

logger = logging.getLogger(__name__)

# How long the cluster may take to reserve the ranks' resources once it has them free (a node
# that is still joining); past it, the load fails.
PLACEMENT_TIMEOUT_S = 60.0


def _connect(world_size: int) -> bool:
    """Joins a Ray cluster (see the module's doc); whether it started one of its own."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address)
        except ConnectionError as e:
            raise RuntimeError(f"cannot reach the Ray cluster at RAY_ADDRESS={address}: "
                               f"{e}") from e
        return False
    logger.info("RAY_ADDRESS is not set: starting a Ray cluster on this machine for "
                "tensor_parallel_size %d", world_size)
    # "local": a new cluster even where one started here earlier is recorded (ray.init's
    # default would join that one, or wait on it long after it has gone).
    ray.init(address="local", num_cpus=world_size, include_dashboard=False)
    return True


def _reserve(world_size: int, resource: str) -> PlacementGroup:
    """A placement group of one ``resource`` per rank, bundle 0 on this node; fails naming
    tensor_parallel_size when the cluster cannot hold it."""
    free = ray.available_resources().get(resource, 0.0)
    if free < world_size:
        raise ValueError(
            f"engine argument 'tensor_parallel_size' ({world_size}) needs {world_size} {resource} "
            f"in the Ray cluster (one per rank), and {free:g} are free there "
            f"(ray.available_resources())")
    here = f"node:{ray.util.get_node_ip_address()}"
    bundles: list[dict[str, float]] = [{resource: 1.0} for _ in range(world_size)]
    bundles[0][here] = 0.001  # rank 0 is this process
    group = placement_group(bundles, strategy="PACK")
    try:
        ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except GetTimeoutError:
        remove_placement_group(group)
        raise ValueError(
            f"engine argument 'tensor_parallel_size' ({world_size}): the Ray cluster did not "
            f"place {world_size} bundles of one {resource} (the first on this node) within "
            f"{PLACEMENT_TIMEOUT_S:g} s") from None
    return group


def _own_gpu() -> str:
    """The physical index of the GPU this process (rank 0) runs on, as Ray numbers GPUs."""
    index = torch.cuda.current_device()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[index].strip() if visible else str(index)


def _why_ended(ended: concurrent.futures.Future) -> str:
    """Why an actor's finished serve call finished: its error's gist, or that it returned."""
    error = ended.exception()
    if isinstance(error, RayTaskError):  # the rank itself raised
        return f"failed: {str(error).strip().splitlines()[-1]}"
    if error is not None:  # killed, crashed, or its node is gone (RayActorError)
        return f"died: {str(error).strip().splitlines()[-1]}"
    return "exited"


class _RayWorkers(RankWorkers):
    """The worker ranks' actors, their placement group and, while they run, their serve
    calls: a serve call that has finished is a rank that is gone. Each call's ObjectRef is
    watched as a Future, which Ray completes from its own thread: checking it before every
    step costs a flag's read (``ray.wait(timeout=0)`` would cost ~80 us of a call into Ray).
    """

    # The engine's process learns of an actor's death from Ray's control store: give it a
    # little longer than mp's exit code takes.
    death_notice_s = 3.0

    def __init__(self, config: EngineConfig, model_config: ModelConfig) -> None:
        world = config.args.tensor_parallel_size
        super().__init__(world - 1)
        self.serving: list[ray.ObjectRef] = []
        self.ended: list[concurrent.futures.Future] = []  # the serve calls, as futures
        self.where: list[str] = []  # each rank's actor, pid and node, for errors
        self.pids: list[int] = []
        self.actors: list[Any] = []
        self.group: Optional[PlacementGroup] = None
        self.started_ray = _connect(world)
        self.cuda = config.device == "cuda"
        try:
            self.group = _reserve(world, "GPU" if self.cuda else "CPU")
            actor = ray.remote(RankActor)
            self.actors = [
                actor.options(
                    num_cpus=0 if self.cuda else 1, num_gpus=1 if self.cuda else 0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self.group, placement_group_bundle_index=rank),
                ).remote()
                for rank in range(1, world)
            ]
            # Rank 0's node: where the others meet it.
            self.init_method = f"tcp://{ray.util.get_node_ip_address()}:{free_port('')}"
        except BaseException:
            self._end(0.0)
            raise
        self._serve_args = (config, model_config, torch.get_num_threads())

    def wait_started(self) -> None:
        """Waits for each actor to run, then starts its rank's serve call."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        own_gpu = _own_gpu() if self.cuda else None
        here = ray.util.get_node_ip_address()
        for rank, actor in enumerate(self.actors, start=1):
            try:
                pid, node, gpus = ray.get(actor.where.remote(),
                                          timeout=max(0.0, deadline - time.monotonic()))
            except GetTimeoutError:
                raise TimeoutError(f"tensor-parallel worker rank {rank} (a Ray actor) did not "
                                   f"start within {STARTUP_TIMEOUT_S} s") from None
            except RayError as e:
                raise RuntimeError(f"tensor-parallel worker rank {rank} (a Ray actor) did not "
                                   f"start: {e}") from e
            if node == here and own_gpu in gpus:
                raise RuntimeError(
                    f"Ray gave tensor-parallel worker rank {rank} GPU {own_gpu} of this node, "
                    f"which rank 0 (the engine's own device) runs on: start Ray on this node "
                    f"with the GPUs it may hand out (CUDA_VISIBLE_DEVICES, --num-gpus)")
            self.pids.append(pid)
            self.where.append(f"Ray actor pid {pid} on {node}")
        config, model_config, num_threads = self._serve_args
        self.serving = [
            actor.serve.remote(config, model_config, rank, self.init_method, num_threads)
            for rank, actor in enumerate(self.actors, start=1)
        ]
        self.ended = [ref.future() for ref in self.serving]

    def first_dead(self, wait_s: float = 0.0) -> Optional[str]:
        if not ray.is_initialized():
            # Ray was shut down in this process (at exit, Ray's own hook may run before the
            # executor's finalizer), taking the actors it owned along; calling it again now
            # would start a new cluster.
            return "tensor-parallel workers gone: Ray was shut down in this process"
        if not self.ended:
            return None
        if wait_s > 0:  # (futures.wait itself costs ~20 us: not before every step)
            concurrent.futures.wait(self.ended, timeout=wait_s,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        rank = next((r for r, f in enumerate(self.ended, start=1) if f.done()), None)
        if rank is None:
            return None
        return (f"tensor-parallel worker rank {rank} ({self.where[rank - 1]}) "
                f"{_why_ended(self.ended[rank - 1])}")

    def _end(self, grace_s: float) -> None:
        if not ray.is_initialized():  # see first_dead
            return
        if self.ended and grace_s > 0:
            concurrent.futures.wait(self.ended, timeout=grace_s)
        # An actor whose serve call returned still holds its process until it is killed.
        for actor in self.actors:
            with contextlib.suppress(RayError):
                ray.kill(actor, no_restart=True)
        self.actors = []
        if self.group is not None:
            with contextlib.suppress(RayError):
                remove_placement_group(self.group)
            self.group = None
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False


class RayExecutor(MultiRankExecutor):
    """Rank 0 here, the other ranks in Ray actors (see the module's doc)."""

    _workers: _RayWorkers

    def __init__(self, config: EngineConfig, model_config: ModelConfig) -> None:
        refuse_second_group(config.args.tensor_parallel_size)
        workers = _RayWorkers(config, model_config)
        super().__init__(config, model_config, workers, workers.init_method)

    @property
    def worker_pids(self) -> list[int]:
        """The worker actors' process ids (on their nodes), rank 1 first."""
        return list(self._workers.pids)
