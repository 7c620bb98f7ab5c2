"""Trajectories -> chats -> the student's chat template -> token ids + assistant-only loss mask -> Parquet.

The mask is found without trusting the template to mark assistant text (few templates carry
`{% generation %}` markers): for every assistant message the conversation is rendered up to just before it
(with the generation prompt) and up to just after it. The assistant span is the text between the two,
minus trailing whitespace, so it covers the content and the end-of-turn marker (`<|im_end|>`,
`<|eot_id|>`, `</s>` ...) but not the newline some templates put after it. Each render must be a prefix of
the full conversation, or the template is rejected with a clear error (such a template would train on text
the model never sees at inference). Tokens are then assigned through the fast tokenizer's character offsets
(a token counts if it starts inside an assistant span), or, for slow tokenizers, by re-tokenizing the
prefixes and checking they are token-prefixes of the whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from raydistill.agent.trajectory import Trajectory

SFT_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("sample", pa.int32()),
    ("kind", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("loss_mask", pa.list_(pa.int8())),
    ("num_tokens", pa.int32()),
    ("num_loss_tokens", pa.int32()),
])
META_FILE = "meta.json"


class TemplateError(ValueError):
    """The chat template cannot be used for assistant-only masking (it names why)."""


def chat_template_text(tokenizer: Any) -> str:
    tpl = getattr(tokenizer, "chat_template", None)
    if not tpl:
        raise TemplateError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template")
    return tpl if isinstance(tpl, str) else json.dumps(tpl, sort_keys=True)


def chat_template_sha256(tokenizer: Any) -> str:
    return hashlib.sha256(chat_template_text(tokenizer).encode()).hexdigest()


def _render(tokenizer: Any, messages: Sequence[dict], gen_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=gen_prompt)


def assistant_spans(tokenizer: Any, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of each assistant turn."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("an SFT chat must end with an assistant message")
    full = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True)
        after = _render(tokenizer, messages[: i + 1], False)
        for name, part in (("up to", before), ("through", after)):
            if not full.startswith(part):
                raise TemplateError(
                    f"chat template renders the conversation {name} assistant message {i} differently from the "
                    "whole conversation (it is not prefix-stable, e.g. it rewrites earlier turns), so assistant "
                    "tokens cannot be located; use a template that renders earlier turns unchanged")
        end = len(after.rstrip())
        if end <= len(before):
            raise TemplateError(f"assistant message {i} renders to no text (template drops it?)")
        spans.append((len(before), end))
    return full, spans


def tokenize_chat(tokenizer: Any, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """input_ids and loss_mask (1 on assistant tokens incl. end-of-turn; 0 on system/user/observations)."""
    full, spans = assistant_spans(tokenizer, messages)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [0] * len(ids)
        j = 0
        for t, (s, e) in enumerate(enc["offset_mapping"]):
            if e <= s:
                continue
            while j < len(spans) and s >= spans[j][1]:
                j += 1
            if j < len(spans) and spans[j][0] <= s < spans[j][1]:
                mask[t] = 1
        return ids, mask
    return _tokenize_by_prefixes(tokenizer, full, spans)


def _tokenize_by_prefixes(tokenizer: Any, full: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    ids = list(tokenizer.encode(full, add_special_tokens=False))
    mask = [0] * len(ids)

    def n_tokens(prefix: str) -> int:
        p = list(tokenizer.encode(prefix, add_special_tokens=False))
        if ids[: len(p)] != p:
            raise TemplateError("tokenizer is not prefix-stable at an assistant boundary; use a fast tokenizer")
        return len(p)

    for s, e in spans:
        a, b = n_tokens(full[:s]), n_tokens(full[:e])
        mask[a:b] = [1] * (b - a)
    return ids, mask


def trajectory_chat(traj: Trajectory, system_prompt: str = "student") -> list[dict[str, str]]:
    """The training chat of one trajectory (agent: student prompt + steps + observations; cot: one answer)."""
    from raydistill.agent.messages import cot_to_chat, trajectory_to_chat

    if traj.kind == "cot":
        return cot_to_chat(traj)
    if system_prompt not in ("student", "teacher"):
        raise ValueError(f"sft.system_prompt must be 'student' or 'teacher', got {system_prompt!r}")
    return trajectory_to_chat(traj, system_prompt=system_prompt)  # type: ignore[arg-type]


@dataclass
class SftStats:
    examples: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    max_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "dropped": dict(self.dropped), "truncated": self.truncated,
                "tokens": self.tokens, "loss_tokens": self.loss_tokens, "max_tokens": self.max_tokens,
                "mean_tokens": round(self.tokens / self.examples, 1) if self.examples else None}


def build_rows(trajs: Iterable[Trajectory], tokenizer: Any, *, max_length: int,
               overlong: Literal["drop", "truncate"] = "drop", system_prompt: str = "student",
               ) -> tuple[list[dict[str, Any]], SftStats]:
    """SFT rows (SFT_SCHEMA) of the given trajectories, sorted by key, with counts of what was left out."""
    if overlong not in ("drop", "truncate"):
        raise ValueError(f"overlong must be 'drop' or 'truncate', got {overlong!r}")
    rows: list[dict[str, Any]] = []
    stats = SftStats()
    for t in sorted(trajs, key=lambda t: t.key):
        if not t.steps:
            stats.dropped["no_steps"] += 1
            continue
        ids, mask = tokenize_chat(tokenizer, trajectory_chat(t, system_prompt))
        if len(ids) > max_length:
            if overlong == "drop":
                stats.dropped["over_max_length"] += 1
                continue
            ids, mask = ids[:max_length], mask[:max_length]
            stats.truncated += 1
        n_loss = sum(mask)
        if n_loss == 0:
            stats.dropped["no_loss_tokens"] += 1
            continue
        rows.append({"id": t.id, "sample": t.sample, "kind": t.kind, "input_ids": ids, "loss_mask": mask,
                     "num_tokens": len(ids), "num_loss_tokens": n_loss})
        stats.examples += 1
        stats.tokens += len(ids)
        stats.loss_tokens += n_loss
        stats.max_tokens = max(stats.max_tokens, len(ids))
    return rows, stats


def write_dataset(out_dir: str | Path, rows: list[dict[str, Any]], meta: dict[str, Any], *,
                  shard_rows: int = 2048) -> Path:
    """Replace `out_dir` with Parquet shards of `rows` + meta.json, atomically (a new dir swapped in)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{time.time_ns()}")
    tmp.mkdir()
    try:
        for k, i in enumerate(range(0, max(len(rows), 1), shard_rows)):
            table = pa.Table.from_pylist(rows[i: i + shard_rows], schema=SFT_SCHEMA)
            pq.write_table(table, tmp / f"part-{k:05d}.parquet")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{time.time_ns()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def dataset_meta(tokenizer: Any, tokenizer_name: str, *, max_length: int, count: int,
                 **extra: Any) -> dict[str, Any]:
    """meta.json: the fields training checks (architecture.md) first, then provenance/stats."""
    return {"tokenizer": tokenizer_name, "vocab_size": len(tokenizer),
            "chat_template_sha256": chat_template_sha256(tokenizer), "max_length": max_length,
            "count": count, **extra}


def read_meta(out_dir: str | Path) -> dict[str, Any] | None:
    p = Path(out_dir) / META_FILE
    if not p.exists():
        return None
    return json.loads(p.read_text())


def read_dataset(out_dir: str | Path) -> pa.Table:
    files = sorted(Path(out_dir).glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no SFT shards in {out_dir}")
    return pa.concat_tables([pq.read_table(f, schema=SFT_SCHEMA) for f in files])


def load_tokenizer(name: str) -> Any:
    """The student's tokenizer (a `tiny:` name, local dir or hub id), with its chat template."""
    from transformers import AutoTokenizer

    from raydistill.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(name))
    chat_template_text(tok)  # fail early and clearly
    return tok


def build_sft_dataset(trajs: Iterable[Trajectory], out_dir: str | Path, *, tokenizer: Any, tokenizer_name: str,
                      kind: str, max_length: int, overlong: Literal["drop", "truncate"] = "drop",
                      system_prompt: str = "student", shard_rows: int = 2048,
                      **extra_meta: Any) -> dict[str, Any]:
    """Build and write one SFT dataset; returns its meta.json content (incl. `stats`)."""
    rows, stats = build_rows(trajs, tokenizer, max_length=max_length, overlong=overlong,
                             system_prompt=system_prompt)
    meta = dataset_meta(tokenizer, tokenizer_name, max_length=max_length, count=len(rows), kind=kind,
                        overlong=overlong, system_prompt=system_prompt if kind == "agent" else "cot",
                        stats=stats.to_dict(), **extra_meta)
    write_dataset(out_dir, rows, meta, shard_rows=shard_rows)
    return meta
