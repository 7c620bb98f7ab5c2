"""The train stage on a real local Ray: 2 Ray Train workers (gloo), Ray Data shards, checkpoints, resume, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from raydistill.config import load_config
from raydistill.train.data import SftDataError
from raydistill.train.loop import LocalRuntime, LoopSettings, read_metrics
from raydistill.train.loop import run as local_run

TRAIN = ["train.num_workers=2", "train.cpus_per_worker=0.5", "train.effective_batch_size=16", "train.epochs=4",
         "train.lr=1e-2", "train.lora.r=4", "train.lora.alpha=8", "train.lora.dropout=0.0", "train.max_grad_norm=0",
         "train.max_tokens_per_batch=4096", "train.checkpoint_every_steps=2"]


def _cfg(run_dir, *extra):
    return load_config(None, [f"run_dir={run_dir}", "student.model=tiny:qwen2-tiny", *TRAIN, *extra])


@pytest.fixture()
def run_dir(tmp_path, sft_rows):
    src, _ = sft_rows
    shutil.copytree(src, tmp_path / "sft" / "agent")
    return tmp_path


def test_train_two_workers_resume_and_adapter(ray_local, run_dir, sft_rows, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from raydistill.stages import train

    _, rows = sft_rows
    # 1) one step, then stop (as if the job had been interrupted after its first checkpoint)
    cfg1 = _cfg(run_dir, "train.max_steps=1")
    s1 = train.run(cfg1)["kinds"]["agent"]
    assert s1["steps"] == 1 and train.is_done(cfg1)
    first = read_metrics(run_dir / "train" / "agent" / "metrics.jsonl")
    assert [m["step"] for m in first] == [1]
    # The whole data set is one batch, so 2 workers x 8 rows must give the single-process gradient exactly:
    # the loss is normalised by the global number of loss tokens, consistently across workers.
    ref = local_run(LoopSettings(model="tiny:qwen2-tiny", dataset_rows=len(rows), epochs=4, effective_batch_size=16,
                                 lr=1e-2, lora_r=4, lora_alpha=8, lora_dropout=0.0, max_grad_norm=0.0,
                                 max_steps=1, progress=False),
                    LocalRuntime(rows, run_dir / "local"))
    assert first[0]["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert first[0]["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    assert first[0]["samples"] == 16 and first[0]["loss_tokens"] == sum(sum(r["loss_mask"][1:]) for r in rows)

    # 2) run again without the cap: resumes from the step-1 checkpoint and continues the step count
    cfg2 = _cfg(run_dir, "train.ingest=driver")  # the other way into Ray Data (and a quicker one here)
    assert not train.is_done(cfg2)
    s2 = train.run(cfg2)["kinds"]["agent"]
    out = run_dir / "train" / "agent"
    metrics = read_metrics(out / "metrics.jsonl")
    assert s2["steps"] == 4 and [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[0] == first[0]  # the resumed run kept, not redid, step 1
    losses = [m["loss"] for m in metrics]
    assert losses[-1] < losses[0] - 0.05 and losses == sorted(losses, reverse=True), losses
    assert [m["lr"] for m in metrics] == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3])  # linear, no warmup
    assert all(m["tokens_per_s"] > 0 for m in metrics)
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert ckpts == ["step_0000002", "step_0000004"]  # num_to_keep=2
    assert (out / "curve.png").stat().st_size > 5000 and train.is_done(cfg2)
    assert json.loads((out / "done.json").read_text())["steps"] == 4
    assert train.run(cfg2)["kinds"]["agent"]["skipped"] is True

    # 3) the adapter is a standard PEFT dir: it reloads and changes the model's outputs
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["peft_type"] == "LORA"
    ids = torch.tensor([rows[0]["input_ids"][:64]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        after = tuned(input_ids=ids).logits
    assert (after - before).abs().max() > 1e-2


def _write_meta(d, **changes):
    meta = json.loads((d / "meta.json").read_text())
    meta.update(changes)
    (d / "meta.json").write_text(json.dumps(meta))


def test_clear_errors_before_training(ray_local, run_dir, tmp_path, tiny_model_dir):
    from raydistill.stages import train

    with pytest.raises(SftDataError, match="generate"):
        train.run(_cfg(tmp_path / "nowhere"))
    data = run_dir / "sft" / "agent"
    _write_meta(data, vocab_size=4096)
    with pytest.raises(SftDataError, match="tokenizer mismatch.*2048 tokens.*4096"):
        train.run(_cfg(run_dir))
    _write_meta(data, vocab_size=2048, chat_template_sha256="0" * 64)
    with pytest.raises(SftDataError, match="chat template mismatch"):
        train.run(_cfg(run_dir))
    # a student tokenizer without a chat template
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(tiny_model_dir)
    bare.chat_template = None
    bare.save_pretrained(tmp_path / "bare_tok")
    (tmp_path / "bare_tok" / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(SftDataError, match="no chat template"):
        train.run(_cfg(run_dir, f"student.tokenizer={tmp_path / 'bare_tok'}"))
    from raydistill.train.data import chat_template_sha256

    _write_meta(data, chat_template_sha256=chat_template_sha256(AutoTokenizer.from_pretrained(tiny_model_dir)))
    # more workers than the cluster holds: says what is available
    with pytest.raises(train.TrainError, match=r"needs 8 CPUs.*cluster has 2.*at most 4 fit"):
        train.run(_cfg(run_dir, "train.num_workers=16", "train.effective_batch_size=16"))
    # an empty dataset
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "meta.json").write_text(json.dumps({"tokenizer": "t", "vocab_size": 2048, "chat_template_sha256": "x",
                                                 "max_length": 10, "count": 0}))
    with pytest.raises(SftDataError, match="empty"):
        train.run(_cfg(run_dir, f"train.data={empty}"))


def test_zero2_two_workers_match_single_process(ray_local, run_dir, sft_rows):
    """DeepSpeed ZeRO-2 (where installed): same loss and gradient norm as one process, over two steps."""
    pytest.importorskip("deepspeed")
    from raydistill.stages import train

    _, rows = sft_rows
    cfg = _cfg(run_dir, "train.strategy=zero2", "train.ingest=driver", "train.max_steps=2",
               "train.max_tokens_per_batch=400")
    train.run(cfg)
    got = read_metrics(run_dir / "train" / "agent" / "metrics.jsonl")
    rt = LocalRuntime(rows, run_dir / "local")
    local_run(LoopSettings(model="tiny:qwen2-tiny", dataset_rows=len(rows), epochs=4, effective_batch_size=16,
                           lr=1e-2, lora_r=4, lora_alpha=8, lora_dropout=0.0, max_grad_norm=0.0, max_steps=2,
                           max_tokens_per_batch=400, progress=False), rt)
    ref = read_metrics(run_dir / "local" / "step_0000002" / "metrics.jsonl")
    assert got[0]["micro_batches"] > 1  # accumulation over several micro-batches on each worker
    for g, r in zip(got, ref, strict=True):
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-5)
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4)
