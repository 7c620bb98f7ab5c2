"""The episode loop with exact model text (scripted engine) and the real sandbox."""

from __future__ import annotations

import asyncio
import json

import pytest

from raydistill.agent import Trajectory, run_episode
from raydistill.agent.prompts import MAX_STEPS_PROMPT
from raydistill.config.agent import AgentConfig, SagConfig
from raydistill.engines import Completion
from raydistill.engines.scripted import ScriptedEngine

Q = {"id": "t/1", "question": "What is 20 + 22?", "answer": "42", "domain": "math", "source": "t"}


def code(src: str, thought: str = "go") -> str:
    # what a model writes; generation runs past the block and is cut at the stop string like a real engine
    return f"Thought: {thought}\n```py\n{src}\n```<end_code>\nObservation: (hallucinated)"


def run(engine, cfg=None, **kw) -> Trajectory:
    return asyncio.run(run_episode(engine, None, Q, cfg or AgentConfig(), role=kw.pop("role", "student"), **kw))


def test_state_persists_and_final_answer_ends_the_episode():
    eng = ScriptedEngine(outputs=[code("x = 20\nprint('set', x)"), code("final_answer(x + 22)"), code("print('never')")])
    t = run(eng)
    assert t.error is None and t.final_answer == "42" and not t.max_steps_reached
    assert len(t.steps) == 2 and t.steps[1].is_final and not t.steps[0].is_final
    assert t.steps[0].raw_text == "Thought: go\n```py\nx = 20\nprint('set', x)\n```<end_code>"
    assert t.steps[0].thought == "go" and t.steps[0].code == "x = 20\nprint('set', x)"
    assert t.steps[0].observation.startswith("Observation:\nExecution logs:\nset 20")
    assert t.steps[0].completion_tokens > 0 and t.steps[0].prompt_tokens > 0
    # the second request saw the first step and its observation as turns
    req = eng.calls[1][0]
    assert [m["role"] for m in req.messages] == ["system", "user", "assistant", "user"]
    assert req.messages[2]["content"] == t.steps[0].raw_text and req.messages[3]["content"] == t.steps[0].observation
    assert eng.calls[0][1].stop == ("<end_code>", "Observation:", "Calling tools:")


def test_execution_error_is_recorded_and_state_survives_it():
    eng = ScriptedEngine(outputs=[code("a = 5"), code("b = 1\nprint('before')\n1 / 0"), code("final_answer(a)")])
    t = run(eng)
    s = t.steps[1]
    assert s.exec_error and not s.parse_error
    assert "ZeroDivisionError" in s.observation and "Now let's retry" in s.observation
    assert t.final_answer == "5" and t.error is None


def test_parse_error_is_a_failed_step_not_an_exception():
    eng = ScriptedEngine(outputs=["Thought: I believe it is 42.", code("final_answer(42)")])
    t = run(eng)
    assert t.steps[0].parse_error and t.steps[0].code is None
    assert "No Python code block" in t.steps[0].observation
    assert t.final_answer == "42"


def test_max_steps_fallback_is_marked():
    eng = ScriptedEngine(outputs=[code("print(1)"), code("print(2)"), "I am out of steps. Final answer: 7"])
    t = run(eng, AgentConfig(max_steps=2))
    assert t.max_steps_reached and t.fallback_answer and t.final_answer == "7"
    assert len(t.steps) == 2 and not any(s.is_final for s in t.steps)
    assert t.fallback_text == "I am out of steps. Final answer: 7"
    last_user = eng.calls[2][0].messages[-1]
    assert last_user["role"] == "user" and last_user["content"].endswith(MAX_STEPS_PROMPT)
    assert last_user["content"].startswith(t.steps[1].observation)


def test_max_steps_fallback_code_answer_and_no_answer():
    eng = ScriptedEngine(outputs=[code("v = 3"), code("final_answer(v * 2)")])
    t = run(eng, AgentConfig(max_steps=1))
    assert t.max_steps_reached and t.fallback_answer and t.final_answer == "6"
    eng = ScriptedEngine(outputs=[code("v = 3"), ""])
    t = run(eng, AgentConfig(max_steps=1))
    assert t.max_steps_reached and not t.fallback_answer and t.final_answer is None


def test_ftp_prefix_is_continued_and_kept():
    cot = "The sum of 20 and 22 is easy.\nIt is 42.\n\nSo the answer: <answer>42</answer>"
    eng = ScriptedEngine(outputs=[cot, "I will check.\n```py\nfinal_answer(20 + 22)\n```<end_code>"])
    t = run(eng, AgentConfig(ftp=True), role="teacher")
    prefix = "Thought: The sum of 20 and 22 is easy.\nIt is 42.\n\n"
    assert t.ftp_cot == cot and t.ftp_prefix == prefix
    req = eng.calls[1][0]
    assert req.continue_final_message and req.messages[-1] == {"role": "assistant", "content": prefix}
    assert t.steps[0].raw_text == prefix + "I will check.\n```py\nfinal_answer(20 + 22)\n```<end_code>"
    assert t.final_answer == "42"
    assert eng.calls[0][1].stop == () and "<answer>" in eng.calls[0][0].messages[-1]["content"]
    # students never get a prefix
    eng = ScriptedEngine(outputs=[code("final_answer(1)")])
    t = run(eng, AgentConfig(ftp=True), role="student")
    assert t.ftp_prefix is None and len(eng.calls) == 1 and not eng.calls[0][0].continue_final_message


def test_observation_is_truncated_head_and_tail():
    eng = ScriptedEngine(outputs=[code("print('H' * 3000 + 'T' * 3000)"), code("final_answer(1)")])
    t = run(eng, AgentConfig(observation_max_chars=200))
    obs = t.steps[0].observation
    assert len(obs) < 600 and "characters cut" in obs and "HHHH" in obs and "TTTT" in obs


def test_engine_failure_ends_the_episode_with_an_error():
    eng = ScriptedEngine(outputs=[code("x = 1")], cycle=False)
    t = run(eng)
    assert t.error is not None and "ran out" in t.error and len(t.steps) == 1


def test_tools_are_offered_only_when_given():
    calls = []

    def web_search(query: str) -> str:
        calls.append(query)
        return f"result for {query}"

    eng = ScriptedEngine(outputs=[code("print(web_search('capital of France'))"), code("final_answer('Paris')")])
    t = asyncio.run(run_episode(eng, None, Q, AgentConfig(), role="student", tools={"web_search": web_search}))
    assert "web_search(query: str)" in eng.calls[0][0].messages[0]["content"]
    assert calls == ["capital of France"] and "result for capital of France" in t.steps[0].observation
    assert t.tools == ["web_search"]
    eng = ScriptedEngine(outputs=[code("print(web_search('x'))"), code("final_answer('?')")])
    t = run(eng)
    assert "web_search" not in eng.calls[0][0].messages[0]["content"] and t.tools == []
    assert t.steps[0].exec_error and "web_search" in t.steps[0].observation


def test_on_step_callback_streams_steps():
    seen = []

    async def on_step(i, step):
        seen.append((i, step.is_final))

    eng = ScriptedEngine(outputs=[code("x = 1"), code("final_answer(x)")])
    run(eng, on_step=on_step)
    assert seen == [(0, False), (1, True)]


def test_sampling_settings_are_recorded():
    eng = ScriptedEngine(outputs=[code("final_answer(1)")])
    t = run(eng, AgentConfig(temperature=0.0, max_new_tokens=77), seed=5)
    s = json.loads(t.sampling)
    assert s["step"]["max_tokens"] == 77 and s["step"]["seed"] == 5 and s["sag"] is None
    assert t.engine == "scripted" and t.system_prompt == "student" and t.gold == ["42"] and t.source == "t"


# -- sag -------------------------------------------------------------------------------------------
def lp(text: str, logprob: float) -> Completion:
    return Completion(text=text, cumulative_logprob=logprob)


def sag_cfg(n: int = 3) -> AgentConfig:
    return AgentConfig(sag=SagConfig(enabled=True, n=n))


def test_sag_majority_wins_and_only_the_winner_state_is_committed():
    eng = ScriptedEngine(outputs=[
        [code("counter = 0")] * 3,
        # candidate 0 has a side effect the others don't; it is outvoted, so its +100 must not leak
        [lp(code("counter += 100\nprint('A')"), -0.1), lp(code("counter += 1\nprint('B')"), -3.0),
         lp(code("counter += 1\nprint('B')"), -4.0)],
        [code("final_answer(counter)")] * 3,
    ])
    t = run(eng, sag_cfg())
    assert t.final_answer == "1", "the loser's side effect leaked into the live state"
    v = json.loads(t.steps[1].sag)
    assert v["n"] == 3 and v["survived"] == 3 and v["chosen"] == 1
    assert [g[0] for g in v["groups"]] == [2, 1]
    assert t.steps[1].raw_text.endswith("print('B')\n```<end_code>")
    assert eng.calls[1][1].n == 3 and eng.calls[1][1].temperature == 0.4 and eng.calls[1][1].logprobs


def test_sag_final_answers_A_and_B_tie_break_by_logprob_not_order():
    eng = ScriptedEngine(outputs=[[lp(code("final_answer('A')"), -6.0), lp(code("final_answer('B')"), -1.5)]])
    t = run(eng, sag_cfg(2))
    assert t.final_answer == "B"
    v = json.loads(t.steps[0].sag)
    assert v["chosen"] == 1 and [g[0] for g in v["groups"]] == [1, 1]


def test_sag_drops_failures_and_none_surviving_uses_the_first_error():
    eng = ScriptedEngine(outputs=[
        [code("keep = 'kept'")] * 3,
        [code("keep = 'clobbered'\n1 / 0"), "just prose", code("undefined_name")],
        [code("keep = 'x'\nprint(missing)"), lp(code("final_answer(keep)"), -1.0), "prose"],
    ])
    t = run(eng, sag_cfg())
    s = t.steps[1]
    assert s.exec_error and "ZeroDivisionError" in s.observation
    v = json.loads(s.sag)
    assert v["survived"] == 0 and v["chosen"] is None
    assert t.final_answer == "kept", "a failed candidate's state leaked"
    v2 = json.loads(t.steps[2].sag)
    assert v2["survived"] == 1 and v2["chosen"] == 1


def test_sag_none_survive_first_is_parse_error():
    eng = ScriptedEngine(outputs=[["prose only", code("1/0")], [code("final_answer(3)")] * 2])
    t = run(eng, sag_cfg(2))
    assert t.steps[0].parse_error and not t.steps[0].exec_error and t.final_answer == "3"


def test_bad_record_is_a_clear_error():
    with pytest.raises(ValueError, match="no question"):
        asyncio.run(run_episode(ScriptedEngine(outputs=["x"]), None, {"id": "1"}, AgentConfig()))


@pytest.mark.parametrize("slow_factory", [False, True], ids=["made", "made_after_cancel"])
def test_cancelling_an_episode_closes_its_sandbox(slow_factory):
    """Also when the sandbox is still being made at the cancel: it is closed once it exists."""
    from raydistill.sandbox import Sandbox

    made = []

    async def factory():
        if slow_factory:
            await asyncio.sleep(0.5)
        made.append(Sandbox())
        return made[-1]

    async def go():
        eng = ScriptedEngine(outputs=[code("x = 1"), code("final_answer(x)")], delay_s=30)
        task = asyncio.create_task(run_episode(eng, factory, Q, AgentConfig()))
        while not eng.calls:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert bool(made) is not slow_factory
        for _ in range(500):
            if made and "closed=True" in repr(made[0]):
                break
            await asyncio.sleep(0.02)

    asyncio.run(go())
    assert len(made) == 1 and "closed=True" in repr(made[0])


def test_sandbox_is_made_while_the_first_step_generates():
    """The factory is started, not awaited, before the first generation: here it only finishes once the engine
    has been called, which would deadlock an episode that waited for its sandbox first."""
    from raydistill.sandbox import Sandbox

    eng = ScriptedEngine(outputs=[code("x = 40 + 2"), code("final_answer(x)")])

    async def factory():
        while not eng.calls:
            await asyncio.sleep(0.01)
        return Sandbox()

    t = asyncio.run(asyncio.wait_for(run_episode(eng, factory, Q, AgentConfig()), 60))
    assert t.error is None and t.final_answer == "42" and len(t.steps) == 2


def test_sandbox_creation_failure_is_a_recorded_step_failure():
    async def factory():
        raise RuntimeError("no room for sandboxes")

    t = asyncio.run(run_episode(ScriptedEngine(outputs=[code("x = 1")]), factory, Q, AgentConfig()))
    assert t.error == "sandbox failure: RuntimeError: no room for sandboxes"
    assert len(t.steps) == 1 and t.steps[0].exec_error and "no room" in t.steps[0].observation
