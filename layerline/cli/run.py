"""`layerline run`: answer one prompt from a package in this process."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .options import (
    DEFAULT_WINDOW,
    InitialWindowOpt,
    MaxWindowOpt,
    MinWindowOpt,
    PackageArg,
    QuietOpt,
    WeightsChoice,
    WeightsOpt,
    WindowPolicyChoice,
    WindowPolicyOpt,
)
from .output import err, log_to_stderr


def run(
    package: PackageArg,
    prompt: Annotated[str | None, typer.Option(help="Plain text to continue.")] = None,
    chat: Annotated[str | None, typer.Option(help="A user message, in the model's chat format.")] = None,
    system: Annotated[str | None, typer.Option(help="A system message before --chat.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass, (0, 1].")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Keep the k likeliest tokens; 0 is off.")] = 0,
    min_p: Annotated[float, typer.Option(help="Drop tokens below min-p x the likeliest's probability.")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option(help="Penalty on recent tokens; 1 is off.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop before this text (repeat for several).")] = None,
    weights: WeightsOpt = WeightsChoice.auto,
    split: Annotated[str | None, typer.Option(help="Layer ranges run in turn, e.g. 0:12,12:30.")] = None,
    draft: Annotated[str | None, typer.Option(help="Speculate with this draft: a package, GGUF, model folder or Hub repo of the same tokenizer, or `ngram`.")] = None,
    window_policy: WindowPolicyOpt = WindowPolicyChoice(DEFAULT_WINDOW.policy),
    initial_window: InitialWindowOpt = DEFAULT_WINDOW.initial,
    min_window: MinWindowOpt = DEFAULT_WINDOW.min,
    max_window: MaxWindowOpt = DEFAULT_WINDOW.max,
    tree: Annotated[str | None, typer.Option(help="Verify a tree of drafts per pass, not a chain: DEPTH,WIDTH[,NODES], e.g. 4,2 (needs --draft).")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Answer a prompt from a layer package, streaming tokens; end with prefill and decode tok/s."""
    from layerline.packager.window_spec import WindowSpec
    from layerline.runtime.decode.draft_tree import TreeShape
    from layerline.runtime.decode.run_prompt import RunRequest, start_run
    from layerline.runtime.decode.sampling import SamplingParams

    log_to_stderr(quiet)
    sampling = SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop or ()),
    )
    window = WindowSpec(window_policy.value, initial_window, min_window, max_window).validate()
    run = start_run(RunRequest(package=package, prompt=prompt, chat=chat, system=system, sampling=sampling,
                               weights=weights.value, split=split, draft=draft, window=window,
                               tree=TreeShape.parse(tree) if tree is not None else None))
    for event in run.events():
        sys.stdout.write(event.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    err.print(run.generation.stats.describe(), highlight=False)
