"""Episodes and CoT through the real transformers engine (tiny random Qwen2): concurrency, ftp, schema."""

from __future__ import annotations

import asyncio

import pyarrow.parquet as pq
import pytest

from raydistill.agent import from_table, run_cot, run_episode, to_table, trajectory_to_chat
from raydistill.agent.messages import cot_to_chat
from raydistill.agent.prompts import system_prompt
from raydistill.config.agent import AgentConfig
from raydistill.config.engine import EngineConfig
from raydistill.engines import create_engine
from raydistill.engines.fixed_action import FixedActionEngine, default_action


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    e = create_engine(EngineConfig(model="tiny:qwen2-tiny", max_batch_size=32, max_model_len=4096, cpu_threads=1))
    yield e
    asyncio.run(e.aclose())


def records(n):
    return [{"id": f"q/{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i), "domain": "math",
             "source": "q"} for i in range(n)]


def test_64_concurrent_episodes_complete_and_share_batches(engine):
    cfg = AgentConfig(max_steps=3, max_new_tokens=12)
    fixed = FixedActionEngine(engine, default_action(3, tool=None), gen_tokens=12)
    start = len(engine.batch_sizes)

    async def many():
        return await asyncio.gather(*(run_episode(fixed, None, r, cfg, role="student") for r in records(64)))

    trajs = asyncio.run(many())
    assert len(trajs) == 64 and all(t.error is None for t in trajs), [t.error for t in trajs if t.error][:3]
    # every step really ran in the sandbox: state from steps 0 and 1 feeds the final answer (1 + 2)
    assert all(t.final_answer == "3" and len(t.steps) == 3 and t.steps[2].is_final for t in trajs)
    assert all(not s.parse_error and not s.exec_error for t in trajs for s in t.steps)
    sizes = engine.batch_sizes[start:]
    assert sum(sizes) == 64 * 3 and max(sizes) == 32 and len(sizes) <= 12, sizes


def test_random_model_output_is_recorded_not_raised(engine):
    cfg = AgentConfig(max_steps=2, max_new_tokens=8)
    t = asyncio.run(run_episode(engine, None, records(1)[0], cfg, role="student"))
    assert t.error is None and t.max_steps_reached and len(t.steps) == 2
    assert all(s.parse_error for s in t.steps) and t.fallback_text is not None
    assert all(s.completion_tokens > 0 and s.gen_s > 0 for s in t.steps)


def test_ftp_through_the_engine_keeps_the_prefix(engine):
    cfg = AgentConfig(max_steps=1, max_new_tokens=8, ftp=True, ftp_max_new_tokens=24)
    t = asyncio.run(run_episode(engine, None, records(1)[0], cfg, role="teacher", temperature=1.0, seed=1))
    if t.ftp_prefix is None:  # the CoT's first paragraph can be empty for a random model
        assert t.ftp_cot is not None and not t.ftp_cot.strip().split("\n\n")[0].strip()
    else:
        assert t.ftp_prefix.startswith("Thought: ") and t.ftp_prefix.endswith("\n\n")
        assert t.steps[0].raw_text.startswith(t.ftp_prefix.rstrip())


def test_cot_and_rag_cot(engine):
    t = asyncio.run(run_cot(engine, records(1)[0], AgentConfig(max_new_tokens=10), passages=["Paris is in France."]))
    assert t.kind == "cot" and len(t.steps) == 1 and t.steps[0].completion_tokens == 10 or t.steps[0].is_final
    chat = cot_to_chat(t, passages=["Paris is in France."])
    assert "Paris is in France." in chat[1]["content"] and chat[2]["content"] == t.steps[0].raw_text


def test_trajectory_parquet_round_trip_and_chat(engine, tmp_path):
    from raydistill.engines.scripted import ScriptedEngine

    eng = ScriptedEngine(outputs=[
        "Thought: a\n```py\nx = 1\nprint(x)\n```", "Thought: b\n```py\n1/0\n```", "Thought: c\n```py\nfinal_answer(x)\n```"])
    t = asyncio.run(run_episode(eng, None, records(1)[0], AgentConfig(), role="teacher",
                                tools={"web_search": lambda query: "r"}))
    t2 = asyncio.run(run_cot(ScriptedEngine(outputs=["so <answer>2</answer>"]), records(2)[1]))
    path = tmp_path / "t.parquet"
    pq.write_table(to_table([t, t2]), path)
    back = from_table(pq.read_table(path))
    assert back == [t, t2] and back[0].steps[1].exec_error and back[1].final_answer == "2"
    chat = trajectory_to_chat(back[0], system_prompt="student")
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert chat[0]["content"] == system_prompt("student", ["web_search"])
    assert chat[2]["content"] == t.steps[0].raw_text and chat[3]["content"] == t.steps[0].observation
    assert chat[-1]["content"].endswith("final_answer(x)\n```<end_code>")
    assert trajectory_to_chat(back[1])[-1]["content"] == "so <answer>2</answer>"
