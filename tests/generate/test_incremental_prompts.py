"""IncrementalPromptEngine: each step encodes only its new turn, every prompt starts with the exact ids of the
previous prompt + what was generated (prefix-cache hits), and the ids equal a full re-render wherever the
model's tokens are the canonical ones; anything that is not an extension falls back to a full encode."""

from __future__ import annotations

import asyncio

import pytest

from raydistill.actors.teacher import IncrementalPromptEngine, incremental_prompts_apply
from raydistill.agent import run_episode
from raydistill.agent.messages import episode_prefix
from raydistill.config.agent import AgentConfig
from raydistill.config.engine import EngineConfig
from raydistill.engines.base import ChatRequest, Completion, Engine, SamplingParams
from raydistill.engines.rendering import render_prompt_text
from raydistill.models import resolve_model


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model("tiny:qwen2-tiny"))


class TokenScript(Engine):
    """A token-level scripted backend: answers from `texts` in order (token ids = `ids_of(text)`) and keeps
    every prompt it was sent as ids (prompts given as messages are rendered the usual way)."""

    backend = "transformers"  # renders locally, like the backends the wrapper applies to

    def __init__(self, tok, texts, ids_of=None):
        super().__init__(EngineConfig(model="tiny:qwen2-tiny"))
        self.tokenizer = tok
        self.texts = list(texts)
        self.ids_of = ids_of or (lambda t: tok.encode(t, add_special_tokens=False))
        self.prompts: list[list[int]] = []

    async def generate(self, request: ChatRequest, params: SamplingParams) -> list[Completion]:
        from raydistill.engines.rendering import render_prompt_ids

        ids = render_prompt_ids(self.tokenizer, request)
        self.prompts.append(ids)
        text = self.texts.pop(0)
        gen = self.ids_of(text)
        return [Completion(text=text, token_ids=gen, prompt_tokens=len(ids), completion_tokens=len(gen))]


def _full(tok, messages, cont=False):
    return tok.encode(render_prompt_text(tok, ChatRequest(messages=messages, continue_final_message=cont)),
                      add_special_tokens=False)


STEP = "Thought: compute it.\n```py\nx = {i}\nprint(x * 2)\n```<end_code>"


def test_conversation_prompts_equal_full_render_and_extend_the_previous_prompt(tok):
    inner = TokenScript(tok, [STEP.format(i=i) for i in range(4)])
    eng = IncrementalPromptEngine(inner)
    assert incremental_prompts_apply(inner)
    msgs = episode_prefix("What is 6 * 7? " + "word " * 50, "teacher", ["web_search"])
    p = SamplingParams(max_tokens=32)
    prev_gen: list[int] = []
    for i in range(4):
        [c] = asyncio.run(eng.generate(ChatRequest(messages=msgs), p))
        sent = inner.prompts[-1]
        assert sent == _full(tok, msgs), f"step {i}: incremental ids differ from a full render"
        if i:
            prev = inner.prompts[-2]
            assert sent[: len(prev) + len(prev_gen)] == prev + prev_gen  # exact prefix: prompt + generated
        prev_gen = c.token_ids
        msgs.append({"role": "assistant", "content": c.text})
        msgs.append({"role": "user", "content": f"Observation:\nExecution logs:\n{2 * i}\n"})
    n = eng.counters
    assert n["requests"] == 4 and n["full"] == 1 and n["incremental"] == 3 and n["generated_spliced"] == 3
    assert n["system_reused"] == 1  # the first prompt reused the encoded system turn
    # later steps encode only their new turn, not the conversation
    assert n["tokens_encoded"] < len(inner.prompts[0]) + 3 * 60 < n["tokens_encoded"] + n["tokens_reused"]


def test_the_models_own_tokens_are_kept_even_when_not_canonical(tok):
    # the model spelled its answer one character per token; a re-tokenized transcript would differ and miss
    # the prefix cache, the incremental prompt keeps exactly what the model saw
    def by_char(t):
        return [tok.convert_tokens_to_ids(tok.tokenize(ch))[0] for ch in t]

    text = "Thought: done.\n```py\nfinal_answer(42)\n```<end_code>"
    inner = TokenScript(tok, [text, text], ids_of=by_char)
    assert tok.decode(by_char(text)) == text
    eng = IncrementalPromptEngine(inner)
    msgs = episode_prefix("q?", "teacher", [])
    [c] = asyncio.run(eng.generate(ChatRequest(messages=msgs), SamplingParams()))
    msgs += [{"role": "assistant", "content": c.text}, {"role": "user", "content": "Observation: ok"}]
    asyncio.run(eng.generate(ChatRequest(messages=msgs), SamplingParams()))
    first, second = inner.prompts
    assert second[: len(first) + len(text)] == first + by_char(text)
    assert second != _full(tok, msgs)  # the canonical encoding is different here: the splice is what matters
    assert tok.decode(second) == render_prompt_text(tok, ChatRequest(messages=msgs))


def test_edited_or_unrelated_conversations_fall_back_to_a_full_encode(tok):
    inner = TokenScript(tok, [STEP.format(i=i) for i in range(4)])
    eng = IncrementalPromptEngine(inner)
    msgs = episode_prefix("q?", "teacher", [])
    [c] = asyncio.run(eng.generate(ChatRequest(messages=msgs), SamplingParams()))
    msgs += [{"role": "assistant", "content": c.text}, {"role": "user", "content": "Observation: 1"}]
    asyncio.run(eng.generate(ChatRequest(messages=msgs), SamplingParams()))
    # the after-the-limit request folds text into the last user turn: not an extension of the last prompt
    edited = [*msgs[:-1], {"role": "user", "content": msgs[-1]["content"] + "\n\nNow answer."}]
    asyncio.run(eng.generate(ChatRequest(messages=edited), SamplingParams()))
    assert inner.prompts[-1] == _full(tok, edited)
    # a remainder that starts with whitespace is not a safe cut without a generated-ids splice
    ws = [*msgs, {"role": "assistant", "content": "  padded"}]
    asyncio.run(eng.generate(ChatRequest(messages=ws, continue_final_message=True), SamplingParams()))
    assert inner.prompts[-1] == _full(tok, ws, cont=True)
    assert eng.counters["full"] == 3 and eng.counters["incremental"] == 1


def test_continued_turn_then_next_step(tok):
    # ftp: the first step continues a given "Thought: ..." prefix; the next step extends that prompt
    gen = " so 42.\n```py\nfinal_answer(42)\n```<end_code>"
    inner = TokenScript(tok, [gen, STEP.format(i=1)])
    eng = IncrementalPromptEngine(inner)
    msgs = episode_prefix("q?", "teacher", [])
    pre = [*msgs, {"role": "assistant", "content": "Thought: six times seven"}]
    asyncio.run(eng.generate(ChatRequest(messages=pre, continue_final_message=True), SamplingParams()))
    assert inner.prompts[-1] == _full(tok, pre, cont=True)
    msgs += [{"role": "assistant", "content": "Thought: six times seven" + gen}, {"role": "user", "content": "Obs"}]
    asyncio.run(eng.generate(ChatRequest(messages=msgs), SamplingParams()))
    assert inner.prompts[-1][: len(inner.prompts[0])] == inner.prompts[0]
    assert tok.decode(inner.prompts[-1]) == render_prompt_text(tok, ChatRequest(messages=msgs))
    assert eng.counters["generated_spliced"] == 1


def test_a_whole_episode_through_the_wrapper(tok):
    # run_episode drives it exactly as the teacher worker does; the final answer arrives intact
    texts = ["Thought: a.\n```py\nx = 20\nprint(x)\n```<end_code>",
             "Thought: b.\n```py\nfinal_answer(x + 22)\n```<end_code>"]
    inner = TokenScript(tok, texts)
    eng = IncrementalPromptEngine(inner)
    traj = asyncio.run(run_episode(eng, None, {"id": "q", "question": "20 + 22?", "answer": ["42"]},
                                   AgentConfig(max_steps=3), tools={}))
    assert traj.error is None and traj.final_answer == "42" and traj.engine == "transformers"
    assert eng.counters["incremental"] == 1 and eng.counters["generated_spliced"] == 1
    assert inner.prompts[1][: len(inner.prompts[0])] == inner.prompts[0]


def test_tokenizers_that_encode_pieces_differently_keep_the_whole_prompt_path(tok):
    class PrefixSpace:
        """Failure injection: a tokenizer that, like some SentencePiece ones, starts every encode with a
        prefix-space token, so pieces encoded apart differ from the whole."""

        def __init__(self, inner):
            self.inner = inner
            self.space = inner.encode(" ", add_special_tokens=False)

        def encode(self, text, add_special_tokens=False):
            return self.space + self.inner.encode(text, add_special_tokens=False)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    odd = PrefixSpace(tok)
    inner = TokenScript(odd, [STEP.format(i=i) for i in range(2)])
    eng = IncrementalPromptEngine(inner)
    assert IncrementalPromptEngine(TokenScript(tok, [])).splice_safe() is True
    assert eng.splice_safe() is False
    msgs = episode_prefix("q?", "teacher", [])
    [c] = asyncio.run(eng.generate(ChatRequest(messages=msgs), SamplingParams()))
    msgs += [{"role": "assistant", "content": c.text}, {"role": "user", "content": "Observation: 1"}]
    asyncio.run(eng.generate(ChatRequest(messages=msgs), SamplingParams()))
    assert inner.prompts[-1] == odd.encode(render_prompt_text(tok, ChatRequest(messages=msgs)))
    assert eng.counters["requests"] == 0  # every request went straight to the backend's own rendering


def test_fixed_action_text_keeps_the_generated_ids_in_the_next_prompt(tok):
    # fixed-action benchmark mode swaps the generated text for a valid action; the next prompt must still carry
    # the generated ids (as a real run does), not a re-encoding of the substituted text the model never wrote
    from raydistill.engines.fixed_action import FixedActionEngine, default_action

    gibberish = "zq zq zq zq zq zq zq zq"
    inner = TokenScript(tok, [gibberish, gibberish])
    eng = FixedActionEngine(IncrementalPromptEngine(inner), default_action(3, tool=None))
    msgs = episode_prefix("q?", "teacher", [])
    [c] = asyncio.run(eng.generate(ChatRequest(messages=msgs), SamplingParams(max_tokens=8)))
    assert c.text.startswith("Thought:") and c.token_ids == tok.encode(gibberish, add_special_tokens=False)
    msgs += [{"role": "assistant", "content": c.text + "<end_code>"}, {"role": "user", "content": "Observation: ok"}]
    asyncio.run(eng.generate(ChatRequest(messages=msgs), SamplingParams(max_tokens=8)))
    first, second = inner.prompts
    assert second[: len(first) + len(c.token_ids)] == first + c.token_ids
    assert eng.inner.counters["generated_spliced"] == 1
    # everything after the spliced ids is the rest of the transcript, encoded as usual
    rest = render_prompt_text(tok, ChatRequest(messages=msgs))
    rest = rest[rest.index(c.text) + len(c.text):]
    assert second[len(first) + len(c.token_ids):] == tok.encode(rest, add_special_tokens=False)


def test_a_substituted_text_for_no_generated_ids_is_encoded_not_dropped(tok):
    # an alias only stands for ids that exist: with nothing generated, the action text must reach the prompt
    from raydistill.engines.fixed_action import FixedActionEngine, default_action

    inner = TokenScript(tok, ["", ""])
    eng = FixedActionEngine(IncrementalPromptEngine(inner), default_action(3, tool=None))
    msgs = episode_prefix("q?", "teacher", [])
    [c] = asyncio.run(eng.generate(ChatRequest(messages=msgs), SamplingParams(max_tokens=8)))
    assert c.token_ids == [] and c.text.startswith("Thought:")
    msgs += [{"role": "assistant", "content": c.text + "<end_code>"}, {"role": "user", "content": "Observation: ok"}]
    asyncio.run(eng.generate(ChatRequest(messages=msgs), SamplingParams(max_tokens=8)))
    assert inner.prompts[1] == _full(tok, msgs)
    assert eng.inner.counters["generated_spliced"] == 0
