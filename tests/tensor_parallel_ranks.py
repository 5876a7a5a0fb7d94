"""The paged model run greedily on one tensor-parallel rank, and the rank processes that run it
(spawned, gloo on the loopback), for tests/test_tensor_parallel.py. A module of its own so that
a spawned rank imports torch and pagedserve, not pytest and the test file.

``greedy_run`` schedules like the engine does, small: each step takes up to ``CHUNK`` of a
request's uncomputed tokens (a chunked prefill, then one token per decode step), every request
of the batch in one flat forward through the paged KV cache; a request whose tokens are all
computed samples greedily and takes the token."""

from __future__ import annotations

import os
import pathlib
import traceback
from dataclasses import dataclass

import torch
from paged_steps import step_metadata

from pagedserve.attention.base import AttentionMetadata
from pagedserve.attention.layer import allocate_kv_caches
from pagedserve.attention.torch_backend import TorchAttentionBackend
from pagedserve.distributed import SINGLE_RANK, TensorParallelGroup, init_tensor_parallel
from pagedserve.models.loader import load_model
from pagedserve.models.model_config import ModelConfig

BLOCK_SIZE = 4
BLOCKS_PER_REQ = 16
CHUNK = 6  # prompts longer than this are prefilled in chunks
PROMPTS = [[5 + (7 * i) % 300 for i in range(n)] for n in (13, 4, 9)]
NEW_TOKENS = 5


@dataclass
class RunResult:
    """Each request's greedy tokens and the logits [NEW_TOKENS, vocab] it sampled them from."""

    tokens: list[list[int]]
    logits: list[torch.Tensor]


def greedy_run(model_dir: str, tp: TensorParallelGroup = SINGLE_RANK) -> RunResult:
    """``PROMPTS`` continued by NEW_TOKENS greedy tokens each, on ``tp``'s rank (fp32)."""
    config = ModelConfig.from_pretrained(model_dir).with_tensor_parallel(tp.world_size)
    attn = TorchAttentionBackend(config.heads_per_rank, config.kv_heads_per_rank,
                                 config.head_dim, config.head_dim ** -0.5, BLOCK_SIZE)
    model = load_model(config, torch.float32, torch.device("cpu"), attn, config.quant_config,
                       tp=tp)
    caches = allocate_kv_caches(config.kv_heads_per_rank, config.head_dim, config.num_layers,
                                BLOCKS_PER_REQ * len(PROMPTS), BLOCK_SIZE, torch.float32,
                                torch.device("cpu"))
    seqs = [list(p) for p in PROMPTS]
    computed = [0] * len(seqs)
    logits: list[list[torch.Tensor]] = [[] for _ in seqs]
    while any(len(s) - len(p) < NEW_TOKENS for s, p in zip(seqs, PROMPTS)):
        active = [i for i, (s, p) in enumerate(zip(seqs, PROMPTS)) if len(s) - len(p) < NEW_TOKENS]
        q_lens = [min(CHUNK, len(seqs[i]) - computed[i]) for i in active]
        meta, positions = _metadata(active, q_lens, [computed[i] for i in active])
        ids = torch.tensor([t for i, q in zip(active, q_lens)
                            for t in seqs[i][computed[i]:computed[i] + q]])
        attn.prepare(meta)
        with torch.inference_mode():
            hidden = model(ids, positions, caches, meta)
            last = meta.query_start_loc[1:].long() - 1
            step_logits = model.compute_logits(hidden[last])
        for row, (i, q) in enumerate(zip(active, q_lens)):
            computed[i] += q
            if computed[i] == len(seqs[i]):
                logits[i].append(step_logits[row].clone())
                seqs[i].append(int(step_logits[row].argmax()))
    return RunResult([s[len(p):] for s, p in zip(seqs, PROMPTS)],
                     [torch.stack(rows) for rows in logits])


def _metadata(reqs: list[int], q_lens: list[int],
              ctx_lens: list[int]) -> tuple[AttentionMetadata, torch.Tensor]:
    """``step_metadata`` with request i owning blocks [i * BLOCKS_PER_REQ, (i + 1) *
    BLOCKS_PER_REQ)."""
    tables = [[i * BLOCKS_PER_REQ + b for b in range(BLOCKS_PER_REQ)] for i in reqs]
    return step_metadata(q_lens, ctx_lens, tables, BLOCK_SIZE)


def collectives(tp: TensorParallelGroup) -> dict[str, torch.Tensor]:
    """The group's collectives on small tensors that say which rank made them."""
    mine = torch.full((2, 3), float(tp.rank + 1))
    return {
        "all_reduce": tp.all_reduce(mine.clone()),
        "all_gather_0": tp.all_gather(mine, dim=0),
        "all_gather_1": tp.all_gather(mine, dim=1),
    }


def rank_main(rank: int, world_size: int, port: int, model_dirs: list[str],
              out_dir: str, timeout_s: float) -> None:
    """One spawned rank: joins the gloo group, runs every model and saves its results to
    ``out_dir/rank{rank}.pt`` (a traceback to ``rank{rank}.err`` on failure)."""
    torch.set_num_threads(1)
    # The loopback: gloo otherwise picks the interface the host name resolves to.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    out = pathlib.Path(out_dir)
    try:
        tp = init_tensor_parallel(world_size, rank, f"tcp://127.0.0.1:{port}", "gloo",
                                  timeout_s=timeout_s)
        saved: dict[str, object] = {"collectives": collectives(tp)}
        for model_dir in model_dirs:
            result = greedy_run(model_dir, tp)
            saved[model_dir] = (result.tokens, result.logits)
        torch.save(saved, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
