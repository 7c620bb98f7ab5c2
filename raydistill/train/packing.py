"""Turning trajectories into micro-batches: packing (default) or length-sorted padding.

Agent trajectories range from a few hundred to ~10k tokens, so padding a batch to its longest sample wastes
most of the compute. Packing puts several samples back to back in one row of at most `max_tokens` tokens,
with `position_ids` restarting at 0 for each sample; the attention implementations used for training
(`flash_attention_2` varlen, `sdpa_varlen`, and HF's `sdpa`/`eager` mask built from restarting position ids)
keep attention inside each sample, which tests/train/test_packing.py checks against unpacked logits.

Targets are shifted here, per sample: `targets[i]` is the token at i+1 when `loss_mask[i+1]` is set, else -100,
and the last position of every sample is -100, so no sample is ever trained to predict its neighbour's first
token. The loss is a sum over target tokens; the loop divides by the global count of target tokens in the
optimizer step, so every loss token weighs the same however samples land in rows, micro-batches or workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

IGNORE = -100


@dataclass
class Sample:
    input_ids: np.ndarray
    loss_mask: np.ndarray
    key: str = ""

    def __post_init__(self) -> None:
        self.input_ids = np.asarray(self.input_ids, dtype=np.int64)
        self.loss_mask = np.asarray(self.loss_mask, dtype=np.int8)
        if self.input_ids.shape != self.loss_mask.shape or self.input_ids.ndim != 1 or len(self.input_ids) == 0:
            raise ValueError(f"sample {self.key!r}: input_ids {self.input_ids.shape} and loss_mask "
                             f"{self.loss_mask.shape} must be equal-length, non-empty 1-D sequences")

    @classmethod
    def from_row(cls, row: dict) -> Sample:
        return cls(row["input_ids"], row["loss_mask"], key=f"{row.get('id', '')}#{row.get('sample', '')}")

    def __len__(self) -> int:
        return len(self.input_ids)

    def targets(self) -> np.ndarray:
        t = np.full(len(self.input_ids), IGNORE, dtype=np.int64)
        keep = self.loss_mask[1:] != 0
        t[:-1][keep] = self.input_ids[1:][keep]
        return t

    @property
    def num_targets(self) -> int:
        return int(np.count_nonzero(self.loss_mask[1:]))


@dataclass
class MicroBatch:
    """One forward/backward: `input_ids` etc. are (rows, length) tensors on CPU."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    cu_seq_lens: torch.Tensor | None = None
    max_seq_len: int = 0
    num_samples: int = 0
    num_tokens: int = 0
    """Real (non-pad) tokens."""
    num_targets: int = 0
    sample_lens: list[int] = field(default_factory=list)

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.numel())

    def model_inputs(self, device: torch.device | str, flash: bool = False) -> dict:
        """Keyword arguments for a HF causal LM forward (no labels: the loop computes the loss itself).

        Packed rows also carry their sample boundaries: FlashAttention's varlen kernel takes them as
        `cu_seq_lens_*` tensors on the GPU; `sdpa_varlen` takes them as a plain list (`packed_seq_bounds`), which
        DDP does not move to the device, so reading them costs no device sync in every layer. HF's sdpa/eager
        paths ignore both and build their mask from the restarting position ids.
        """
        kw = {"input_ids": self.input_ids.to(device, non_blocking=True),
              "position_ids": self.position_ids.to(device, non_blocking=True), "use_cache": False}
        if self.attention_mask is not None:
            kw["attention_mask"] = self.attention_mask.to(device, non_blocking=True)
        if self.cu_seq_lens is not None:
            if flash:
                cu = self.cu_seq_lens.to(device, non_blocking=True)
                kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=self.max_seq_len,
                          max_length_k=self.max_seq_len)
            else:
                kw["packed_seq_bounds"] = [int(x) for x in self.cu_seq_lens.tolist()]
                if torch.device(device).type == "cuda":  # for PyTorch's varlen kernel (one copy per micro-batch)
                    kw["packed_cu_seqlens"] = self.cu_seq_lens.to(device, non_blocking=True)
        return kw


def pack_row(samples: Sequence[Sample], pad_to_multiple_of: int = 1, pad_id: int = 0) -> MicroBatch:
    """Concatenate samples into one (1, L) row with restarting position ids and per-sample shifted targets.

    With `pad_to_multiple_of` > 1 the row ends in a pad segment (its own positions, no targets) that rounds L
    up, so GPU kernels see aligned shapes; it attends only to itself and adds nothing to the loss.
    """
    lens = [len(s) for s in samples]
    total = sum(lens)
    pad = (-total) % pad_to_multiple_of
    ids = [s.input_ids for s in samples] + ([np.full(pad, pad_id, dtype=np.int64)] if pad else [])
    targets = [s.targets() for s in samples] + ([np.full(pad, IGNORE, dtype=np.int64)] if pad else [])
    segs = lens + ([pad] if pad else [])
    pos = np.concatenate([np.arange(n) for n in segs])
    cu = np.concatenate([[0], np.cumsum(segs)]).astype(np.int32)
    return MicroBatch(
        input_ids=torch.from_numpy(np.concatenate(ids))[None], targets=torch.from_numpy(np.concatenate(targets))[None],
        position_ids=torch.from_numpy(pos)[None], cu_seq_lens=torch.from_numpy(cu), max_seq_len=max(segs),
        num_samples=len(samples), num_tokens=int(total), num_targets=sum(s.num_targets for s in samples),
        sample_lens=lens)


def pack(samples: Sequence[Sample], max_tokens: int, pad_to_multiple_of: int = 1, pad_id: int = 0
         ) -> list[MicroBatch]:
    """Pack into as few rows of at most `max_tokens` tokens as first-fit decreasing finds, of about equal size.

    Each micro-batch carries a fixed host cost (Python and kernel launches of the LoRA layers, forward,
    recompute and backward: ~0.4 s for a 1.5B student on an H200 host), so a small leftover row cost almost
    as much as a full one (docs/benchmarks.md, Training). The FFD row count is kept and the samples are then
    dealt longest first to the least-filled row with room; if that dealing fails, the FFD rows are used.
    Deterministic. Rows are padded up to a multiple of `pad_to_multiple_of` (which may exceed max_tokens by
    less than it).
    """
    too_long = [s for s in samples if len(s) > max_tokens]
    if too_long:
        s = too_long[0]
        raise ValueError(f"sample {s.key!r} has {len(s)} tokens, more than train.max_tokens_per_batch={max_tokens}; "
                         f"raise it to at least the SFT max_length")
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i]), i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(samples[i])
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_tokens - n)
    even: list[list[int]] = [[] for _ in bins]
    load = [0] * len(bins)
    for i in order:
        fits = [b for b in range(len(even)) if load[b] + len(samples[i]) <= max_tokens]
        if not fits:
            even = bins
            break
        b = min(fits, key=lambda b: (load[b], b))
        even[b].append(i)
        load[b] += len(samples[i])
    return [pack_row([samples[i] for i in b], pad_to_multiple_of, pad_id) for b in even]


def pad_batches(samples: Sequence[Sample], micro_batch_size: int, pad_id: int) -> list[MicroBatch]:
    """No packing: length-sorted groups of `micro_batch_size`, right-padded with an attention mask."""
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i]), i))
    out = []
    for start in range(0, len(order), micro_batch_size):
        group = [samples[i] for i in order[start:start + micro_batch_size]]
        width = max(len(s) for s in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        tgt = torch.full((len(group), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for r, s in enumerate(group):
            ids[r, :len(s)] = torch.from_numpy(s.input_ids)
            tgt[r, :len(s)] = torch.from_numpy(s.targets())
            mask[r, :len(s)] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out.append(MicroBatch(input_ids=ids, targets=tgt, position_ids=pos, attention_mask=mask,
                              max_seq_len=width, num_samples=len(group), num_tokens=int(mask.sum()),
                              num_targets=sum(s.num_targets for s in group), sample_lens=[len(s) for s in group]))
    return out


def plan_micro_batches(samples: Sequence[Sample], *, packing: bool, max_tokens: int, micro_batch_size: int,
                       pad_id: int, pad_to_multiple_of: int = 1) -> list[MicroBatch]:
    if not samples:
        return []
    if packing:
        return pack(samples, max_tokens, pad_to_multiple_of, pad_id)
    return pad_batches(samples, micro_batch_size, pad_id)


def dummy_micro_batch(pad_id: int) -> MicroBatch:
    """A one-token, zero-target batch: lets a worker with fewer micro-batches match its peers' collective calls."""
    return pack_row([Sample(np.array([pad_id]), np.array([0]), key="<dummy>")])


def loss_sum(model: torch.nn.Module, mb: MicroBatch, device: torch.device | str, flash: bool = False
             ) -> torch.Tensor:
    """Sum of token cross-entropies over the micro-batch's targets, computing logits only where needed.

    `logits_to_keep` (an index tensor) makes the LM head run on target positions only (~40% of agent tokens),
    which saves both the head's FLOPs and the (tokens x vocab) logits memory. Indices are found on the host, so
    nothing here waits for the device.
    """
    keep_host = torch.nonzero((mb.targets != IGNORE).any(0)).flatten()
    inputs = mb.model_inputs(device, flash)
    if keep_host.numel() == 0:  # nothing to learn here (dummy batch): keep one logit, contribute a zero loss
        out = model(**inputs, logits_to_keep=torch.zeros(1, dtype=torch.long, device=device))
        return out.logits.float().sum() * 0.0
    targets = mb.targets[:, keep_host].to(device, non_blocking=True)
    out = model(**inputs, logits_to_keep=keep_host.to(device, non_blocking=True))
    logits = out.logits  # (rows, kept, vocab)
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")
