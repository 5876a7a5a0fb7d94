"""Fine-tunes a draft model on its target's own greedy text, for speculative decoding::

    python -m pagedserve.devtools.distill_draft OUT --target DIR --draft DIR [--steps N] ...

A greedy draft's token is accepted where it equals the target's greedy token, on text the
target writes itself. The draft's pre-training (devtools/train: KL to the target on corpus
text) fits the target's distribution on text people wrote, which is not that: so this takes
training-split prompts (each file's start, and random windows of it), lets the target continue
each greedily with this engine (fp32, never stopping early, as the spec-decode benchmark
generates), and trains the draft with cross-entropy on those continuations: the prompt is
context, each continuation token a label, which is exactly the target's greedy choice there.

Agreement is measured on the benchmark's own held-out workload (the first ``prompt_tokens``
tokens of held-out files, continued greedily by the target): teacher-forced, which for greedy
drafting is exact (while drafts agree, the draft is fed the target's tokens), as
``train_eagle3.Agreement``. Deterministic given its arguments (seeded order, one thread).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from pagedserve.devtools.train_eagle3 import Agreement

PathLike = Union[str, pathlib.Path]
_WEIGHT_FILES = ("model.safetensors", "config.json", "README.md")


@dataclass(frozen=True)
class DistillConfig:
    """What the distillation generates, how it trains, and how it measures."""

    prompt_tokens: int = 128  # per prompt (after BOS for a file's start)
    new_tokens: int = 128  # the target's continuation of each prompt: the labels
    windows_per_file: int = 1  # random windows of each training file, beside its start
    max_files: Optional[int] = None  # the first training files only (tests)
    steps: int = 1000
    batch_size: int = 16
    lr: float = 3e-4
    warmup_steps: int = 20
    eval_every: int = 250
    eval_prompts: int = 64
    eval_tokens: int = 64
    num_drafts: int = 3  # the k the agreement's chain is measured for
    seed: int = 0
    threads: int = 1
    max_num_seqs: int = 64  # the engine's batch while generating

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "new_tokens", "steps", "batch_size", "eval_every",
                     "eval_prompts", "eval_tokens", "num_drafts", "threads", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.windows_per_file < 0 or self.warmup_steps < 0:
            raise ValueError("windows_per_file and warmup_steps must be >= 0")
        if self.max_files is not None and self.max_files < 1:
            raise ValueError(f"max_files must be at least 1, got {self.max_files}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.eval_tokens <= self.num_drafts:
            raise ValueError("eval_tokens must exceed num_drafts")


@dataclass
class DistillReport:
    """What a run did: data sizes, time, and agreement before, during and after."""

    prompts: int = 0
    label_tokens: int = 0
    generate_seconds: float = 0.0
    train_seconds: float = 0.0
    before: Optional[Agreement] = None
    after: Optional[Agreement] = None
    curve: list[tuple[int, float, Agreement]] = field(default_factory=list)


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def file_prompts(tokenizer: Any, texts: Sequence[str], prompt_tokens: int,
                 windows_per_file: int, seed: int) -> np.ndarray:
    """``[n, prompt_tokens + 1]`` prompts: per file long enough, BOS and its first tokens, then
    ``windows_per_file`` windows at seeded random offsets (all of the same length)."""
    rng = np.random.default_rng(seed)
    width = prompt_tokens + 1
    prompts = []
    for ids in tokenizer(list(texts), add_special_tokens=False).input_ids:
        if len(ids) < prompt_tokens + width:
            continue
        prompts.append([tokenizer.bos_token_id, *ids[:prompt_tokens]])
        for start in rng.integers(prompt_tokens, len(ids) - width + 1, windows_per_file):
            prompts.append(ids[start:start + width])
    return np.array(prompts, dtype=np.int64).reshape(-1, width)


def heldout_prompts(tokenizer: Any, count: int, prompt_tokens: int) -> list[list[int]]:
    """``count`` prompts: BOS and the first ``prompt_tokens`` tokens of held-out files long
    enough, evenly spaced over the split in path order (the spec-decode benchmark's held-out
    workload)."""
    from pagedserve.devtools.stdlib_corpus import source_files

    files = source_files("heldout")
    encoded = tokenizer([f.text for f in files], add_special_tokens=False).input_ids
    long_enough = [ids for ids in encoded if len(ids) >= prompt_tokens]
    if len(long_enough) < count:
        raise ValueError(f"the held-out split has {len(long_enough)} files of {prompt_tokens} "
                         f"tokens, fewer than the {count} needed")
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    picks = [i * len(long_enough) // count for i in range(count)]
    return [bos + long_enough[i][:prompt_tokens] for i in picks]


def continue_greedily(llm: Any, prompts: Sequence[Sequence[int]],
                      new_tokens: int) -> np.ndarray:
    """``[n, len(prompt) + new_tokens]``: each prompt (all of one length) and the target's
    greedy continuation by ``llm`` (this engine's LLM), ``new_tokens`` long whatever it
    emits."""
    from pagedserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": list(map(int, p))} for p in prompts], params,
                           use_tqdm=False)
    rows = [list(map(int, p)) + list(o.outputs[0].token_ids) for p, o in zip(prompts, outputs)]
    return np.array(rows, dtype=np.int64)


@torch.no_grad()
def agreement(model: torch.nn.Module, sequences: np.ndarray, first: int, num_drafts: int,
              batch_size: int = 16) -> Agreement:
    """Teacher-forced agreement of ``model``'s greedy drafts with ``sequences``' tokens from
    column ``first`` on (the target's greedy ones): draft j from position t is the model's
    argmax at t + j, counted over every start t with all of its k labels in range."""
    model.eval()
    ok = []
    for i in range(0, len(sequences), batch_size):
        ids = torch.from_numpy(sequences[i:i + batch_size])
        greedy = model(input_ids=ids).logits.argmax(-1)[:, first - 1:-1]
        ok.append((greedy == ids[:, first:]).numpy())
    hits = np.concatenate(ok)
    starts = hits.shape[1] - num_drafts + 1
    per_step = [hits[:, j:j + starts] for j in range(num_drafts)]
    chain = np.cumprod(np.stack(per_step), axis=0)
    return Agreement(tuple(float(s.mean()) for s in per_step),
                     tuple(float(c.mean()) for c in chain), int(per_step[0].size))


def finetune(model: torch.nn.Module, sequences: np.ndarray, first: int, config: DistillConfig,
             evaluate: Callable[[], Agreement], log: Callable[[str], None]
             ) -> list[tuple[int, float, Agreement]]:
    """Trains ``model`` in place: AdamW, linear warm-up then cosine decay, cross-entropy on
    columns ``first`` on of seeded batches of ``sequences``; returns (step, mean train loss,
    agreement) every ``eval_every`` steps and at the end."""
    gen = np.random.default_rng(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95),
                                  weight_decay=0.0)
    curve, losses = [], []
    model.train()
    for step in range(config.steps):
        warm = min(1.0, (step + 1) / max(config.warmup_steps, 1))
        decay = 0.5 * (1.0 + math.cos(math.pi * step / config.steps))
        for group in optimizer.param_groups:
            group["lr"] = config.lr * warm * decay
        ids = torch.from_numpy(sequences[gen.integers(0, len(sequences), config.batch_size)])
        logits = model(input_ids=ids[:, :-1]).logits[:, first - 1:]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, first:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            result = evaluate()
            model.train()
            curve.append((step + 1, float(np.mean(losses)), result))
            losses = []
            log(f"step {step + 1}/{config.steps}  train {curve[-1][1]:.3f}  "
                f"{result.describe()}")
    model.eval()
    return curve


def distill_draft(out: PathLike, target_dir: PathLike, draft_dir: PathLike,
                  config: Optional[DistillConfig] = None, *, command: Optional[str] = None,
                  log: Callable[[str], None] = _log, **overrides: Any) -> DistillReport:
    """Distils the draft at ``draft_dir`` onto ``target_dir``'s greedy text and writes it to
    ``out`` (which may be ``draft_dir``): its weights in their dtype, the draft's other files,
    and its README with a section saying how (``command``) and what it measured."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pagedserve.devtools.stdlib_corpus import source_files

    config = config or DistillConfig(**overrides)
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    out, draft_dir = pathlib.Path(out), pathlib.Path(draft_dir)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    draft_tokenizer = pathlib.Path(draft_dir, "tokenizer.json")
    if draft_tokenizer.read_bytes() != pathlib.Path(target_dir, "tokenizer.json").read_bytes():
        raise ValueError(f"the draft {draft_dir} and the target {target_dir} have different "
                         "tokenizers")
    report = DistillReport()
    texts = [f.text for f in source_files("train")][:config.max_files]
    prompts = file_prompts(tokenizer, texts, config.prompt_tokens, config.windows_per_file,
                           config.seed)
    started = time.monotonic()
    log(f"generating: {len(prompts)} prompts x {config.new_tokens} tokens")
    from pagedserve import LLM

    # fp32, as the spec-decode benchmark runs the target.
    llm = LLM(str(target_dir), dtype="float32", max_num_seqs=config.max_num_seqs)
    train = continue_greedily(llm, prompts, config.new_tokens)
    heldout = continue_greedily(
        llm, heldout_prompts(tokenizer, config.eval_prompts, config.prompt_tokens),
        config.eval_tokens)
    del llm
    report.prompts, report.label_tokens = len(train), len(train) * config.new_tokens
    report.generate_seconds = time.monotonic() - started
    first_train = train.shape[1] - config.new_tokens
    first_heldout = heldout.shape[1] - config.eval_tokens

    model = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32)
    saved = json.loads((draft_dir / "config.json").read_text())
    saved_dtype = saved.get("dtype") or saved.get("torch_dtype") or "float32"

    def evaluate() -> Agreement:
        return agreement(model, heldout, first_heldout, config.num_drafts)

    report.before = evaluate()
    log(f"before: {report.before.describe()}")
    started = time.monotonic()
    report.curve = finetune(model, train, first_train, config, evaluate, log)
    report.train_seconds = time.monotonic() - started
    report.after = report.curve[-1][2]
    _write(out, draft_dir, model, getattr(torch, saved_dtype), config, report, command)
    return report


def _write(out: pathlib.Path, draft_dir: pathlib.Path, model: torch.nn.Module,
           dtype: torch.dtype, config: DistillConfig, report: DistillReport,
           command: Optional[str]) -> None:
    readme = (draft_dir / "README.md").read_text() if (draft_dir / "README.md").is_file() else ""
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != draft_dir.resolve():
        for path in draft_dir.iterdir():
            if path.is_file() and path.name not in _WEIGHT_FILES:
                shutil.copy2(path, out / path.name)
    model.to(dtype).save_pretrained(out)
    assert report.before is not None and report.after is not None
    # A second distillation replaces the first one's section.
    readme = readme.split("\n## Distillation on the target's greedy text")[0].rstrip("\n")
    lines = ["", "", "## Distillation on the target's greedy text", "",
             "Then fine-tuned with `pagedserve.devtools.distill_draft` on the target's own "
             "greedy continuations of training-split prompts (cross-entropy on the "
             "continuation tokens; see that module):", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    lines += [f"- data: {report.prompts} prompts of {config.prompt_tokens + 1} tokens, each "
              f"continued {config.new_tokens} tokens by the target ({report.label_tokens:,} "
              f"labels), generated in {report.generate_seconds / 60:.1f} min",
              f"- training: {config.steps} steps of {config.batch_size} sequences in "
              f"{report.train_seconds / 60:.1f} min on {config.threads} CPU thread(s)",
              f"- settings: `{json.dumps(asdict(config), sort_keys=True)}`", "",
              f"Agreement with the target on its greedy continuations ({config.eval_tokens} "
              f"tokens) of the spec-decode benchmark's {config.eval_prompts} held-out prompts, "
              f"teacher-forced (exact for greedy drafting), {config.num_drafts} drafts:", "",
              "| | draft 0 | all drafts up to 1 | all drafts up to 2 | mean accepted drafts |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for name, result in (("before", report.before), ("after", report.after)):
        chain = [f"{100 * c:.1f}%" for c in result.chain] + [""] * 3
        lines.append(f"| {name} | {chain[0]} | {chain[1]} | {chain[2]} | "
                     f"{result.mean_accepted:.2f} |")
    lines += ["", "| step | train loss | draft 0 | mean accepted drafts |",
              "| ---: | ---: | ---: | ---: |"]
    lines += [f"| {step} | {loss:.3f} | {100 * result.per_step[0]:.1f}% | "
              f"{result.mean_accepted:.2f} |" for step, loss, result in report.curve]
    (out / "README.md").write_text(readme + "\n".join(lines) + "\n")
    for path in out.iterdir():
        path.chmod(0o644)


def _parser() -> argparse.ArgumentParser:
    defaults = DistillConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--target", required=True, type=pathlib.Path)
    parser.add_argument("--draft", required=True, type=pathlib.Path,
                        help="the draft to start from (OUT may be the same directory)")
    for name in DistillConfig.__dataclass_fields__:
        if name == "max_files":
            continue
        kind = type(getattr(defaults, name))
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                            help=f"default {getattr(defaults, name)}")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> DistillReport:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    settings = {name: getattr(args, name) for name in DistillConfig.__dataclass_fields__
                if getattr(args, name, None) is not None}
    command = " ".join(["python -m pagedserve.devtools.distill_draft", *map(shlex.quote, argv)])
    report = distill_draft(args.out_dir, args.target, args.draft, DistillConfig(**settings),
                           command=command)
    assert report.after is not None
    print(f"{args.out_dir}: {report.after.describe()}")
    return report


if __name__ == "__main__":
    main()
