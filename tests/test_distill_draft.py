"""The draft distiller (devtools/distill_draft): its prompts and agreement measure are what
they say, fine-tuning on the target's greedy text raises the draft's agreement with the target,
and the written draft serves as a draft model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pagedserve.devtools.distill_draft import (
    DistillConfig,
    agreement,
    distill_draft,
    file_prompts,
    heldout_prompts,
)

QUICK = dict(prompt_tokens=16, new_tokens=24, windows_per_file=1, max_files=48, steps=60,
             batch_size=16, lr=1e-2, warmup_steps=5, eval_every=30, eval_prompts=8,
             eval_tokens=16, num_drafts=3, max_num_seqs=32)
# A target whose greedy text a few steps can start to learn (a smooth random init); the draft
# agrees with it on about 1% of held-out tokens before, and 60 steps must add 5 points.
MIN_GAIN = 0.05


class _Tokenizer:
    bos_token_id = 1

    def __call__(self, texts, add_special_tokens=False):
        class Out:
            input_ids = [[10 + ord(c) % 50 for c in text] for text in texts]
        return Out()


def test_prompts_are_file_starts_and_windows_of_one_length():
    texts = ["a" * 40, "b" * 10, "".join(chr(65 + i % 26) for i in range(100))]
    prompts = file_prompts(_Tokenizer(), texts, 8, 2, seed=0)
    assert prompts.shape == (3 * 2, 9)  # "b" * 10 is too short for a start and a window
    assert (prompts[[0, 3], 0] == 1).all()  # each file's start, after BOS
    assert (prompts[:3, 1:] == 10 + ord("a") % 50).all()
    assert (prompts[4:, 0] != 1).all()  # windows are of the text alone
    again = file_prompts(_Tokenizer(), texts, 8, 2, seed=0)
    assert np.array_equal(prompts, again)


class _Fixed(torch.nn.Module):
    """Predicts ``next_tokens[:, t]`` after position t (for one batch of that many rows)."""

    def __init__(self, next_tokens: np.ndarray) -> None:
        super().__init__()
        self.logits = torch.nn.functional.one_hot(torch.from_numpy(next_tokens), 100).float()

    def forward(self, input_ids):
        return type("Output", (), {"logits": self.logits[:len(input_ids)]})


def test_agreement_counts_drafts_and_chains():
    seqs = np.arange(2 * 10).reshape(2, 10) % 100
    right = np.roll(seqs, -1, axis=1)
    perfect = agreement(_Fixed(right), seqs, first=4, num_drafts=3)
    assert perfect.per_step == perfect.chain == (1.0, 1.0, 1.0)
    assert perfect.positions == 2 * (6 - 2)
    wrong = right.copy()
    wrong[:, 5] = 99  # the prediction of column 6 is now missed
    result = agreement(_Fixed(wrong), seqs, first=4, num_drafts=3)
    # Starts t = 4..7 read columns t, t+1, t+2: column 6 is draft 2 of t=4, 1 of 5, 0 of 6.
    assert result.per_step == (0.75, 0.75, 0.75)
    assert result.chain == (0.75, 0.5, 0.25)


def test_config_names_the_bad_field():
    with pytest.raises(ValueError, match="steps"):
        DistillConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        DistillConfig(lr=0.0)
    with pytest.raises(ValueError, match="eval_tokens"):
        DistillConfig(eval_tokens=3, num_drafts=3)


def test_distillation_raises_agreement_and_writes_a_serving_draft(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from pagedserve import LLM, SamplingParams

    target = tiny_model_dir("llama", seed=3, max_position_embeddings=256, initializer_range=0.05)
    # A small init, as a trained draft has: the tiny models' large one makes logits no few
    # steps can tame.
    draft = tiny_model_dir("llama", hidden_size=32, num_hidden_layers=1, seed=4,
                           max_position_embeddings=256, initializer_range=0.02)
    out = tmp_path / "draft"
    report = distill_draft(out, target, draft, command="distil it", log=lambda _: None,
                           **QUICK)
    assert report.before is not None and report.after is not None
    assert report.prompts > 8 and report.label_tokens == report.prompts * 24
    assert report.after.per_step[0] > report.before.per_step[0] + MIN_GAIN, (
        report.before.describe(), report.after.describe())
    assert report.curve[-1][1] < report.curve[0][1]  # the train loss fell
    readme = (out / "README.md").read_text()
    assert readme.count("## Distillation on the target's greedy text") == 1
    assert "distil it" in readme
    assert (out / "tokenizer.json").read_bytes() == (draft / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 32

    # A second run over its own output replaces its README section.
    distill_draft(out, target, out, log=lambda _: None, **dict(QUICK, steps=2, eval_every=2))
    assert (out / "README.md").read_text().count("## Distillation on the target's") == 1

    spec = {"method": "draft_model", "model": str(out), "num_speculative_tokens": 3,
            "adaptive": False}
    tokenizer = AutoTokenizer.from_pretrained(target)
    prompts = [{"prompt_token_ids": p} for p in heldout_prompts(tokenizer, 4, 16)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    base = LLM(str(target), dtype="float32").generate(prompts, params, use_tqdm=False)
    llm = LLM(str(target), dtype="float32", speculative_config=spec)
    drafted = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in drafted] == [o.outputs[0].token_ids for o in base]
    stats = llm.engine.get_stats().spec_decoding
    assert stats is not None and stats.num_accepted_tokens > 0
