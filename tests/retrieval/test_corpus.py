"""Corpus readers: the wiki-18 JSONL format, Parquet, titles, shard plans, and errors that name file and line."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill.retrieval.corpus import (
    CorpusError,
    Shard,
    plan_shards,
    read_corpus,
    read_shard,
    resolve_corpus,
    text_of,
    title_of,
)


def _write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_bundled_sample_reads_1000_passages_with_472_titles(corpus, sample_path):
    assert len(corpus) == 1000
    assert corpus.id(0) == "0" and corpus.title(0) == "Evan Morris"
    assert len({corpus.title(i) for i in range(len(corpus))}) == 472
    assert resolve_corpus("bundled:wiki18_sample_1000") == sample_path


def test_title_and_text_split():
    c = '"Dibba Al-Hisn"\nis believed to be the site'
    assert title_of(c) == "Dibba Al-Hisn"
    assert text_of(c) == "is believed to be the site"
    assert title_of("no newline") == "no newline" and text_of("no newline") == ""


@pytest.mark.parametrize("bad_line, message", [
    ('{"id": "2", "contents": "x"', "not valid JSON"),
    ('{"id": "2"}', "missing key(s) ['contents']"),
    ('{"contents": "x"}', "missing key(s) ['id']"),
    ('{"id": "2", "contents": 5}', "'contents' must be a string"),
    ('{"id": [2], "contents": "x"}', "'id' must be a string or integer"),
    ('["2", "x"]', "expected a JSON object"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad_line, message):
    path = _write_jsonl(tmp_path / "c.jsonl", ['{"id": "0", "contents": "\\"A\\"\\na"}',
                                               '{"id": "1", "contents": "\\"B\\"\\nb"}', bad_line])
    with pytest.raises(CorpusError) as e:
        read_corpus(path)
    assert f"{path}:3:" in str(e.value) and message in str(e.value)
    # The per-shard reader used by the index build reports the same line.
    _, shards = plan_shards(path, 2)
    with pytest.raises(CorpusError, match=f"{path}:3:"):
        read_shard(path, shards[1])


def test_int_ids_and_blank_lines(tmp_path):
    path = _write_jsonl(tmp_path / "c.jsonl", ['{"id": 7, "contents": "T\\nx"}', "", "  ",
                                               '{"id": "8", "contents": "U\\ny", "extra": 1}'])
    c = read_corpus(path)
    assert len(c) == 2 and [c.id(0), c.id(1)] == ["7", "8"] and c.title(1) == "U"
    n, shards = plan_shards(path, 1)
    assert n == 2 and read_shard(path, shards[1]) == (["8"], ["U\ny"])


def test_shard_plan_reads_back_every_row(tmp_path, corpus, sample_path):
    n, shards = plan_shards(sample_path, 300)
    assert n == 1000 and [(s.start, s.end) for s in shards] == [(0, 300), (300, 600), (600, 900), (900, 1000)]
    assert shards[2].name == "emb-000000000600-000000000900"
    for s in shards:
        assert read_shard(sample_path, s) == corpus.rows(s.start, s.end)


def test_parquet_corpus_and_row_ranges(tmp_path, corpus):
    ids, contents = corpus.rows(0, 50)
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ids, "contents": contents}), path, row_group_size=16)
    c = read_corpus(path)
    assert len(c) == 50 and c.rows() == (ids, contents)
    n, shards = plan_shards(path, 20)
    assert n == 50 and len(shards) == 3
    assert read_shard(path, shards[1]) == (ids[20:40], contents[20:40])


def test_parquet_errors_name_the_problem(tmp_path):
    p1 = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"id": ["0"], "text": ["x"]}), p1)
    with pytest.raises(CorpusError, match=r"lacks column\(s\) \['contents'\]"):
        read_corpus(p1)
    p2 = tmp_path / "null.parquet"
    pq.write_table(pa.table({"id": ["0", "1"], "contents": ["x", None]}), p2)
    with pytest.raises(CorpusError, match="row 1: 'contents' is null"):
        read_corpus(p2)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        read_corpus(tmp_path / "nope.jsonl")
    (tmp_path / "c.csv").write_text("id,contents\n")
    with pytest.raises(CorpusError, match="unknown corpus format"):
        read_corpus(tmp_path / "c.csv")
    with pytest.raises(CorpusError, match="does not exist"):
        resolve_corpus(str(tmp_path / "nope.jsonl"))


def test_truncated_file_after_planning_is_an_error(tmp_path):
    path = _write_jsonl(tmp_path / "c.jsonl", [json.dumps({"id": str(i), "contents": f"T{i}\nx"}) for i in range(6)])
    _, shards = plan_shards(path, 4)
    _write_jsonl(path, [json.dumps({"id": str(i), "contents": f"T{i}\nx"}) for i in range(5)])
    with pytest.raises(CorpusError, match="file changed"):
        read_shard(path, Shard(1, 4, 6, shards[1].offset, shards[1].line))
