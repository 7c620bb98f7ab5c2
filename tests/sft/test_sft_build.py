"""SFT builder: the loss mask covers exactly the assistant turns (decoded and compared), for several templates."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from raydistill.agent.messages import trajectory_to_chat
from raydistill.agent.trajectory import Step, Trajectory
from raydistill.sft import (
    SFT_SCHEMA,
    TemplateError,
    build_rows,
    build_sft_dataset,
    chat_template_sha256,
    read_dataset,
    read_meta,
    tokenize_chat,
    trajectory_chat,
)

STEPS = [
    Step(raw_text="Thought: I will search.\n```py\nr = web_search('Paris population')\nprint(r)\n```<end_code>",
         code="r = web_search('Paris population')\nprint(r)",
         observation="Observation:\nExecution logs:\nDocument 1: Paris has 2.1 million people.\n"),
    Step(raw_text="Thought: a step that fails.\n```py\nx = 1/0\n```<end_code>", code="x = 1/0",
         exec_error=True, observation="Error:\nZeroDivisionError: division by zero\nNow let's retry."),
    Step(raw_text="Thought: done.\n```py\nfinal_answer('2.1 million')\n```<end_code>",
         code="final_answer('2.1 million')", is_final=True),
]


def _traj(**kw) -> Trajectory:
    base = dict(id="hotpotqa_1000/1", sample=0, source="hotpotqa_1000", domain="qa",
                question="How many people live in Paris?", gold=["2.1 million"], steps=STEPS,
                final_answer="2.1 million", tools=["web_search"])
    base.update(kw)
    return Trajectory(**base)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _masked_runs(tok, ids, mask) -> list[str]:
    runs, cur = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def _unmasked_text(tok, ids, mask) -> str:
    return tok.decode([i for i, m in zip(ids, mask, strict=True) if not m])


def test_mask_is_exactly_the_assistant_turns(tok):
    traj = _traj()
    chat = trajectory_chat(traj, "student")
    assert chat == trajectory_to_chat(traj, system_prompt="student")
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    ids, mask = tokenize_chat(tok, chat)
    # same ids as the template's own tokenization (what the engine would see)
    assert ids == list(tok.apply_chat_template(chat, tokenize=True)["input_ids"])
    # decoded trained runs == each assistant step + the end-of-turn token, in order, nothing else
    assert _masked_runs(tok, ids, mask) == [s.raw_text + "<|im_end|>" for s in STEPS]
    # system prompt, task and observations are all in the masked-out part
    rest = _unmasked_text(tok, ids, mask)
    for m in chat:
        if m["role"] != "assistant":
            assert m["content"] in rest
    assert not any(s.raw_text in rest for s in STEPS)


def test_student_prompt_is_short(tok):
    t = _traj()
    student = tokenize_chat(tok, trajectory_chat(t, "student"))[0]
    teacher = tokenize_chat(tok, trajectory_chat(t, "teacher"))[0]
    assert len(student) < len(teacher)


# Two other template families (with this tokenizer's special tokens standing in for theirs).
GEMMA_LIKE = (
    "{{ '<|endoftext|>' }}{% for m in messages %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
LLAMA_LIKE = (
    "{{ '<|endoftext|>' }}{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '<|im_start|>\n\n' + m['content'] + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_start|>\n\n' }}{% endif %}"
)


@pytest.mark.parametrize("template", [GEMMA_LIKE, LLAMA_LIKE], ids=["gemma-like", "llama-like"])
def test_mask_other_templates(tok, template):
    tok2 = tok.__class__.from_pretrained(tok.name_or_path)
    tok2.chat_template = template
    chat = trajectory_chat(_traj(), "student")
    ids, mask = tokenize_chat(tok2, chat)
    runs = _masked_runs(tok2, ids, mask)
    assert runs == [s.raw_text.strip() + "<|im_end|>" for s in STEPS]
    assert chat_template_sha256(tok2) != chat_template_sha256(tok)


def test_not_prefix_stable_template_is_rejected(tok):
    tok2 = tok.__class__.from_pretrained(tok.name_or_path)
    # renders earlier assistant turns without their content (as some "thinking" templates do)
    tok2.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ '<|im_start|>a<|im_end|>' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(TemplateError, match="prefix-stable"):
        tokenize_chat(tok2, trajectory_chat(_traj(), "student"))


def test_cot_chat_single_turn(tok):
    t = _traj(kind="cot", steps=[Step(raw_text="Reasoning... <answer>2.1 million</answer>", is_final=True)])
    ids, mask = tokenize_chat(tok, trajectory_chat(t))
    assert _masked_runs(tok, ids, mask) == ["Reasoning... <answer>2.1 million</answer><|im_end|>"]


def test_max_length_drop_and_truncate(tok):
    trajs = [_traj(id=f"q/{i}") for i in range(3)] + [_traj(id="q/empty", steps=[])]
    n = len(tokenize_chat(tok, trajectory_chat(trajs[0]))[0])
    rows, stats = build_rows(trajs, tok, max_length=n)
    assert len(rows) == 3 and stats.dropped == {"no_steps": 1}
    rows, stats = build_rows(trajs, tok, max_length=n - 5)
    assert rows == [] and stats.dropped == {"over_max_length": 3, "no_steps": 1}
    rows, stats = build_rows(trajs, tok, max_length=n - 5, overlong="truncate")
    assert stats.truncated == 3 and all(r["num_tokens"] == n - 5 for r in rows)
    assert all(r["num_loss_tokens"] == sum(r["loss_mask"]) > 0 for r in rows)
    # a limit that cuts before the first assistant token leaves nothing to learn: dropped, counted
    rows, stats = build_rows(trajs[:1], tok, max_length=8, overlong="truncate")
    assert rows == [] and stats.dropped == {"no_loss_tokens": 1}


def test_dataset_files_and_meta(tok, tmp_path):
    trajs = [_traj(id=f"q/{i}", sample=s) for i in range(3) for s in range(2)]
    out = tmp_path / "sft" / "agent"
    meta = build_sft_dataset(trajs, out, tokenizer=tok, tokenizer_name="tiny:qwen2-tiny", kind="agent",
                             max_length=4096, shard_rows=4)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "part-00000.parquet", "part-00001.parquet"]
    on_disk = read_meta(out)
    assert on_disk == json.loads(json.dumps(meta))
    for k in ("tokenizer", "vocab_size", "chat_template_sha256", "max_length", "count"):
        assert k in on_disk
    assert on_disk["count"] == 6 and on_disk["vocab_size"] == len(tok)
    assert on_disk["chat_template_sha256"] == chat_template_sha256(tok)
    assert pq.read_schema(out / "part-00000.parquet").remove_metadata() == SFT_SCHEMA
    table = read_dataset(out)
    assert table.num_rows == 6
    assert [(r["id"], r["sample"]) for r in table.select(["id", "sample"]).to_pylist()] == sorted(t.key for t in trajs)
    # rebuilding replaces the dataset (no stale shards)
    build_sft_dataset(trajs[:1], out, tokenizer=tok, tokenizer_name="tiny:qwen2-tiny", kind="agent",
                      max_length=4096, shard_rows=4)
    assert read_dataset(out).num_rows == 1 and read_meta(out)["count"] == 1
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
