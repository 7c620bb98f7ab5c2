"""Fixtures for the training tests: the tiny model's tokenizer and a small SFT dataset built from chats."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def sft_rows(tiny_tok, tmp_path_factory):
    """16 agent-like chats as SFT rows (and the dataset dir they were written to)."""
    from trainhelp import build_sft

    from raydistill.train.data import read_rows

    d = build_sft(tmp_path_factory.mktemp("sft") / "agent", tiny_tok, "tiny:qwen2-tiny", n=16)
    return d, list(read_rows(d))
