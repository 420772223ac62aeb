"""Calibrating a package's drafters: how well each predicts the target, measured teacher-forced.

On layerline's fixed prompts (a few each of code, prose and chat) the target writes its greedy
continuation; then one pass of the target and one of the draft model over prompt and
continuation give, at every position, the target's token and its rank among the draft's
candidates (rank 1 = the draft's argmax). A greedy draft's chain from a position is accepted
as far as its rank-1 hits run on, so the runs give acceptance by depth. The n-gram drafter has
no candidates to rank: its actual proposal from each position is compared instead.

`calibrate_package` measures a package's strategies and stores each result in its strategy
block of model-package.json (`packager.speculative.store_calibrations`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from layerline.errors import LayerlineError
from layerline.packager.manifest import Calibration, Manifest, Strategy, read_manifest
from layerline.packager.speculative import store_calibrations
from layerline.progress import step_progress

from ..model.chat import chat_prompt_tokens, text_prompt_tokens, user_messages
from .calibration_prompts import CALIBRATION_PROMPTS, DEFAULT_MAX_TOKENS
from .draft_model import resolve_draft
from .drafters import NgramDrafter, common_prefix
from .local_pipeline import LocalPipeline
from .targets import PREFILL_STEP

log = logging.getLogger("layerline.calibration")

MAX_RANK = 4  # acceptance by rank is measured for ranks 1..MAX_RANK
MAX_DEPTH = 8  # and by depth for depths 1..MAX_DEPTH
FIGURE_DIGITS = 4  # probabilities are stored rounded to this many decimals


@dataclass(frozen=True)
class TargetRun:
    """One prompt, the target's greedy continuation, and the target's token at each position."""

    prompt_set: str
    prompt: list[int]
    continuation: list[int]
    target_tokens: list[int]  # the argmax of the target's teacher-forced pass, per continuation position


@dataclass(frozen=True)
class DraftMeasure:
    """A drafter against one TargetRun, per continuation position."""

    ranks: list[int]  # the rank of the target's token among the drafter's candidates; 0 past MAX_RANK
    chains: list[int]  # how deep a chain drafted from here is accepted (at most MAX_DEPTH)


def calibration_prompts(tokenizer: Any, manifest: Manifest) -> list[tuple[str, list[int]]]:
    """(prompt set, token ids) of every shipped prompt; chat only where the package has a template."""
    prompts = []
    for prompt_set, texts in CALIBRATION_PROMPTS.items():
        if prompt_set == "chat" and manifest.tokenizer.chat_template is None:
            log.info("event=calibration_skips_chat reason=no_chat_template")
            continue
        for text in texts:
            tokens = (chat_prompt_tokens(tokenizer, manifest, user_messages(text)) if prompt_set == "chat"
                      else text_prompt_tokens(tokenizer, text))
            prompts.append((prompt_set, tokens))
    return prompts


def greedy_continuation(model: LocalPipeline, prompt: list[int], max_tokens: int,
                        end_ids: Sequence[int]) -> list[int]:
    """Up to `max_tokens` tokens the model picks greedily after `prompt` (an end token ends them)."""
    caches = model.make_cache()
    logits = _feed(model, prompt, caches, keep_from=len(prompt) - 1)
    continuation: list[int] = []
    while len(continuation) < max_tokens:
        token = int(mx.argmax(logits, axis=-1).item())
        continuation.append(token)
        if token in end_ids:
            break
        logits = model(mx.array([[token]], dtype=mx.uint32), caches)[0]
    return continuation


def teacher_forced_logits(model: LocalPipeline, prompt: list[int], continuation: list[int]) -> mx.array:
    """Float32 logits (len(continuation), vocab): row i is the model's prediction of continuation[i]."""
    sequence = prompt + continuation[:-1]
    return _feed(model, sequence, model.make_cache(), keep_from=len(prompt) - 1).astype(mx.float32)


def _feed(model: LocalPipeline, tokens: list[int], caches: list, keep_from: int = 0) -> mx.array:
    """Feed `tokens` in chunks; the logits (rows, vocab) of positions keep_from.. onwards."""
    vocab = model.head.vocab_size
    # An id past the model's vocabulary (a draft's may be smaller) cannot be embedded: feed 0.
    tokens = [t if t < vocab else 0 for t in tokens]
    kept = []
    for start in range(0, len(tokens), PREFILL_STEP):
        chunk = tokens[start:start + PREFILL_STEP]
        logits = model(mx.array([chunk], dtype=mx.uint32), caches)[0]
        if start + len(chunk) > keep_from:
            kept.append(logits[max(keep_from - start, 0):])
        mx.eval(kept, [c.state for rc in caches for c in rc.caches])
    return mx.concatenate(kept)


def run_target(pipeline: LocalPipeline, prompts: list[tuple[str, list[int]]], max_tokens: int,
               advance: Callable[..., None]) -> list[TargetRun]:
    """The target's continuation of every prompt, and its teacher-forced token at each position."""
    runs = []
    for prompt_set, prompt in prompts:
        room = max_tokens if pipeline.context_length is None else pipeline.context_length - len(prompt)
        continuation = greedy_continuation(pipeline, prompt, min(max_tokens, room), pipeline.eos_token_ids)
        if continuation:
            logits = teacher_forced_logits(pipeline, prompt, continuation)
            runs.append(TargetRun(prompt_set, prompt, continuation, mx.argmax(logits, axis=-1).tolist()))
        advance()
    return runs


def ranks_of(logits: mx.array, tokens: list[int]) -> list[int]:
    """The rank of each row's token among that row's logits, ties broken as argmax breaks them
    (the lower id first); 0 for a rank past MAX_RANK or an id past the vocabulary."""
    rows, vocab = logits.shape
    ids = mx.array([min(t, vocab - 1) for t in tokens])[:, None]
    own = mx.take_along_axis(logits, ids, axis=-1)
    above = (logits > own).sum(axis=-1)
    tied_before = ((logits == own) & (mx.arange(vocab)[None, :] < ids)).sum(axis=-1)
    ranks = (1 + above + tied_before).tolist()
    return [r if t < vocab and r <= MAX_RANK else 0 for r, t in zip(ranks, tokens, strict=True)]


def chains_of(hits: list[bool]) -> list[int]:
    """At each position, how many hits run on from it (at most MAX_DEPTH)."""
    chains = [0] * len(hits)
    run = 0
    for i in range(len(hits) - 1, -1, -1):
        run = run + 1 if hits[i] else 0
        chains[i] = min(run, MAX_DEPTH)
    return chains


def measure_draft_model(draft: LocalPipeline, run: TargetRun) -> DraftMeasure:
    """The draft's rank of the target's token at each position (one pass), and its greedy chains."""
    room = len(run.continuation) if draft.context_length is None else draft.context_length - len(run.prompt)
    positions = max(0, min(len(run.continuation), room))
    if positions == 0:
        return DraftMeasure([], [])
    logits = teacher_forced_logits(draft, run.prompt, run.continuation[:positions])
    ranks = ranks_of(logits, run.target_tokens[:positions])
    return DraftMeasure(ranks, chains_of([r == 1 for r in ranks]))


def measure_ngram(run: TargetRun) -> DraftMeasure:
    """The n-gram drafter's proposal from each position, against the target's tokens from there."""
    drafter = NgramDrafter()
    ranks, chains = [], []
    for i in range(len(run.continuation)):
        proposal, _ = drafter.propose(run.prompt + run.continuation[:i], MAX_DEPTH)
        accepted = common_prefix(proposal, run.target_tokens[i:i + MAX_DEPTH])
        ranks.append(1 if accepted else 0)  # a proposal is one candidate: rank 1 or none
        chains.append(accepted)
    return DraftMeasure(ranks, chains)


def summarize(runs: list[TargetRun], measures: list[DraftMeasure], max_tokens: int) -> Calibration:
    """Acceptance by rank and by depth over every measured position."""
    ranks = [r for m in measures for r in m.ranks]
    positions = len(ranks)
    by_rank = [sum(r == rank for r in ranks) / positions if positions else 0.0
               for rank in range(1, MAX_RANK + 1)]
    top_r = [sum(by_rank[:rank]) for rank in range(1, MAX_RANK + 1)]
    by_depth = []
    for depth in range(1, MAX_DEPTH + 1):
        # Chains from positions where depth `depth` is still inside the continuation.
        reached = accepted = 0
        for m in measures:
            starts = m.chains[:max(0, len(m.chains) - depth + 1)]
            reached += sum(c >= depth - 1 for c in starts)
            accepted += sum(c >= depth for c in starts)
        by_depth.append(accepted / reached if reached else 0.0)  # never reached: assume nothing
    sets = tuple(dict.fromkeys(run.prompt_set for run in runs))
    return Calibration(prompt_sets=sets, prompts=len(runs), positions=positions, max_tokens=max_tokens,
                       acceptance_by_rank=_rounded(by_rank), acceptance_top_r=_rounded(top_r),
                       acceptance_by_depth=_rounded(by_depth))


def _rounded(figures: list[float]) -> tuple[float, ...]:
    return tuple(round(f, FIGURE_DIGITS) for f in figures)


def calibrate_package(root: Path | str, *, strategies: Sequence[str] | None = None,
                      max_tokens: int = DEFAULT_MAX_TOKENS, cache_dir: Path, weights: str = "auto",
                      quiet: bool = False) -> dict[str, Calibration]:
    """Measure the package's strategies (default: all), store each in its block, return them.

    A draft model resolves as stage 0 resolves it from `cache_dir`, but nothing is fetched.
    """
    if max_tokens < 1:
        raise LayerlineError(f"--max-tokens must be at least 1, got {max_tokens}")
    root = Path(root)
    manifest = read_manifest(root)
    chosen = _chosen_strategies(root, manifest, strategies)
    # Every draft is found (and its tokenizer checked) before the long work starts.
    drafts = {name: resolve_draft(s.draft_model, manifest.tokenizer.fingerprint, cache_dir, fetch=False)[0]
              for name, s in chosen.items() if s.draft_model is not None}
    pipeline = LocalPipeline.load(root, weights=weights)
    prompts = calibration_prompts(pipeline.tokenizer, manifest)
    with step_progress("continuing the calibration prompts with the target", len(prompts),
                       quiet=quiet) as advance:
        runs = run_target(pipeline, prompts, max_tokens, advance)
    del pipeline  # the drafts are measured without the target in memory
    mx.clear_cache()

    results = {}
    for name in chosen:
        draft = LocalPipeline.load(drafts[name], weights=weights, tokenizer=False) if name in drafts else None
        with step_progress(f"calibrating strategy {name}", len(runs), quiet=quiet) as advance:
            measures = []
            for run in runs:
                measures.append(measure_ngram(run) if draft is None else measure_draft_model(draft, run))
                advance()
        del draft
        mx.clear_cache()
        results[name] = summarize(runs, measures, max_tokens)
        log.info("event=calibrated strategy=%s positions=%d rank1=%.3f", name, results[name].positions,
                 results[name].acceptance_by_rank[0])
    store_calibrations(root, results)
    return results


def _chosen_strategies(root: Path, manifest: Manifest, names: Sequence[str] | None) -> dict[str, Strategy]:
    spec = manifest.speculative_decoding
    if spec is None or not spec.strategies:
        raise LayerlineError(f"package {root} declares no speculative-decoding strategy to calibrate",
                             hint="build it with `layerline pkg build … --draft-model DRAFT --calibrate`")
    unknown = [n for n in names or [] if n not in spec.strategies]
    if unknown:
        raise LayerlineError(f"package {root} declares no strategy {', '.join(map(repr, unknown))} "
                             f"(it has: {', '.join(spec.strategies)})",
                             hint="choose one of its strategies with --strategy")
    return {n: spec.strategies[n] for n in names} if names else dict(spec.strategies)
