"""SFT data checks: missing/empty/malformed datasets and tokenizer mismatches fail with clear messages."""

from __future__ import annotations

import json
import shutil

import pytest

from raydistill.train.data import (
    SftDataError,
    chat_template_sha256,
    check_dataset_dir,
    check_tokenizer,
    read_rows,
    validate_row,
)


def test_dataset_dir_checks(sft_rows, tmp_path):
    src, rows = sft_rows
    meta = check_dataset_dir(src)
    assert meta.count == len(rows) == 16 and meta.vocab_size == 2048
    assert {"id", "input_ids", "loss_mask"} <= set(next(read_rows(src)))
    with pytest.raises(SftDataError, match="made by the `generate` stage"):
        check_dataset_dir(tmp_path / "missing")
    d = tmp_path / "copy"
    shutil.copytree(src, d)
    m = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**m, "count": 99}))
    with pytest.raises(SftDataError, match="count 99 but the Parquet files hold 16"):
        check_dataset_dir(d)
    (d / "meta.json").write_text(json.dumps({k: v for k, v in m.items() if k != "vocab_size"}))
    with pytest.raises(SftDataError, match="lacks vocab_size"):
        check_dataset_dir(d)
    (d / "meta.json").unlink()
    with pytest.raises(SftDataError, match="no meta.json"):
        check_dataset_dir(d)


def test_tokenizer_checks(sft_rows, tiny_tok):
    src, _ = sft_rows
    meta = check_dataset_dir(src)
    check_tokenizer(meta, tiny_tok, src)  # the tokenizer that made it passes
    assert chat_template_sha256(tiny_tok) == meta.chat_template_sha256
    other = type(meta)(**{**meta.__dict__, "vocab_size": 151936, "tokenizer": "Qwen/Qwen2.5-1.5B-Instruct"})
    with pytest.raises(SftDataError, match="tokenizer mismatch.*2048 tokens.*Qwen2.5-1.5B-Instruct.*151936"):
        check_tokenizer(other, tiny_tok, src)


def test_row_validation_names_the_row():
    validate_row({"id": "a", "sample": 0, "input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]}, vocab_size=10)
    with pytest.raises(SftDataError, match="id='a' sample=1.*3 input_ids but 2 loss_mask"):
        validate_row({"id": "a", "sample": 1, "input_ids": [1, 2, 3], "loss_mask": [0, 1]})
    with pytest.raises(SftDataError, match="out of range"):
        validate_row({"id": "b", "sample": 0, "input_ids": [1, 20], "loss_mask": [0, 1]}, vocab_size=10)
