"""The training loop (AdamW, warm-up + cosine, gradient clipping, optional distillation) and
the held-out evaluation of the default models."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LoopSettings:
    """What one training run does, step by step (checked by `TrainConfig`)."""

    num_steps: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 50
    eval_every: int = 250
    bf16: bool = True
    compile: bool = False
    # Share of the loss that is KL(teacher || student), the rest being cross-entropy.
    distill_weight: float = 0.0


@dataclass
class CurvePoint:
    step: int
    tokens: int
    train_loss: float
    heldout_loss: Optional[float] = None


@dataclass
class LoopResult:
    """What a run did: tokens seen, wall time (compilation included), the steady rate, the curve."""

    tokens: int
    seconds: float
    tokens_per_s: float
    curve: List[CurvePoint] = field(default_factory=list)


@dataclass(frozen=True)
class EvalResult:
    """Held-out figures over a fixed set of windows. `predictions` are the argmax tokens
    (``[windows, context]``) so that another model's greedy tokens can be compared to them."""

    loss: float
    top1: float
    num_positions: int
    predictions: np.ndarray
    agreement: Optional[float] = None

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def lr_at(step: int, settings: LoopSettings) -> float:
    """Linear warm-up to `lr`, then a cosine down to `lr * min_lr_ratio` at the last step."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    span = max(1, settings.num_steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    floor = settings.lr * settings.min_lr_ratio
    return floor + (settings.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def _optimizer(model: torch.nn.Module, settings: LoopSettings) -> torch.optim.Optimizer:
    # Norm weights (1-D) are not decayed; matrices (the tied embedding included) are.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)


def _loss_fn(model: torch.nn.Module, teacher: Optional[torch.nn.Module],
             settings: LoopSettings) -> Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]:
    weight = settings.distill_weight

    def loss_of(window: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = window[:, :-1], window[:, 1:]
        with _autocast(settings.bf16):
            logits = model(input_ids=inputs).logits
        logits = logits.float().flatten(0, 1)
        ce = F.cross_entropy(logits, labels.flatten())
        if teacher is None or weight == 0.0:
            return ce, ce
        with torch.no_grad(), _autocast(settings.bf16):
            target = teacher(input_ids=inputs).logits
        target_logp = F.log_softmax(target.float().flatten(0, 1), dim=-1)
        kl = F.kl_div(F.log_softmax(logits, dim=-1), target_logp, log_target=True,
                      reduction="batchmean")
        return (1.0 - weight) * ce + weight * kl, ce

    return torch.compile(loss_of) if settings.compile else loss_of


def train(
    model: torch.nn.Module,
    batches: Iterable[np.ndarray],
    settings: LoopSettings,
    *,
    heldout: Optional[np.ndarray] = None,
    teacher: Optional[torch.nn.Module] = None,
    log: Callable[[str], None] = print,
) -> LoopResult:
    """Trains `model` in place on `batches` (``[batch, context + 1]`` token windows, one per
    step). Logs the mean train cross-entropy every `log_every` steps and the loss on
    `heldout` windows every `eval_every` steps and at the end."""
    model.train()
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    optimizer = _optimizer(model, settings)
    loss_of = _loss_fn(model, teacher, settings)
    result = LoopResult(tokens=0, seconds=0.0, tokens_per_s=0.0)
    start = time.monotonic()
    window_start, window_tokens, window_losses = start, 0, []
    steady_tokens, steady_seconds = 0, 0.0
    for step, batch in enumerate(batches):
        if step >= settings.num_steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings)
        window = torch.from_numpy(batch.astype(np.int64))
        loss, ce = loss_of(window)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens = window.shape[0] * (window.shape[1] - 1)
        result.tokens += tokens
        window_tokens += tokens
        window_losses.append(ce.item())
        last = step + 1 == settings.num_steps
        if (step + 1) % settings.log_every == 0 or last:
            now = time.monotonic()
            rate = window_tokens / (now - window_start)
            if step + 1 > settings.log_every:  # the first window holds the compilation
                steady_tokens += window_tokens
                steady_seconds += now - window_start
            point = CurvePoint(step + 1, result.tokens, float(np.mean(window_losses)))
            if heldout is not None and ((step + 1) % settings.eval_every == 0 or last):
                point.heldout_loss = evaluate(model, heldout, bf16=settings.bf16).loss
                model.train()
            result.curve.append(point)
            heldout_text = "" if point.heldout_loss is None else \
                f"  heldout {point.heldout_loss:.3f}"
            log(f"step {step + 1:5d}/{settings.num_steps}  tokens {result.tokens / 1e6:7.2f}M  "
                f"train {point.train_loss:.3f}{heldout_text}  lr {lr_at(step, settings):.2e}  "
                f"{rate:,.0f} tok/s  {now - start:6.0f} s")
            window_start, window_tokens, window_losses = time.monotonic(), 0, []
    result.seconds = time.monotonic() - start
    result.tokens_per_s = (steady_tokens / steady_seconds if steady_seconds
                           else result.tokens / max(result.seconds, 1e-9))
    model.eval()
    return result


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    windows: np.ndarray,
    *,
    bf16: bool = False,
    batch_size: int = 8,
    reference: Optional[np.ndarray] = None,
) -> EvalResult:
    """Mean cross-entropy and top-1 accuracy of `model` on every position of `windows`; with
    `reference` (another model's `predictions` on the same windows), also the share of
    positions where both models' argmax tokens agree."""
    model.eval()
    total_loss, correct, agree, count = 0.0, 0, 0, 0
    predictions = np.empty((len(windows), windows.shape[1] - 1), dtype=np.int32)
    for i in range(0, len(windows), batch_size):
        batch = torch.from_numpy(windows[i:i + batch_size].astype(np.int64))
        inputs, labels = batch[:, :-1], batch[:, 1:]
        with _autocast(bf16):
            logits = model(input_ids=inputs).logits
        logits = logits.float()
        total_loss += float(F.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                            reduction="sum"))
        argmax = logits.argmax(dim=-1)
        correct += int((argmax == labels).sum())
        count += labels.numel()
        predictions[i:i + len(batch)] = argmax.numpy()
        if reference is not None:
            agree += int((argmax == torch.from_numpy(reference[i:i + len(batch)])).sum())
    return EvalResult(
        loss=total_loss / count,
        top1=correct / count,
        num_positions=count,
        predictions=predictions,
        agreement=None if reference is None else agree / count,
    )


def fp16_round_trip(model: torch.nn.Module) -> Any:
    """The model with its weights rounded to fp16 (as saved) and computing in fp32: what the
    checkpoint is, as pagedserve serves it on a CPU."""
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.half().float())
    return model
