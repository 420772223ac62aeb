"""`layerline run`: one prompt answered by a package in one process, as a token stream."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from layerline.errors import LayerlineError

from ..model.chat import chat_prompt_tokens, text_prompt_tokens, user_messages
from .generate import Generation, generate
from .local_pipeline import LocalPipeline
from .sampling import SamplingParams


@dataclass(frozen=True)
class RunRequest:
    package: Path
    prompt: str | None = None  # plain text, tokenized as is
    chat: str | None = None  # a user message, rendered with the package's chat template
    system: str | None = None  # a system message before `chat`
    sampling: SamplingParams = SamplingParams()
    weights: str = "auto"
    split: str | None = None  # "0:12,12:30": ranges run one after another


def start_run(request: RunRequest) -> Generation:
    """Load the package (split as asked) and return the generation for the prompt or chat."""
    if (request.prompt is None) == (request.chat is None):
        raise LayerlineError("give exactly one of --prompt and --chat",
                             hint='e.g. --chat "What is the capital of France?"')
    if request.system is not None and request.chat is None:
        raise LayerlineError("--system goes with --chat", hint="use --chat for the user's message")
    pipeline = LocalPipeline.load(request.package, request.split, request.weights)
    tokenizer, manifest = pipeline.tokenizer, pipeline.package.manifest
    if request.chat is not None:
        prompt = chat_prompt_tokens(tokenizer, manifest, user_messages(request.chat, request.system))
    else:
        prompt = text_prompt_tokens(tokenizer, request.prompt or "")
    sampling = request.sampling
    if not sampling.stop_token_ids:
        sampling = replace(sampling, stop_token_ids=pipeline.eos_token_ids)
    return generate(pipeline, pipeline.make_cache(), prompt, sampling, tokenizer=tokenizer,
                    context_length=pipeline.context_length)
