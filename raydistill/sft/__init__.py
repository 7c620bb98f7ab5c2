"""SFT data: trajectory -> chat -> the student's chat template -> token ids + assistant-only loss mask.

    meta = build_sft_dataset(trajs, run_dir / "sft" / "agent", tokenizer=tok, tokenizer_name="tiny:qwen2-tiny",
                             kind="agent", max_length=10240)
"""

from raydistill.sft.build import (
    META_FILE,
    SFT_SCHEMA,
    SftStats,
    TemplateError,
    assistant_spans,
    build_rows,
    build_sft_dataset,
    chat_template_sha256,
    dataset_meta,
    load_tokenizer,
    read_dataset,
    read_meta,
    tokenize_chat,
    trajectory_chat,
    write_dataset,
)

__all__ = [
    "META_FILE",
    "SFT_SCHEMA",
    "SftStats",
    "TemplateError",
    "assistant_spans",
    "build_rows",
    "build_sft_dataset",
    "chat_template_sha256",
    "dataset_meta",
    "load_tokenizer",
    "read_dataset",
    "read_meta",
    "tokenize_chat",
    "trajectory_chat",
    "write_dataset",
]
