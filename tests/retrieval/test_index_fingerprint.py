"""The index stage's fingerprints: every `retrieval.*` setting that shapes the vectors or index.faiss changes them
(so `is_done` is False and `run` rebuilds), settings that do not (search time, service, resources) leave them
alone, and every config key is classified one way or the other."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from raydistill.config import load_config
from raydistill.config.retrieval import RetrievalConfig
from raydistill.stages import index as index_stage

# A value different from the default for each key (a value that matters under the base config's other settings).
CHANGED = {"embedder": "hf:/some/other/encoder", "max_length": 128, "shard_size": 5000, "fp16": False,
           "cpu_bf16": True, "num_gpus": 1.0, "ivf_nlist": 512, "pq_m": 32, "pq_nbits": 4, "train_size": 100_000,
           "hnsw_m": 16, "hnsw_ef_construction": 100, "enabled": False, "index_dir": "/elsewhere", "top_k": 5,
           "batch_size": 32, "num_actors": 3, "num_cpus": 1.0, "hnsw_ef_search": 64, "nprobe": 8,
           "refine_factor": 0, "max_batch_size": 64, "batch_wait_ms": 5.0, "cache_size": 0, "server_num_cpus": 2.0,
           "server_num_gpus": 1.0, "index_device": "cpu"}


def _cfg(tmp_path: Path, corpus: Path, index_type: str, **retrieval):
    cfg = load_config(None, [f"run_dir={tmp_path}", f"retrieval.corpus={corpus}",
                             f"retrieval.index_type={index_type}"])
    return cfg.model_copy(update={"retrieval": cfg.retrieval.model_copy(update=retrieval)})


def test_every_retrieval_key_is_classified():
    build = set(index_stage.EMBEDDING_KEYS).union(*index_stage.INDEX_KEYS.values())
    assert not build & set(index_stage.NOT_BUILD_KEYS)
    assert build | set(index_stage.NOT_BUILD_KEYS) == set(RetrievalConfig.model_fields)
    assert set(CHANGED) == set(RetrievalConfig.model_fields) - {"corpus", "index_type"}
    assert set(index_stage.INDEX_KEYS) == {"flat", "ivfpq", "hnsw"}


@pytest.mark.parametrize("index_type", ["flat", "ivfpq", "hnsw"])
def test_build_keys_change_the_fingerprint_and_others_do_not(tmp_path, sample_path, index_type):
    base = _cfg(tmp_path, sample_path, index_type)
    idx_base = index_stage.fingerprints(base)[1]
    assert base.retrieval.num_gpus == 0 and base.retrieval.fp16 and not base.retrieval.cpu_bf16
    for key, value in CHANGED.items():
        assert getattr(base.retrieval, key) != value, key
        extra = {"num_gpus": 1.0} if key == "fp16" else {}  # fp16 only selects the precision on a GPU
        emb0, idx0 = index_stage.fingerprints(_cfg(tmp_path, sample_path, index_type, **extra))
        emb, idx = index_stage.fingerprints(_cfg(tmp_path, sample_path, index_type, **{key: value, **extra}))
        if key in index_stage.EMBEDDING_KEYS:
            assert emb != emb0 and idx != idx0, f"{key} shapes the vectors but left the fingerprints equal"
        elif key in index_stage.INDEX_KEYS[index_type]:
            assert emb == emb0 and idx != idx0, f"{key} shapes a {index_type} index but left its fingerprint"
        else:
            assert (emb, idx) == (emb0, idx0), f"{key} does not shape a {index_type} index but rebuilt it"
    seeded = base.model_copy(update={"seed": base.seed + 1})
    assert (index_stage.fingerprints(seeded)[1] != idx_base) == (index_type == "ivfpq")
    others = {"flat", "ivfpq", "hnsw"} - {index_type}
    assert all(index_stage.fingerprints(_cfg(tmp_path, sample_path, t))[1] != idx_base for t in others)


def test_settings_a_device_ignores_do_not_rebuild(tmp_path, sample_path):
    """cpu_bf16 is ignored on a GPU and fp16 on a CPU: the vectors do not change, nor must the fingerprint."""
    gpu = _cfg(tmp_path, sample_path, "flat", num_gpus=1.0)
    assert index_stage.fingerprints(gpu) == index_stage.fingerprints(
        _cfg(tmp_path, sample_path, "flat", num_gpus=1.0, cpu_bf16=True))
    cpu = _cfg(tmp_path, sample_path, "flat")
    assert index_stage.fingerprints(cpu) == index_stage.fingerprints(_cfg(tmp_path, sample_path, "flat", fp16=False))
    assert index_stage.fingerprints(gpu) == index_stage.fingerprints(
        _cfg(tmp_path, sample_path, "flat", num_gpus=2.0))


def test_corpus_enters_by_content_not_path(tmp_path, sample_path):
    copy = tmp_path / "same.jsonl"
    shutil.copy(sample_path, copy)
    other = tmp_path / "other.jsonl"
    other.write_text("".join(Path(sample_path).read_text().splitlines(keepends=True)[:10]))
    fp = index_stage.fingerprints(_cfg(tmp_path, sample_path, "flat"))
    assert index_stage.fingerprints(_cfg(tmp_path, copy, "flat")) == fp
    assert index_stage.fingerprints(_cfg(tmp_path, other, "flat"))[0] != fp[0]
