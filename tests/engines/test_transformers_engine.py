"""The transformers backend through its real code path (tiny random Qwen2 from from_pretrained)."""

from __future__ import annotations

import asyncio

import pytest

from raydistill.engines import ChatRequest, PromptTooLongError, SamplingParams
from raydistill.engines.rendering import render_prompt_text


def chat(text: str) -> ChatRequest:
    return ChatRequest(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": text}])


def gen(engine, req, params):
    return asyncio.run(engine.generate(req, params))


def test_concurrent_requests_are_decoded_as_one_left_padded_batch(tf_engine):
    # different prompt lengths, so left padding matters; greedy, so results must equal one-at-a-time decoding
    prompts = [chat("word " * (i * 3 + 1) + f"question {i}") for i in range(8)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    before = dict(tf_engine.stats())
    sizes_before = len(tf_engine.batch_sizes)

    async def together():
        return await asyncio.gather(*(tf_engine.generate(p, params) for p in prompts))

    batched = asyncio.run(together())
    new_sizes = tf_engine.batch_sizes[sizes_before:]
    assert tf_engine.stats()["requests"] - before["requests"] == 8
    assert new_sizes == [8], f"expected one batch of 8, got {new_sizes}"
    single = [gen(tf_engine, p, params)[0] for p in prompts]
    assert tf_engine.batch_sizes[sizes_before + 1:] == [1] * 8
    for b, s in zip(batched, single, strict=True):
        assert b[0].token_ids == s.token_ids
        assert b[0].completion_tokens == 12 and b[0].finish_reason == "length"
    assert len({tuple(b[0].token_ids) for b in batched}) > 1  # prompts really differ


def test_batches_are_capped_and_mixed_params_split(tf_engine):
    start = len(tf_engine.batch_sizes)
    a = SamplingParams(max_tokens=4, ignore_eos=True)
    b = SamplingParams(max_tokens=5, ignore_eos=True)

    async def run():
        reqs = [tf_engine.generate(chat(f"q{i}"), a if i % 2 else b) for i in range(40)]
        return await asyncio.gather(*reqs)

    outs = asyncio.run(run())
    sizes = tf_engine.batch_sizes[start:]
    assert sum(sizes) == 40 and max(sizes) <= 16 and len(sizes) >= 4
    assert all(o[0].completion_tokens == (4 if i % 2 else 5) for i, o in enumerate(outs))


def test_n_greater_than_one_greedy_and_sampled(tf_engine):
    req = chat("sample me")
    greedy = gen(tf_engine, req, SamplingParams(n=3, max_tokens=8, ignore_eos=True))
    assert len(greedy) == 3 and len({tuple(c.token_ids) for c in greedy}) == 1
    p = SamplingParams(n=4, temperature=1.0, top_p=1.0, max_tokens=10, seed=7, ignore_eos=True, logprobs=True)
    s1 = gen(tf_engine, req, p)
    s2 = gen(tf_engine, req, p)
    assert len(s1) == 4 and len({tuple(c.token_ids) for c in s1}) > 1
    assert [c.token_ids for c in s1] == [c.token_ids for c in s2]  # seeded
    for c in s1:
        assert c.cumulative_logprob < 0 and c.cumulative_logprob == pytest.approx(sum(c.token_logprobs))


def test_stop_strings_cut_text_and_report_reason(tf_engine):
    req = chat("tell me something")
    p = SamplingParams(temperature=1.0, max_tokens=40, seed=3, ignore_eos=True)
    full = gen(tf_engine, req, p)[0]
    assert len(full.text) > 20
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    assert stop.strip(), f"pick a visible stop string from {full.text!r}"
    cut = gen(tf_engine, req, p.replace(stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.completion_tokens < full.completion_tokens
    assert cut.token_ids == full.token_ids[: cut.completion_tokens]


def test_logprobs_match_between_batched_and_single(tf_engine):
    p = SamplingParams(max_tokens=6, logprobs=True, ignore_eos=True)
    reqs = [chat("a b c"), chat("a much longer prompt " * 4)]

    async def both():
        return await asyncio.gather(*(tf_engine.generate(r, p) for r in reqs))

    batched = asyncio.run(both())
    for r, b in zip(reqs, batched, strict=True):
        s = gen(tf_engine, r, p)[0]
        assert b[0].cumulative_logprob == pytest.approx(s.cumulative_logprob, abs=1e-3)


def test_continue_final_message_keeps_the_prefix_open(tf_engine):
    prefix = "Thought: the first idea.\n\n"
    req = ChatRequest(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": prefix}],
                      continue_final_message=True)
    text = render_prompt_text(tf_engine.tokenizer, req)
    assert text.endswith("<|im_start|>assistant\n" + prefix)
    out = gen(tf_engine, req, SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert out.prompt_tokens == len(tf_engine.tokenizer.encode(text, add_special_tokens=False))


def test_prompt_token_ids_and_too_long(tf_engine):
    out = gen(tf_engine, ChatRequest(prompt_token_ids=[5, 6, 7]), SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert out.prompt_tokens == 3 and out.completion_tokens == 3
    with pytest.raises(PromptTooLongError):
        gen(tf_engine, ChatRequest(prompt_token_ids=[5] * 5000), SamplingParams(max_tokens=3))


def test_bad_requests_are_clear():
    with pytest.raises(ValueError, match="exactly one"):
        ChatRequest()
    with pytest.raises(ValueError, match="assistant"):
        ChatRequest(messages=[{"role": "user", "content": "x"}], continue_final_message=True)
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=0)


def test_lora_adapter_is_applied(tf_engine, tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from raydistill.config.engine import EngineConfig
    from raydistill.engines import create_engine

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")
    eng = create_engine(EngineConfig(model="tiny:qwen2-tiny", lora_adapter=str(tmp_path / "adapter"), cpu_threads=1))
    p = SamplingParams(max_tokens=8, logprobs=True, ignore_eos=True)
    [with_lora] = gen(eng, chat("adapter?"), p)
    [without] = gen(tf_engine, chat("adapter?"), p)
    assert with_lora.cumulative_logprob != pytest.approx(without.cumulative_logprob, abs=1e-3)
    asyncio.run(eng.aclose())
