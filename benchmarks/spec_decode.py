"""Speculative decoding on the CPU with the trained target (model_repository/llm/1): tokens/s
with and without speculation at batch 1, 4 and 32, side by side, as a Markdown table.

    python benchmarks/spec_decode.py [--repeat N] [--max-tokens T] [--batches 1 4 32]
        [--methods ngram draft_model eagle3] [--ngram-k K] [--draft-k K] [--eagle3-k K]
        [--profile [BATCH ...]]
        [--threads N] [--smoke]

Two workloads, both fixed by the repository and the running Python:

- **code editing** (method ``ngram``): each prompt holds a piece of code and starts it over: an
  excerpt E of one of this repository's Python files (from its first ``def``/``class`` line,
  whole lines), the code C the target writes after E (its greedy continuation, max_tokens
  long), a blank line, and E again. The answer rewrites C, as an edit does for the lines it
  leaves alone. (The trained 6M-parameter target hardly follows an instruction such as "the
  same code, with one change": it repeated 0.2 of the code after one.) How much the answer
  repeats C is measured on the base engine's greedy output and reported ("repeats": the share
  of generated tokens that lie in blocks matching C, by difflib over token ids).
- **held-out code** (methods ``draft_model`` and ``eagle3``: the trained ``draft_model``, the
  trained ``eagle3_head``): each prompt is the
  beginning of a file of the trained models' held-out split (``stdlib_corpus``).

At batch B the first max(B, --min-requests) prompts run, B submitted at once. Every request is
greedy with ``max_tokens`` fixed and ``ignore_eos``, so base and speculative runs produce the
same number of tokens; each speculative run's token ids are checked against the base's, and a
difference fails the command (exit 1, "OUTPUT MISMATCH") after the table is printed. The base
engine and each speculative one (fixed k, ``adaptive: false``, and adaptive with the same
largest k) are loaded once and run in turn B requests at a time (the order rotating from one
group of B to the next), --repeat times; the table gives medians, the speedup being the median
of the paired ratios. The time split is the share of a speculative run's wall
time in the runner's proposer, forward (the verification forward) and sampling/verification
(``engine.runner.spec_timing``); the rest is the engine's own work (scheduling, input
preparation, output processing). Mean acceptance length is vLLM's: 1 + accepted / drafts.
``--profile [BATCH ...]`` adds, at those batch sizes (1 if none), where a step's time goes
phase by phase and cProfile's top functions, for the base engine and the fixed-k one.
"""

from __future__ import annotations

import argparse
import cProfile
import difflib
import io
import pstats
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from offline_throughput import PhaseTimer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGET = REPO_ROOT / "model_repository" / "llm" / "1" / "default_model"
DRAFT = REPO_ROOT / "model_repository" / "llm" / "1" / "draft_model"
EAGLE3_HEAD = REPO_ROOT / "model_repository" / "llm" / "1" / "eagle3_head"
EDIT_MARKER = "\n\n"  # between the code and its start again
# The targets: speedup at batch 1 per method; no method below this at batch 32.
TARGET_SPEEDUP = {"ngram": 2.0, "draft_model": 1.3}
LARGE_BATCH_FLOOR = 0.95


@dataclass(frozen=True)
class Workload:
    """Prompts (token ids) and, for code editing, the code each answer should repeat."""

    name: str
    prompts: list[list[int]]
    expected: list[list[int]] = field(default_factory=list)


def _code_start(lines: list[str]) -> int:
    for i, line in enumerate(lines):
        if line.startswith(("def ", "class ", "async def ")):
            return i
    return 0


def code_excerpts(tokenizer: Any, count: int, code_tokens: int) -> list[list[int]]:
    """``count`` excerpts (token ids, BOS first) of this repository's backend sources, in path
    order: whole lines from a file's first def/class, up to ``code_tokens`` tokens."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    excerpts = []
    for path in sorted((REPO_ROOT / "backend" / "pagedserve").rglob("*.py")):
        lines = path.read_text().splitlines(keepends=True)
        ids: list[int] = []
        for line in lines[_code_start(lines):]:
            line_ids = tokenizer(line, add_special_tokens=False).input_ids
            if len(ids) + len(line_ids) > code_tokens:
                break
            ids.extend(line_ids)
        if len(ids) < 0.8 * code_tokens:
            continue
        excerpts.append(bos + ids)
        if len(excerpts) == count:
            return excerpts
    raise SystemExit(f"the repository has {len(excerpts)} files for code-editing prompts, fewer "
                     f"than the {count} needed")


def code_editing_workload(
    tokenizer: Any, count: int, code_tokens: int,
    complete: Callable[[list[list[int]]], list[list[int]]],
) -> Workload:
    """Prompts that hold a piece of code and start it over: an excerpt E of a repository file,
    the code C that the target writes after it (``complete``: its greedy continuation), a blank
    line, then E again. The answer rewrites C, as an edit does for the lines it leaves alone;
    ``expected`` is C."""
    excerpts = code_excerpts(tokenizer, count, code_tokens)
    completions = complete(excerpts)
    marker = tokenizer(EDIT_MARKER, add_special_tokens=False).input_ids
    prompts = [e + c + marker + e[1:] for e, c in zip(excerpts, completions)]
    return Workload("code editing", prompts, completions)


def heldout_code_workload(tokenizer: Any, count: int, prompt_tokens: int) -> Workload:
    """``count`` prompts: the first ``prompt_tokens`` tokens (after BOS) of held-out files long
    enough, evenly spaced over the split in path order."""
    from pagedserve.devtools.distill_draft import heldout_prompts

    try:
        return Workload("held-out code", heldout_prompts(tokenizer, count, prompt_tokens))
    except ValueError as e:
        raise SystemExit(str(e)) from None


def repeat_fraction(output: list[int], expected: list[int]) -> float:
    """The share of ``output``'s tokens in blocks that match ``expected`` in order."""
    if not output:
        return 0.0
    matcher = difflib.SequenceMatcher(None, output, expected, autojunk=False)
    return sum(block.size for block in matcher.get_matching_blocks()) / len(output)


@dataclass
class RunFigures:
    """One timed run of a request list: tokens/s, its outputs, and what speculation did."""

    tokens_per_s: float
    token_ids: list[list[int]]
    seconds: float
    propose: float = 0.0
    forward: float = 0.0
    sample: float = 0.0
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted: int = 0

    @staticmethod
    def combine(parts: list[RunFigures]) -> RunFigures:
        """The figures of runs taken one after another, as one run."""
        seconds = sum(p.seconds for p in parts)
        tokens = sum(len(t) for p in parts for t in p.token_ids)
        return RunFigures(tokens / seconds, [t for p in parts for t in p.token_ids], seconds,
                          *(sum(getattr(p, name) for p in parts)
                            for name in ("propose", "forward", "sample", "num_drafts",
                                         "num_draft_tokens", "num_accepted")))


class Engine:
    """The target loaded once, with or without a speculative_config; runs request lists."""

    def __init__(self, label: str, speculative_config: Optional[dict[str, Any]],
                 max_num_seqs: int, max_tokens: int) -> None:
        from pagedserve import LLM, SamplingParams

        kwargs: dict[str, Any] = {"dtype": "float32", "max_num_seqs": max_num_seqs}
        if speculative_config is not None:
            kwargs["speculative_config"] = speculative_config
        self.label, self.config = label, speculative_config
        self.llm = LLM(str(TARGET), **kwargs)
        self.params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        self.max_tokens = max_tokens

    def _spec_counts(self) -> tuple[int, int, int]:
        stats = self.llm.engine.get_stats().spec_decoding
        if stats is None:
            return 0, 0, 0
        return stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens

    def run(self, prompts: list[list[int]], batch: int) -> RunFigures:
        """Generates for every prompt, ``batch`` submitted at once; timed over the whole."""
        self.llm.reset_prefix_cache()  # every run computes every prompt
        timing = self.llm.engine.runner.spec_timing
        before = (timing.propose, timing.forward, timing.sample, *self._spec_counts())
        token_ids: list[list[int]] = []
        start = time.perf_counter()
        for i in range(0, len(prompts), batch):
            group = [{"prompt_token_ids": p} for p in prompts[i:i + batch]]
            outputs = self.llm.generate(group, self.params, use_tqdm=False)
            token_ids.extend(list(o.outputs[0].token_ids) for o in outputs)
        seconds = time.perf_counter() - start
        after = (timing.propose, timing.forward, timing.sample, *self._spec_counts())
        delta = [a - b for a, b in zip(after, before)]
        produced = sum(map(len, token_ids))
        expected = len(prompts) * self.max_tokens
        assert produced == expected, f"{self.label}: {produced} tokens, expected {expected}"
        return RunFigures(produced / seconds, token_ids, seconds, *delta[:3],
                          *(int(d) for d in delta[3:]))


@dataclass
class Row:
    """A table row: one speculative engine against the base at one batch size."""

    method: str
    adaptive: bool
    batch: int
    k: int
    base: list[RunFigures] = field(default_factory=list)
    spec: list[RunFigures] = field(default_factory=list)
    mismatch: Optional[str] = None

    def cells(self) -> list[str]:
        base = statistics.median(r.tokens_per_s for r in self.base)
        spec = statistics.median(r.tokens_per_s for r in self.spec)
        ratio = statistics.median(s.tokens_per_s / b.tokens_per_s
                                  for s, b in zip(self.spec, self.base))
        drafts = sum(r.num_drafts for r in self.spec)
        accepted = sum(r.num_accepted for r in self.spec)
        draft_tokens = sum(r.num_draft_tokens for r in self.spec)
        seconds = sum(r.seconds for r in self.spec)
        split = [sum(getattr(r, phase) for r in self.spec) / seconds
                 for phase in ("propose", "forward", "sample")]
        split.append(1.0 - sum(split))
        mal = f"{1 + accepted / drafts:.2f}" if drafts else "-"
        per_draft = f"{draft_tokens / drafts:.2f}" if drafts else "0"
        verdict = "" if self.mismatch is None else " MISMATCH"
        return [self.method, "on" if self.adaptive else "off", str(self.batch), str(self.k),
                f"{base:.1f}", f"{spec:.1f}", f"{ratio:.2f}x{verdict}", mal, per_draft,
                " / ".join(f"{s:.2f}" for s in split)]

    @property
    def speedup(self) -> float:
        return statistics.median(s.tokens_per_s / b.tokens_per_s
                                 for s, b in zip(self.spec, self.base))


HEADER = ["method", "adaptive", "batch", "k", "tok/s base", "tok/s spec", "speedup",
          "mean acceptance length", "drafts per drafted step",
          "time split propose / forward (verify) / sample / engine"]


def print_table(rows: list[Row]) -> None:
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "|".join([" --- "] * 4 + [" ---: "] * (len(HEADER) - 4)) + "|")
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")


def first_difference(base: list[list[int]], spec: list[list[int]]) -> Optional[str]:
    for i, (b, s) in enumerate(zip(base, spec)):
        if b != s:
            at = next((j for j, (x, y) in enumerate(zip(b, s)) if x != y), min(len(b), len(s)))
            return f"request {i}: first difference at token {at} ({b[at:at + 4]} vs {s[at:at + 4]})"
    return None


def speculative_configs(method: str, k: int, ngram_lookup: tuple[int, int]
                        ) -> list[tuple[bool, dict[str, Any]]]:
    config: dict[str, Any] = {"method": method, "num_speculative_tokens": k}
    if method == "ngram":
        config["prompt_lookup_min"], config["prompt_lookup_max"] = ngram_lookup
    else:
        config["model"] = str(EAGLE3_HEAD if method == "eagle3" else DRAFT)
    return [(False, {**config, "adaptive": False}), (True, {**config, "adaptive": True})]


def load_speculative(method: str, configs: list[tuple[bool, dict[str, Any]]], max_num_seqs: int,
                     max_tokens: int, probe: list[int]) -> tuple[list[Engine], Optional[str]]:
    """The method's engines, or why the method is unavailable: the engine refused its config,
    or accepted it and drafted nothing on a probe request."""
    engines = []
    for adaptive, config in configs:
        try:
            engine = Engine(f"{method}, adaptive {adaptive}", config, max_num_seqs, max_tokens)
        except (ValueError, NotImplementedError) as e:
            return [], f"{type(e).__name__}: {e}"
        figures = engine.run([probe], 1)  # also the warm-up
        if not adaptive and figures.num_drafts == 0:
            return [], "the engine accepts the config but drafted nothing"
        engines.append(engine)
    return engines, None


def measure(workload: Workload, base: Engine, engines: list[Engine], method: str, k: int,
            batches: list[int], min_requests: int, repeat: int) -> list[Row]:
    rows = []
    everyone = [base, *engines]
    for batch in batches:
        prompts = workload.prompts[:max(batch, min_requests)]
        groups = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
        batch_rows = [Row(method, e.config["adaptive"], batch, k) for e in engines]
        for rep in range(repeat):
            # Interleaved group by group (B requests at a time), the order rotating, so that
            # every engine sees the same (noisy) machine: on a 2-vCPU VM whose speed drifted by
            # 30% within seconds, whole runs in turn gave one engine's five paired ratios from
            # 0.79 to 1.26.
            parts: list[list[RunFigures]] = [[] for _ in everyone]
            for g, group in enumerate(groups):
                first = (rep + g) % len(everyone)
                for i in list(range(first, len(everyone))) + list(range(first)):
                    parts[i].append(everyone[i].run(group, batch))
            base_run, *spec_runs = (RunFigures.combine(p) for p in parts)
            for row, engine, spec_run in zip(batch_rows, engines, spec_runs):
                row.base.append(base_run)
                row.spec.append(spec_run)
                if row.mismatch is None:
                    row.mismatch = first_difference(base_run.token_ids, spec_run.token_ids)
                print(f"  {workload.name}, batch {batch}, run {rep + 1}: {engine.label}: "
                      f"{spec_run.tokens_per_s:.1f} tok/s vs base {base_run.tokens_per_s:.1f}",
                      flush=True)
        rows.extend(batch_rows)
    return rows


def profile_step(base: Engine, engine: Engine, prompts: list[list[int]], batch: int) -> None:
    """At one batch size: milliseconds per engine step by phase, then cProfile's top
    functions."""
    for eng in (base, engine):
        llm = eng.llm
        timer = PhaseTimer()
        core = llm.engine
        timer.wrap(core, "step", "step")
        timer.wrap(core.scheduler, "schedule", "schedule")
        timer.wrap(core.runner, "_prepare_inputs", "prepare inputs")
        timer.wrap(core.runner, "_forward_logits", "forward + logits")
        timer.wrap(core.runner, "_verify", "verify (rejection sampler)")
        timer.wrap(core.runner, "sampler", "sample")
        timer.wrap(core.runner, "_propose", "propose")
        timer.wrap(core.runner, "collect", "collect (+ propose)")
        timer.wrap(core.scheduler, "update_from_output", "scheduler update")
        timer.wrap(core.output_processor, "process", "output processing")
        profiler = cProfile.Profile()
        profiler.enable()
        figures = eng.run(prompts, batch)
        profiler.disable()
        steps = timer.counts["step"]
        tokens = sum(map(len, figures.token_ids))
        print(f"\n{eng.label} at batch {batch}: {steps} steps for {tokens} tokens "
              f"({tokens / steps:.2f} per step), {1e3 * figures.seconds / steps:.2f} ms per step "
              f"(with the profiler on)")
        for phase, total in timer.totals.items():
            print(f"  {phase:28s} {1e3 * total / steps:7.3f} ms/step "
                  f"({timer.counts[phase] / steps:.2f} calls/step)")
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
        print("\n".join(line for line in text.getvalue().splitlines()[4:] if line.strip()))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=["ngram", "draft_model", "eagle3"],
                        default=["ngram", "draft_model", "eagle3"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 32])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--min-requests", type=int, default=4,
                        help="requests per run at the small batches (run B at a time)")
    parser.add_argument("--ngram-k", type=int, default=8)
    parser.add_argument("--ngram-lookup", nargs=2, type=int, default=[2, 5],
                        metavar=("MIN", "MAX"))
    parser.add_argument("--draft-k", type=int, default=3)
    parser.add_argument("--eagle3-k", type=int, default=3)
    parser.add_argument("--code-tokens", type=int, default=150,
                        help="tokens of code in a code-editing prompt")
    parser.add_argument("--prompt-tokens", type=int, default=128,
                        help="tokens of a held-out file in a draft-model prompt")
    parser.add_argument("--profile", nargs="*", type=int, default=None, metavar="BATCH",
                        help="profile a step at these batch sizes (1 if none is given)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); 1 on a shared machine")
    parser.add_argument("--smoke", action="store_true",
                        help="batches 1 and 2, 8 tokens, one run, one thread: checks it all works")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batches, args.repeat, args.max_tokens, args.min_requests = [1, 2], 1, 8, 2
        args.code_tokens, args.prompt_tokens = 60, 32
        args.threads = args.threads or 1  # steady on a shared machine

    import torch

    from pagedserve.tokenizer.tokenizer import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(str(TARGET))
    count = max(max(args.batches), args.min_requests)
    max_num_seqs = max(args.batches)
    print(f"target {TARGET.name}, draft {DRAFT.name}, EAGLE-3 head {EAGLE3_HEAD.name}; "
          "float32 on the CPU; greedy, "
          f"{args.max_tokens} tokens per request (ignore_eos); median of {args.repeat}; "
          f"{torch.get_num_threads()} torch thread(s)",
          flush=True)
    base = Engine("base", None, max_num_seqs, args.max_tokens)
    rows: list[Row] = []
    notes: list[str] = []
    for method in args.methods:
        if method == "ngram":
            workload = code_editing_workload(
                tokenizer, count, args.code_tokens,
                lambda prompts: base.run(prompts, len(prompts)).token_ids)
            k = args.ngram_k
        else:
            workload = heldout_code_workload(tokenizer, count, args.prompt_tokens)
            k = args.eagle3_k if method == "eagle3" else args.draft_k
        configs = speculative_configs(method, k, tuple(args.ngram_lookup))
        engines, unavailable = load_speculative(method, configs, max_num_seqs, args.max_tokens,
                                                workload.prompts[0])
        if unavailable is not None:
            notes.append(f"{method}: unavailable ({unavailable})")
            print(notes[-1], flush=True)
            continue
        base.run(workload.prompts[:1], 1)  # warm-up
        lengths = sorted(map(len, workload.prompts))
        print(f"{method} on {workload.name}: {len(workload.prompts)} prompts of "
              f"{lengths[0]}-{lengths[-1]} tokens, k {k}", flush=True)
        method_rows = measure(workload, base, engines, method, k, args.batches,
                              args.min_requests, args.repeat)
        rows.extend(method_rows)
        if workload.expected:
            outputs = method_rows[-1].base[0].token_ids  # the base run with the most requests
            shares = [repeat_fraction(o, e) for o, e in zip(outputs, workload.expected)]
            per_request = ", ".join(f"{s:.2f}" for s in shares[:8])
            notes.append(f"{method}: the base's greedy answers repeat the code: "
                         f"{statistics.mean(shares):.2f} of their tokens on average over "
                         f"{len(shares)} requests (min {min(shares):.2f}, max {max(shares):.2f}; "
                         f"the first ones {per_request})")
        for batch in (args.profile or [1]) if args.profile is not None else []:
            profile_step(base, engines[0], workload.prompts[:max(batch, args.min_requests)],
                         batch)
    print()
    print_table(rows)
    print()
    for note in notes:
        print(f"- {note}")
    for row in rows:
        target = TARGET_SPEEDUP.get(row.method) if row.batch == 1 else None
        if row.batch == max(args.batches) and row.batch >= 32:
            target = LARGE_BATCH_FLOOR
        if target is not None:
            verdict = "met" if row.speedup >= target else "MISSED"
            print(f"- target {row.method} (adaptive {'on' if row.adaptive else 'off'}) at batch "
                  f"{row.batch}: >= {target}x: {verdict} ({row.speedup:.2f}x)")
    mismatches = [row for row in rows if row.mismatch is not None]
    for row in mismatches:
        print(f"OUTPUT MISMATCH: {row.method}, adaptive {row.adaptive}, batch {row.batch}: "
              f"{row.mismatch}")
    if rows and not mismatches:
        print("greedy outputs with speculation equal those without in every run")
    return 1 if mismatches or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
