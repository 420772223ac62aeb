"""The decode loop in one process, decoding plainly: real answers, seeds, stops, logprobs,
context limits, splits, text streaming."""

from __future__ import annotations

import math
from dataclasses import replace

import mlx.core as mx
import pytest

from layerline.errors import ChatTemplateError, ContextLengthError
from layerline.runtime.decode.local_pipeline import LocalPipeline
from layerline.runtime.decode.loop import generate
from layerline.runtime.decode.sampling import SamplingParams
from layerline.runtime.decode.targets import LocalTarget
from layerline.runtime.decode.text import text_events
from layerline.runtime.model.chat import chat_prompt_tokens, render_chat, text_prompt_tokens, user_messages
from layerline.runtime.model.tokenizer import TextStream

CAPITAL = "What is the capital of France?"


def answer(pipeline: LocalPipeline, prompt: list[int], **sampling) -> tuple[str, object]:
    params = SamplingParams(**{"stop_token_ids": pipeline.eos_token_ids, **sampling})
    generation = generate(LocalTarget.open(pipeline), prompt, params, context_length=pipeline.context_length)
    text = "".join(e.text for e in text_events(generation, pipeline.tokenizer, end_ids=params.stop_token_ids))
    return text, generation


def chat(pipeline: LocalPipeline, text: str) -> list[int]:
    return chat_prompt_tokens(pipeline.tokenizer, pipeline.package.manifest, user_messages(text))


def test_smollm2_greedy_chat_answers_paris(smollm2):
    text, generation = answer(smollm2, chat(smollm2, CAPITAL), max_tokens=40)
    assert "Paris" in text
    assert generation.stats.finish_reason == "stop"
    assert generation.stats.prefill_tps > 0 and generation.stats.decode_tps > 0


@pytest.mark.slow
def test_smollm2_exact_package_answers_paris_packed_and_expanded(smollm2_exact_package):
    texts = set()
    for weights in ("packed", "auto"):
        pipeline = LocalPipeline.load(smollm2_exact_package, weights=weights)
        texts.add(answer(pipeline, chat(pipeline, CAPITAL), max_tokens=12)[0])
    assert texts == {"The capital of France is Paris."}


def test_split_ranges_answer_exactly_like_one_range(smollm2, smollm2_package):
    split = LocalPipeline.load(smollm2_package, "0:1,1:17,17:30")
    prompt = chat(smollm2, CAPITAL)
    assert answer(split, prompt, max_tokens=30)[0] == answer(smollm2, prompt, max_tokens=30)[0]


@pytest.mark.slow
def test_qwen05_writes_a_python_function_when_asked(qwen05_package):
    qwen = LocalPipeline.load(qwen05_package)
    prompt = chat(qwen, "Write a Python function is_prime(n) that says whether n is prime.")
    text, _ = answer(qwen, prompt, max_tokens=60)
    assert "def is_prime(" in text


def test_same_seed_gives_the_same_text_and_other_seeds_differ(smollm2):
    prompt = text_prompt_tokens(smollm2.tokenizer, "Once upon a time")
    first = answer(smollm2, prompt, max_tokens=24, temperature=1.0, seed=11)[0]
    assert answer(smollm2, prompt, max_tokens=24, temperature=1.0, seed=11)[0] == first
    others = {answer(smollm2, prompt, max_tokens=24, temperature=1.0, seed=s)[0] for s in (12, 13)}
    assert first not in others


def test_stop_string_ends_the_text_before_it(smollm2):
    text, generation = answer(smollm2, chat(smollm2, CAPITAL), max_tokens=40, stop=(" Paris",))
    assert text == "The capital of France is"
    assert generation.stats.finish_reason == "stop"


def test_text_held_back_for_a_stop_string_is_released_when_generation_ends(smollm2):
    prompt = chat(smollm2, CAPITAL)
    plain, _ = answer(smollm2, prompt, max_tokens=40)
    held, generation = answer(smollm2, prompt, max_tokens=40, stop=(plain[-1] + "\n\nNever",))
    assert held == plain and generation.stats.finish_reason == "stop"


def test_stop_token_ends_generation(smollm2):
    prompt = chat(smollm2, CAPITAL)
    free, _ = answer(smollm2, prompt, max_tokens=8, stop_token_ids=())
    first_word = smollm2.tokenizer.encode(free.split()[0], add_special_tokens=False)[0]
    text, generation = answer(smollm2, prompt, max_tokens=8, stop_token_ids=(first_word,))
    assert text == "" and generation.stats.finish_reason == "stop"


def test_max_tokens_ends_generation_with_length(smollm2):
    _, generation = answer(smollm2, chat(smollm2, CAPITAL), max_tokens=3)
    assert generation.stats.tokens == 3 and generation.stats.finish_reason == "length"


def test_logprobs_come_with_each_token_when_asked(smollm2):
    params = SamplingParams(max_tokens=5, logprobs=True, top_logprobs=3)
    tokens = list(generate(LocalTarget.open(smollm2), chat(smollm2, CAPITAL), params))
    for token in tokens:
        assert token.logprob is not None and token.logprob <= 0
        assert len(token.top_logprobs) == 3
        best_id, best = token.top_logprobs[0]
        assert best_id == token.id and math.isclose(best, token.logprob, abs_tol=1e-5)  # greedy
        assert [lp for _, lp in token.top_logprobs] == sorted((lp for _, lp in token.top_logprobs),
                                                              reverse=True)


def test_cache_holds_prompt_and_all_but_the_last_token_after_generation(smollm2):
    target = LocalTarget.open(smollm2)
    prompt = chat(smollm2, CAPITAL)
    list(generate(target, prompt, SamplingParams(max_tokens=6)))  # the loop queued a 7th step ahead
    assert all(c.length == len(prompt) + 6 - 1 for c in target.caches)


def test_a_pass_gives_the_logits_of_the_rows_it_is_asked_for_only(smollm2):
    prompt = chat(smollm2, CAPITAL)
    target = LocalTarget.open(smollm2)
    every_row = target.forward(prompt, 0)
    last_rows = target.submit(prompt, 0, logits_from=len(prompt) - 2).result()  # the head on 2 rows
    assert last_rows.shape == (2, every_row.shape[1])
    assert mx.allclose(last_rows, every_row[-2:], atol=1e-4)
    assert all(c.length == len(prompt) for c in target.caches)


def test_prompt_longer_than_the_context_is_refused(smollm2):
    too_long = [1] * smollm2.context_length
    with pytest.raises(ContextLengthError, match=f"context length is {smollm2.context_length}"):
        generate(LocalTarget.open(smollm2), too_long, SamplingParams(), context_length=smollm2.context_length)


def test_generation_stops_at_the_context_length(tiny_llama_package):
    tiny = LocalPipeline.load(tiny_llama_package)
    prompt = [5] * (tiny.context_length - 4)
    generation = generate(LocalTarget.open(tiny), prompt, SamplingParams(max_tokens=50),
                          context_length=tiny.context_length)
    list(generation)
    assert generation.stats.tokens == 5 and generation.stats.finish_reason == "length"


def test_chat_template_renders_the_packages_format(smollm2):
    text = render_chat(smollm2.tokenizer, smollm2.package.manifest, user_messages(CAPITAL, "Be brief."))
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\n{CAPITAL}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_package_without_chat_template_refuses_chat(smollm2):
    manifest = smollm2.package.manifest
    bare = replace(manifest, tokenizer=replace(manifest.tokenizer, chat_template=None))

    class NoTemplate:
        chat_template = None

    with pytest.raises(ChatTemplateError, match="has no chat template"):
        render_chat(NoTemplate(), bare, user_messages(CAPITAL))


def test_text_stream_holds_back_a_possible_stop_string_across_tokens(smollm2):
    tok = smollm2.tokenizer
    ids = tok.encode("The answer is Paris, of course.", add_special_tokens=False)
    stream = TextStream(tok, stop=("Paris, of",))
    shown = "".join(stream.add(i) for i in ids) + stream.finish()
    assert shown == "The answer is " and stream.stopped


def test_text_stream_keeps_multibyte_characters_whole(smollm2):
    tok = smollm2.tokenizer
    text = "naïve café 東京 🙂 done"
    stream = TextStream(tok)
    pieces = [stream.add(i) for i in tok.encode(text, add_special_tokens=False)]
    assert "".join(pieces) + stream.finish() == text
    assert not any("\ufffd" in p for p in pieces)
