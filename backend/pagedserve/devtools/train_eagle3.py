"""Trains an EAGLE-3 head for a target checkpoint on the CPU and writes it in the published
format (the tensor names and config of `eagle3_head.build_eagle3_head`, whose random init it
starts from)::

    python -m pagedserve.devtools.train_eagle3 OUT --target DIR [--steps N] ...
    python -m pagedserve.devtools.train_eagle3 OUT --target DIR --eval-only   # measure OUT

Data are the target's own: the transformers target (fp32) runs over each training window with
``output_hidden_states``; its residual streams entering the head's aux layers feed ``fc``, and
its greedy tokens are the labels (distillation: acceptance is agreement with them). The loss is
EAGLE-3's: at each draft step, the cross-entropy of the head's draft-vocabulary distribution
against the target's distribution restricted to the draft vocabulary, on the rows whose target
argmax lies in it, weighted 0.8^step over ``num_draft_steps`` unrolled steps (the training-time
test of `eagle3_train_head`). The draft vocabulary holds the target's most frequent greedy
tokens over the first training windows. Windows come from the stdlib corpus's train split by
default. Deterministic given its arguments (seeded init, data order and threads).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from pagedserve.devtools.eagle3_train_head import PlainEagle3Head
from pagedserve.devtools.train_data import TokenWindows, batches, encode_files, pack
from pagedserve.devtools.train_loop import LoopSettings, _optimizer, lr_at

PathLike = Union[str, pathlib.Path]
_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Eagle3TrainConfig:
    """Every choice of a head's training run, validated here."""

    steps: int = 200
    batch_size: int = 8
    context: int = 256
    draft_vocab_size: int = 1024
    num_draft_steps: int = 3
    step_weight: float = 0.8  # loss weight of draft step j: step_weight ** j
    hard_weight: float = 0.0  # share of the loss against the target's argmax (not its probs)
    lr: float = 3e-3
    warmup_steps: int = 20
    seed: int = 0
    threads: int = 1
    initializer_range: float = 0.02
    aux_layer_ids: Optional[tuple[int, ...]] = None
    vocab_windows: int = 256  # training windows whose target greedy tokens choose the vocab
    torch_dtype: str = "float32"  # of the written tensors
    log_every: int = 25

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "draft_vocab_size", "num_draft_steps",
                     "warmup_steps", "threads", "vocab_windows", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.context < 2:
            raise ValueError(f"context must be >= 2, got {self.context}")
        if self.num_draft_steps > 8:
            raise ValueError(f"num_draft_steps must be in [1, 8], got {self.num_draft_steps}")
        if not 0 < self.step_weight <= 1:
            raise ValueError(f"step_weight must be in (0, 1], got {self.step_weight}")
        if not 0 <= self.hard_weight <= 1:
            raise ValueError(f"hard_weight must be in [0, 1], got {self.hard_weight}")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if not 0 < self.initializer_range < 1:
            raise ValueError(f"initializer_range must be in (0, 1), got "
                             f"{self.initializer_range}")
        if self.torch_dtype not in _DTYPES:
            raise ValueError(f"torch_dtype must be one of {_DTYPES}, got {self.torch_dtype!r}")
        if self.aux_layer_ids is not None and len(self.aux_layer_ids) != 3:
            raise ValueError(f"aux_layer_ids must name 3 layers, got {self.aux_layer_ids}")


@dataclass(frozen=True)
class Agreement:
    """Teacher-forced agreement of a head's greedy drafts with the target's greedy tokens.
    ``per_step[j]``: draft step j's token equals the target's at rows where step j has a label;
    ``chain[j]``: steps 0..j all agree (what greedy acceptance of j + 1 drafts needs);
    ``mean_accepted``: the expected accepted drafts per verification, sum(chain)."""

    per_step: tuple[float, ...]
    chain: tuple[float, ...]
    positions: int

    @property
    def mean_accepted(self) -> float:
        return float(sum(self.chain))

    def describe(self) -> str:
        steps = ", ".join(f"step {j}: {100 * a:.1f}%" for j, a in enumerate(self.per_step))
        chain = ", ".join(f"{100 * a:.1f}%" for a in self.chain)
        return (f"agreement {steps}; all steps up to j: {chain}; mean accepted drafts "
                f"{self.mean_accepted:.2f} of {len(self.chain)} ({self.positions} positions)")


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_target(target_dir: PathLike) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()


def aux_layer_ids_of(head_config: dict, num_target_layers: int) -> tuple[int, ...]:
    from pagedserve.models.llama import default_eagle3_aux_layers

    ids = head_config.get("eagle_aux_hidden_state_layer_ids")
    return tuple(ids) if ids is not None else tuple(default_eagle3_aux_layers(num_target_layers))


@torch.no_grad()
def target_features(target: torch.nn.Module, windows: torch.Tensor,
                    aux_layer_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The target over ``[batch, rows]`` tokens: the aux states (the residual streams entering
    the aux layers, HF's ``hidden_states[i]``) ``[batch, rows, 3 * hidden]`` and the fp32
    logits ``[batch, rows, vocab]``."""
    out = target(input_ids=windows, output_hidden_states=True)
    aux = torch.cat([out.hidden_states[i] for i in aux_layer_ids], -1)
    return aux.float(), out.logits.float()


def choose_draft_vocab(target: torch.nn.Module, windows: np.ndarray, size: int,
                       batch_size: int, vocab_size: int) -> torch.Tensor:
    """The ``size`` target ids most often the target's greedy token over ``windows`` (ties:
    the more frequent in the data, then the lower id), sorted."""
    greedy = torch.zeros(vocab_size, dtype=torch.long)
    for i in range(0, len(windows), batch_size):
        batch = torch.from_numpy(windows[i:i + batch_size].astype(np.int64))
        with torch.no_grad():
            argmax = target(input_ids=batch).logits.argmax(-1)
        greedy += torch.bincount(argmax.flatten(), minlength=vocab_size)
    data = torch.bincount(torch.from_numpy(windows.astype(np.int64)).flatten(),
                          minlength=vocab_size)
    score = greedy * (int(data.max()) + 1) + data
    order = torch.sort(-score, stable=True).indices
    return order[:size].sort().values


def step_targets(logits: list[torch.Tensor], target_logits: torch.Tensor
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each draft step's (head logits, target logits) on the rows that have a label: step j at
    row i predicts the target's token at row i + 1 + j."""
    rows = target_logits.shape[1]
    return [(step[:, :rows - 1 - j], target_logits[:, 1 + j:]) for j, step in enumerate(logits)
            if rows - 1 - j > 0]


def eagle3_loss(logits: list[torch.Tensor], target_logits: torch.Tensor,
                draft_ids: torch.Tensor, step_weight: float, hard_weight: float = 0.0
                ) -> torch.Tensor:
    """EAGLE-3's loss (see the module docstring); ``hard_weight`` of it is the cross-entropy
    against the target's argmax instead of its distribution."""
    to_draft = torch.full((target_logits.shape[-1],), -1, dtype=torch.long)
    to_draft[draft_ids] = torch.arange(len(draft_ids))
    in_draft = torch.zeros(target_logits.shape[-1], dtype=torch.bool)
    in_draft[draft_ids] = True
    total = target_logits.new_zeros(())
    for j, (head, target) in enumerate(step_targets(logits, target_logits)):
        argmax = target.argmax(-1)
        mask = in_draft[argmax].float()
        logp = head.log_softmax(-1)
        soft = -(target[..., draft_ids].softmax(-1) * logp).sum(-1)
        hard = -logp.gather(-1, to_draft[argmax].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        ce = (1 - hard_weight) * soft + hard_weight * hard
        total = total + step_weight ** j * (ce * mask).sum() / mask.sum().clamp(min=1)
    return total


@torch.no_grad()
def measure_agreement(head: PlainEagle3Head, draft_ids: torch.Tensor, target: torch.nn.Module,
                      aux_layer_ids: Sequence[int], windows: np.ndarray, num_steps: int,
                      batch_size: int = 8, first_row: int = 0) -> Agreement:
    """Teacher-forced agreement (`Agreement`) of ``head`` on ``windows`` ``[n, rows]``,
    counting the drafts from rows ``first_row`` on."""
    head.eval()
    agree = np.zeros(num_steps)
    chain = np.zeros(num_steps)
    counts = np.zeros(num_steps)
    for i in range(0, len(windows), batch_size):
        batch = torch.from_numpy(windows[i:i + batch_size].astype(np.int64))
        aux, target_logits = target_features(target, batch, aux_layer_ids)
        logits = head.unroll(batch, aux, num_steps)
        ok_so_far: Optional[torch.Tensor] = None
        for j, (step, target_step) in enumerate(step_targets(logits, target_logits)):
            ok = draft_ids[step.argmax(-1)] == target_step.argmax(-1)
            ok_so_far = ok if ok_so_far is None else ok_so_far[:, :ok.shape[1]] & ok
            agree[j] += int(ok[:, first_row:].sum())
            chain[j] += int(ok_so_far[:, first_row:].sum())
            counts[j] += ok[:, first_row:].numel()
    counts = np.maximum(counts, 1)
    return Agreement(tuple(float(x) for x in agree / counts),
                     tuple(float(x) for x in chain / counts), int(counts[0]))


def load_plain_head(head_dir: PathLike, target: torch.nn.Module
                    ) -> tuple[PlainEagle3Head, torch.Tensor, dict]:
    """A written head as a `PlainEagle3Head` (its embedding, else the target's), its draft ids
    (target ids, by draft id) and its config."""
    from safetensors.torch import load_file

    head_dir = pathlib.Path(head_dir)
    config = json.loads((head_dir / "config.json").read_text())
    tensors = load_file(str(head_dir / "model.safetensors"))
    embedding = tensors.get("embed_tokens.weight", target.get_input_embeddings().weight)
    n = int(config["draft_vocab_size"])
    d2t = tensors.get("d2t", torch.zeros(n, dtype=torch.long))
    return PlainEagle3Head(tensors, config, embedding), torch.arange(n) + d2t.long(), config


def head_agreement(head_dir: PathLike, target_dir: PathLike, windows: np.ndarray,
                   num_steps: int = 3, batch_size: int = 8, *,
                   greedy_after: Optional[int] = None) -> Agreement:
    """Teacher-forced agreement of the head written at ``head_dir`` with its target's greedy
    tokens on ``windows`` (plain torch, fp32). With ``greedy_after``, each window's first
    ``greedy_after`` tokens are a prompt that the target continues greedily to the window's
    length, and the drafts over the continuation are counted: there the fed tokens are the
    target's greedy ones, so ``chain`` is greedy decoding's acceptance."""
    target = load_target(target_dir)
    head, draft_ids, config = load_plain_head(head_dir, target)
    ids = aux_layer_ids_of(config, target.config.num_hidden_layers)
    first_row = 0
    if greedy_after is not None:
        prompts = torch.from_numpy(windows[:, :greedy_after].astype(np.int64))
        new = windows.shape[1] - greedy_after
        with torch.no_grad():
            windows = target.generate(prompts, attention_mask=torch.ones_like(prompts),
                                      do_sample=False, max_new_tokens=new, min_new_tokens=new,
                                      pad_token_id=0).numpy()
        first_row = greedy_after - 1  # the first row whose fed token is a greedy one
    return measure_agreement(head, draft_ids, target, ids, windows, num_steps, batch_size,
                             first_row)


@torch.no_grad()
def sample_sequences(target_dir: PathLike, count: int, length: int, *, prompt_length: int = 4,
                     seed: int = 0, temperature: float = 1.0) -> np.ndarray:
    """``[count, length]`` token sequences: random prompts of ``prompt_length`` ids continued
    by the target's own samples (seeded, never stopped early): training data for a random
    target."""
    target = load_target(target_dir)
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(4, target.config.vocab_size, (count, prompt_length), generator=gen)
    new = length - prompt_length
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        ids = target.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                              temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=new,
                              min_new_tokens=new, pad_token_id=0)
    return ids.numpy().astype(np.int64)


def stdlib_windows(target_dir: PathLike, split: str, context: int, seed: int) -> TokenWindows:
    """The stdlib corpus's ``split`` tokenized with the target's tokenizer, as the default
    models' training packs it: ``[n, context + 1]`` windows (train: shuffled by ``seed``)."""
    from tokenizers import Tokenizer

    from pagedserve.devtools import stdlib_corpus

    target_dir = pathlib.Path(target_dir)
    config = json.loads((target_dir / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(target_dir / "tokenizer.json"))
    files = stdlib_corpus.source_files(split)  # type: ignore[arg-type]
    encoded = encode_files(tokenizer, [f.text for f in files], int(config["bos_token_id"]),
                           int(config["eos_token_id"]))
    return pack(encoded, context, shuffle_seed=seed if split == "train" else None)


def train_eagle3_head(
    out_dir: PathLike,
    target_dir: PathLike,
    *,
    texts: Optional[Sequence[str]] = None,
    sequences: Optional[np.ndarray] = None,
    heldout: Optional[np.ndarray] = None,
    command: Optional[str] = None,
    log: Callable[[str], None] = _log,
    **settings: object,
) -> pathlib.Path:
    """Trains a head for ``target_dir`` and writes it to ``out_dir``; returns ``out_dir``.

    Training windows: ``sequences`` (``[n, rows]`` token ids), else ``texts`` tokenized with
    the target's tokenizer and packed, else the stdlib corpus's train split. ``settings`` are
    `Eagle3TrainConfig`'s fields (steps, draft_vocab_size, seed, ...). With ``heldout``
    windows, the final agreement on them is logged and written into the README."""
    from safetensors.torch import load_file

    from pagedserve.devtools.eagle3_head import build_eagle3_head

    config = Eagle3TrainConfig(**settings)  # type: ignore[arg-type]
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    out = pathlib.Path(out_dir)
    windows = _training_windows(target_dir, texts, sequences, config)
    if len(windows) < config.batch_size:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {len(windows)} training "
                         "windows")
    target = load_target(target_dir)
    vocab = target.config.vocab_size
    if config.draft_vocab_size > vocab:
        raise ValueError(f"draft_vocab_size {config.draft_vocab_size} exceeds the target's "
                         f"vocab_size {vocab}")
    start = time.monotonic()
    draft_ids = choose_draft_vocab(target, windows[:config.vocab_windows],
                                   config.draft_vocab_size, config.batch_size, vocab)
    build_eagle3_head(out, target_dir, draft_vocab_size=config.draft_vocab_size,
                      seed=config.seed, initializer_range=config.initializer_range,
                      aux_layer_ids=list(config.aux_layer_ids) if config.aux_layer_ids else None)
    head_config = json.loads((out / "config.json").read_text())
    head = PlainEagle3Head(load_file(str(out / "model.safetensors")), head_config,
                           target.get_input_embeddings().weight)
    aux_ids = aux_layer_ids_of(head_config, target.config.num_hidden_layers)
    log(f"{len(windows)} training windows of {windows.shape[1]} tokens; draft vocabulary "
        f"{config.draft_vocab_size} of {vocab} ({time.monotonic() - start:.0f} s); aux layers "
        f"{list(aux_ids)}")

    loop = LoopSettings(num_steps=config.steps, lr=config.lr,
                        warmup_steps=min(config.warmup_steps, config.steps), weight_decay=0.0)
    optimizer = _optimizer(head, loop)
    head.train()
    losses: list[float] = []
    for step, batch in enumerate(batches(windows, config.batch_size, config.seed,
                                         config.steps)):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, loop)
        tokens = torch.from_numpy(batch.astype(np.int64))
        aux, target_logits = target_features(target, tokens, aux_ids)
        logits = head.unroll(tokens, aux, config.num_draft_steps)
        loss = eagle3_loss(logits, target_logits, draft_ids, config.step_weight,
                           config.hard_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), loop.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            log(f"step {step + 1:5d}/{config.steps}  loss {np.mean(losses):.3f}  lr "
                f"{lr_at(step, loop):.2e}  {time.monotonic() - start:6.0f} s")
            losses = []
    seconds = time.monotonic() - start
    agreement = None
    if heldout is not None:
        agreement = measure_agreement(head, draft_ids, target, aux_ids, heldout,
                                      config.num_draft_steps, config.batch_size)
        log(f"held-out {agreement.describe()}")
    _write(out, head, draft_ids, vocab, head_config, config, seconds, agreement, command,
           len(heldout) if heldout is not None else 0)
    return out


def _training_windows(target_dir: PathLike, texts: Optional[Sequence[str]],
                      sequences: Optional[np.ndarray], config: Eagle3TrainConfig) -> np.ndarray:
    if sequences is not None:
        windows = np.asarray(sequences, dtype=np.int64)
        if windows.ndim != 2 or windows.shape[1] < 3:
            raise ValueError(f"sequences must be [n, rows >= 3] token ids, got shape "
                             f"{windows.shape}")
        return windows
    if texts is not None:
        from tokenizers import Tokenizer

        target = json.loads((pathlib.Path(target_dir) / "config.json").read_text())
        tokenizer = Tokenizer.from_file(str(pathlib.Path(target_dir) / "tokenizer.json"))
        encoded = encode_files(tokenizer, list(texts), int(target["bos_token_id"]),
                               int(target["eos_token_id"]))
        return pack(encoded, config.context, shuffle_seed=config.seed).windows
    return stdlib_windows(target_dir, "train", config.context, config.seed).windows


def _write(out: pathlib.Path, head: PlainEagle3Head, draft_ids: torch.Tensor, vocab: int,
           head_config: dict, config: Eagle3TrainConfig, seconds: float,
           agreement: Optional[Agreement], command: Optional[str], heldout_windows: int
           ) -> None:
    """Writes the trained tensors (with d2t/t2d) over the random init, the config's dtype,
    and a README saying how the head was made."""
    from safetensors.torch import save_file

    dtype = getattr(torch, config.torch_dtype)
    tensors = {k: v.to(dtype).contiguous() for k, v in head.published_tensors().items()}
    n = len(draft_ids)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[draft_ids] = True
    tensors["d2t"] = draft_ids - torch.arange(n)
    tensors["t2d"] = t2d
    head_config["torch_dtype"] = config.torch_dtype
    (out / "config.json").write_text(json.dumps(head_config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out / "model.safetensors"))
    lines = ["# EAGLE-3 head (trained locally)", "",
             "An EAGLE-3 draft head in the published `LlamaForCausalLMEagle3` format, trained "
             "with `pagedserve.devtools.train_eagle3` on the target's own features and greedy "
             "tokens (the token embedding is the target's).", ""]
    if command:
        lines += ["Produced by:", "", "```", command, "```", ""]
    lines += [f"- training: {config.steps} steps of {config.batch_size} windows, "
              f"{config.num_draft_steps} unrolled draft steps, {seconds:.0f} s on "
              f"{config.threads} CPU thread(s)",
              f"- settings: `{json.dumps(asdict(config), sort_keys=True)}`"]
    if agreement is not None:
        lines.append(f"- held-out ({heldout_windows} windows), teacher-forced, plain torch: "
                     f"{agreement.describe()}")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    for path in out.iterdir():
        path.chmod(0o644)


def _parser() -> argparse.ArgumentParser:
    defaults = Eagle3TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--target", required=True, type=pathlib.Path,
                        help="the target checkpoint directory (with tokenizer.json)")
    for name, kind in (("steps", int), ("batch_size", int), ("context", int),
                       ("draft_vocab_size", int), ("num_draft_steps", int),
                       ("step_weight", float), ("hard_weight", float), ("lr", float),
                       ("warmup_steps", int),
                       ("seed", int), ("threads", int), ("initializer_range", float),
                       ("vocab_windows", int), ("log_every", int)):
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                            help=f"default {getattr(defaults, name)}")
    parser.add_argument("--aux-layer-ids", type=int, nargs=3, default=None,
                        help="pinned eagle_aux_hidden_state_layer_ids (default: vLLM's)")
    parser.add_argument("--dtype", choices=_DTYPES, default=None, help="of the written tensors")
    parser.add_argument("--eval-windows", type=int, default=64,
                        help="stdlib held-out windows the final agreement is measured on")
    parser.add_argument("--eval-only", action="store_true",
                        help="measure the head already at OUT on the held-out windows; no "
                             "training")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> pathlib.Path:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    settings: dict[str, object] = {
        name: getattr(args, name) for name in Eagle3TrainConfig.__dataclass_fields__
        if getattr(args, name, None) is not None}
    if args.aux_layer_ids:
        settings["aux_layer_ids"] = tuple(args.aux_layer_ids)
    if args.dtype:
        settings["torch_dtype"] = args.dtype
    context = int(settings.get("context", Eagle3TrainConfig.context))  # type: ignore[arg-type]
    heldout = stdlib_windows(args.target, "heldout", context, 0).evenly_spaced(args.eval_windows)
    if args.eval_only:
        torch.set_num_threads(int(settings.get("threads", 1)))  # type: ignore[arg-type]
        steps = int(settings.get("num_draft_steps", 3))  # type: ignore[arg-type]
        agreement = head_agreement(args.out_dir, args.target, heldout, steps)
        print(f"{args.out_dir}: held-out ({len(heldout)} windows of {context + 1} tokens), "
              f"teacher-forced, plain torch: {agreement.describe()}")
        prompt = (context + 1) // 4
        greedy = head_agreement(args.out_dir, args.target, heldout, steps, greedy_after=prompt)
        print(f"{args.out_dir}: the target's greedy continuations of the same windows' first "
              f"{prompt} tokens: {greedy.describe()}")
        return args.out_dir
    command = " ".join(["python -m pagedserve.devtools.train_eagle3", *map(shlex.quote, argv)])
    out = train_eagle3_head(args.out_dir, args.target, heldout=heldout, command=command,
                            **settings)
    print(out)
    return out


if __name__ == "__main__":
    main()
