"""A tiny SFT dataset made directly from chats (the real builder lives in raydistill.sft)."""

from __future__ import annotations

import random
from pathlib import Path

from raydistill.train.data import write_dataset


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids + assistant mask: the SFT builder's own function when present, else ChatML piece by piece."""
    try:
        from raydistill.sft import tokenize_chat
    except ImportError:
        tokenize_chat = None
    if tokenize_chat is not None:
        return tokenize_chat(tokenizer, messages)
    ids: list[int] = []
    mask: list[int] = []
    for m in messages:
        head = tokenizer.encode(f"<|im_start|>{m['role']}\n", add_special_tokens=False)
        body = tokenizer.encode(m["content"] + "<|im_end|>", add_special_tokens=False)
        tail = tokenizer.encode("\n", add_special_tokens=False)
        learn = 1 if m["role"] == "assistant" else 0
        ids += head + body + tail
        mask += [0] * len(head) + [learn] * len(body) + [0] * len(tail)
    return ids, mask


def make_chats(n: int, seed: int = 0) -> list[list[dict]]:
    """Agent-like chats with a learnable pattern: the answer repeats a number from the question."""
    rnd = random.Random(seed)
    chats = []
    for i in range(n):
        a, b = rnd.randrange(10, 99), rnd.randrange(10, 99)
        steps = rnd.randrange(1, 3)
        msgs = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"Task {i}: what is {a} plus {b}?"}]
        for _ in range(steps):
            msgs.append({"role": "assistant",
                         "content": f"Thought: I will compute it.\n```py\nresult = {a} + {b}\nprint(result)\n```"})
            msgs.append({"role": "user", "content": f"Observation:\nExecution logs:\n{a + b}\n"})
        msgs.append({"role": "assistant", "content": f"Thought: done.\n```py\nfinal_answer({a + b})\n```"})
        chats.append(msgs)
    return chats


def build_sft(out_dir: str | Path, tokenizer, tokenizer_name: str, n: int = 16, seed: int = 0,
              kind: str = "agent") -> Path:
    rows = []
    for i, chat in enumerate(make_chats(n, seed)):
        ids, mask = encode_chat(tokenizer, chat)
        rows.append({"id": f"t/{i}", "sample": 0, "kind": kind, "input_ids": ids, "loss_mask": mask,
                     "num_tokens": len(ids), "num_loss_tokens": sum(mask)})
    write_dataset(out_dir, rows, tokenizer, tokenizer_name=tokenizer_name, max_length=4096)
    return Path(out_dir)
