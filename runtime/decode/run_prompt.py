"""`layerline run`: one prompt answered by a package in one process, as text deltas, with or
without a draft (a draft model, or `ngram` prompt lookup), verifying chains or token trees."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from layerline.errors import LayerlineError
from layerline.packager.speculative import NGRAM
from layerline.packager.window_spec import WindowSpec

from ..model.chat import chat_prompt_tokens, text_prompt_tokens, user_messages
from .draft_model import load_draft
from .draft_tree import TreeShape
from .drafters import Drafter, ModelDrafter, NgramDrafter, NoDrafter
from .local_pipeline import LocalPipeline
from .loop import Generation, generate
from .sampling import SamplingParams
from .targets import LocalTarget
from .text import TextEvent, text_events
from .window_policy import policy_for

DRAFT_CACHE = Path("~/.cache/layerline/drafts")  # packages built from GGUF or Hub drafts


@dataclass(frozen=True)
class RunRequest:
    package: Path
    prompt: str | None = None  # plain text, tokenized as is
    chat: str | None = None  # a user message, rendered with the package's chat template
    system: str | None = None  # a system message before `chat`
    sampling: SamplingParams = SamplingParams()
    weights: str = "auto"
    split: str | None = None  # "0:12,12:30": ranges run one after another
    draft: str | None = None  # a draft model reference, or "ngram"; None decodes plainly
    window: WindowSpec = field(default_factory=WindowSpec)  # the draft window, with a draft
    tree: TreeShape | None = None  # verify drafted trees of this shape, not chains (needs a draft)


@dataclass
class Run:
    """A loaded run: iterate `events()` for the text, then read `generation.stats`."""

    generation: Generation
    tokenizer: object
    end_ids: tuple[int, ...]

    def events(self) -> Iterator[TextEvent]:
        return text_events(self.generation, self.tokenizer, end_ids=self.end_ids)


def start_run(request: RunRequest) -> Run:
    """Load the package (split as asked) and its draft, and make the generation for the prompt."""
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
    if request.tree is not None and request.draft is None:
        raise LayerlineError("--tree shapes the drafts: it needs a draft",
                             hint="add --draft ngram or --draft with a draft model")
    drafter: Drafter = NoDrafter()
    policy = policy_for(request.window if request.draft is not None else None)
    if request.draft is not None:
        if request.draft == NGRAM:
            drafter = NgramDrafter()
        else:
            draft, _ = load_draft(request.draft, manifest.tokenizer.fingerprint,
                                  DRAFT_CACHE.expanduser(), request.weights)
            drafter = ModelDrafter(draft, sampling, context_length=pipeline.context_length)
    generation = generate(LocalTarget.open(pipeline), prompt, sampling, drafter=drafter, policy=policy,
                          context_length=pipeline.context_length, tree=request.tree)
    return Run(generation, tokenizer, pipeline.eos_token_ids)
