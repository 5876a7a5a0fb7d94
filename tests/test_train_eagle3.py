"""The EAGLE-3 head trainer (devtools/train_eagle3): its plain-torch head is the engine's head
(models/eagle3.py) step for step, training raises the head's agreement with the target's
greedy tokens far above a random head's, and the written head loads as a published one."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_eagle3_head import _load, _metadata, _reference_weights, reference_head

from pagedserve.devtools.eagle3_head import build_eagle3_head
from pagedserve.devtools.eagle3_train_head import PlainEagle3Head
from pagedserve.devtools.train_eagle3 import (
    Eagle3TrainConfig,
    head_agreement,
    load_plain_head,
    load_target,
    sample_sequences,
    target_features,
    train_eagle3_head,
)

# fp32 against fp32 (the engine's paged attention against SDPA): relative to the values' size.
RTOL, ATOL = 1e-4, 1e-4
NUM_STEPS = 3
BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def target_dir(tiny_model_dir) -> pathlib.Path:
    return tiny_model_dir("llama", num_hidden_layers=6)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = float(want.abs().max())
    torch.testing.assert_close(got.double(), want.double(), rtol=RTOL, atol=ATOL * scale)


@pytest.mark.parametrize("variant", [
    dict(), dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                 intermediate_size=80, with_embedding=True, norm_before_residual=True)],
    ids=["shared-embedding", "own-embedding-narrow"])
def test_plain_head_equals_reference_and_engine(target_dir, tmp_path, variant):
    """Step 0 over whole sequences equals the test suite's reference head; every unrolled
    step j at row i equals the engine drafting through its paged KV cache: step 0 (prefill)
    over rows 0..i, then single-token steps at positions i+1.. feeding next_hidden."""
    head_dir = build_eagle3_head(tmp_path / "head", target_dir, draft_vocab_size=300, seed=5,
                                 **variant)
    target = load_target(target_dir)
    plain, draft_ids, config = load_plain_head(head_dir, target)
    gen = torch.Generator().manual_seed(0)
    rows = 13
    tokens = torch.randint(0, 1024, (2, rows), generator=gen)
    aux, _ = target_features(target, tokens, (2, 3, 3))
    with torch.no_grad():
        logits = plain.unroll(tokens, aux, NUM_STEPS)
        step0 = plain.step(tokens[:, 1:], plain.combine(aux[:, :-1]), 0, [])

    weights = _reference_weights(head_dir, target_dir)
    for b in range(2):
        with torch.no_grad():
            hidden = plain.combine(aux[b, :-1])
        ref_pre, _, ref_logits = reference_head(weights, config, tokens[b, 1:],
                                                torch.arange(rows - 1), hidden)
        _close(step0.next_hidden[b], ref_pre)
        _close(step0.logits[b], ref_logits)
        _close(logits[0][b, :rows - 1], ref_logits)

    _, _, head_config, head = _load(target_dir, head_dir)
    mc = head_config.model_config
    for b, i in [(0, 0), (0, 6), (1, rows - 1 - NUM_STEPS)]:
        cache = torch.zeros(2, 16, BLOCK_SIZE, mc.num_kv_heads, mc.head_dim)
        table = [list(range(16))]
        meta, positions = _metadata([i + 1], [0], table)
        head.midlayer.self_attn.attn.backend.prepare(meta)
        with torch.inference_mode():
            hidden = head.combine_hidden_states(aux[b, :i + 1])
            out = head(tokens[b, 1:i + 2], positions, hidden, [cache], meta)
        for j in range(NUM_STEPS):
            if j:
                meta, positions = _metadata([1], [i + j], table)
                head.midlayer.self_attn.attn.backend.prepare(meta)
                with torch.inference_mode():
                    out = head(tokens[b, i + 1 + j:i + 2 + j], positions,
                               out.next_hidden[-1:].clone(), [cache], meta)
            with torch.inference_mode():
                engine = head.compute_draft_logits(out.logits_hidden[-1])
            _close(engine, logits[j][b, i])
            assert int(head.map_to_target(engine.argmax())) == int(
                draft_ids[logits[j][b, i].argmax()])
