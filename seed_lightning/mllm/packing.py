"""Training sequences for the multimodal LM: building one sample, packing many into rows.

Sample layout (OPT conventions: its tokenizer starts every text with `</s>`, which is both BOS and EOS):
- text-to-image "t2i": `BOS caption <img> c0 .. c31 </img> EOS`
- image-to-text "i2t": `BOS <img> c0 .. c31 </img> caption EOS`

Packing scheme: several samples share one row of `max_length` tokens. Each sample keeps its own
position ids (restarting at 0) and a block-diagonal causal 4D mask stops attention across samples,
so a packed sample computes exactly what it would compute alone. Labels follow the Hugging Face
convention (unshifted; the model shifts them by one): every non-pad token is a target except the
first token of each sample, which would otherwise be predicted from the previous sample's last token,
and a sample's prompt (e.g. a VQA question) when one is given. Rows are built in the DataLoader
workers (`seed_lightning.mllm.rows`), so they also carry their token counts as plain ints: the training
step reads them without waiting for the device.

Future work (GPU): flash-attention "varlen" kernels can take the sample boundaries from the position
ids alone (no L x L mask); this module keeps to the portable 4D-mask path.
"""

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from seed_lightning.core.errors import ConfigError

SampleKind = Literal["t2i", "i2t"]
IGNORE_INDEX = -100
"""Label value ignored by the cross-entropy loss (PyTorch and Hugging Face convention)."""


def build_sample(
    kind: SampleKind,
    caption_ids: list[int],
    image_span_ids: list[int],
    bos_id: int,
    eos_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training sequence: returns (input_ids LongTensor[T], is_image BoolTensor[T]).

    `image_span_ids` is `<img> codes </img>` (VisualVocabulary.image_span); `is_image` marks the code
    tokens only, not the two markers.
    """
    span = torch.as_tensor(image_span_ids, dtype=torch.long)
    span_is_image = torch.ones(len(span), dtype=torch.bool)
    span_is_image[[0, -1]] = False
    caption = torch.as_tensor(caption_ids, dtype=torch.long)
    if kind == "t2i":
        parts = [caption, span]
        image_parts = [torch.zeros(len(caption), dtype=torch.bool), span_is_image]
    elif kind == "i2t":
        parts = [span, caption]
        image_parts = [span_is_image, torch.zeros(len(caption), dtype=torch.bool)]
    else:
        raise ValueError(f"sample kind must be 't2i' or 'i2t', got {kind!r}")
    bos = torch.tensor([bos_id])
    eos = torch.tensor([eos_id])
    no_image = torch.zeros(1, dtype=torch.bool)
    return torch.cat([bos, *parts, eos]), torch.cat([no_image, *image_parts, no_image])


@dataclass
class PackedBatch:
    """Rows of one or more samples; every tensor is [R, L]."""

    input_ids: torch.Tensor
    """Token ids, `pad_id` after the last sample of a row."""
    labels: torch.Tensor
    """Unshifted targets: input ids, IGNORE_INDEX on pads and on each sample's first token."""
    position_ids: torch.Tensor
    """Position within the token's own sample (0 on pads)."""
    segment_ids: torch.Tensor
    """1 + index of the token's sample in the input list; 0 on pads."""
    is_image: torch.Tensor
    """True on visual code tokens."""
    num_samples: int = 0
    """Samples laid out in the rows."""
    num_tokens: int = 0
    """Non-pad tokens."""
    num_text_targets: int = 0
    """Targets (labels other than IGNORE_INDEX) that are not visual codes: text, `<img>`/`</img>`, EOS."""
    num_image_targets: int = 0
    """Targets that are visual codes."""
    num_truncated: int = 0
    """Samples cut to the row length."""

    def attention_mask(self, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """The block-diagonal causal mask of these rows, see `block_causal_mask` (on the rows' device)."""
        return block_causal_mask(self.segment_ids, dtype)

    def pin_memory(self) -> "PackedBatch":
        """A copy in page-locked memory (the DataLoader's `pin_memory` calls this), so that Lightning's copy to the
        GPU does not block the host."""
        tensors = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return dataclasses.replace(self, **{name: value.pin_memory() for name, value in tensors.items()
                                            if isinstance(value, torch.Tensor)})


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """4D mask [R, 1, L, L]: query i may attend key j iff j <= i and both are in the same sample.

    Pads (segment 0) attend only to themselves, so no softmax row is empty (which would give NaN).
    bool dtype: True = attend (SDPA convention); float dtype: additive 0 / dtype-min (eager attention).
    """
    length = segment_ids.shape[-1]
    positions = torch.arange(length, device=segment_ids.device)
    causal = positions[None, :] <= positions[:, None]
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    pad_query = (segment_ids == 0)[:, :, None]
    diagonal = positions[None, :] == positions[:, None]
    allowed = (causal & same_segment & (~pad_query | diagonal))[:, None]
    return allowed if dtype == torch.bool else additive_mask(allowed, dtype)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask (True = attend) -> additive float mask: 0 where allowed, the dtype's minimum elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def pack_samples(
    samples: Sequence[tuple[torch.Tensor, torch.Tensor]],
    max_length: int,
    pad_id: int,
    prompt_lengths: Sequence[int] | None = None,
) -> PackedBatch:
    """Pack (input_ids, is_image) samples into rows of exactly `max_length` tokens; the first `prompt_lengths[i]`
    tokens of sample i are no targets (None: only its first token, as for every sample).

    First-fit decreasing: longest sample first, each into the first row with room; a sample is never
    split. Samples longer than `max_length` are truncated (counted in `num_truncated`).
    """
    if max_length < 2:
        raise ConfigError(f"packing max_length must be >= 2, got {max_length}; set it to the row length in tokens")
    lengths = [min(len(ids), max_length) for ids, _ in samples]
    num_truncated = sum(len(ids) > max_length for ids, _ in samples)
    if num_truncated:
        warnings.warn("pack_samples truncated samples longer than max_length (see PackedBatch.num_truncated)")
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(samples)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(max_length)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    batch = _fill_rows(samples, rows, max_length, pad_id, prompt_lengths)
    batch.num_truncated = num_truncated
    return batch


def pad_batch(
    samples: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int, prompt_lengths: Sequence[int] | None = None
) -> PackedBatch:
    """The unpacked baseline: one sample per row, right-padded to the longest sample (`prompt_lengths` as in
    `pack_samples`)."""
    longest = max(len(ids) for ids, _ in samples)
    return _fill_rows(samples, [[index] for index in range(len(samples))], longest, pad_id, prompt_lengths)


def _fill_rows(
    samples: Sequence[tuple[torch.Tensor, torch.Tensor]],
    rows: list[list[int]],
    length: int,
    pad_id: int,
    prompt_lengths: Sequence[int] | None,
) -> PackedBatch:
    """Lay the samples out as given by `rows` (sample indices per row), truncating each to `length`; count."""
    shape = (len(rows), length)
    batch = PackedBatch(
        input_ids=torch.full(shape, pad_id, dtype=torch.long),
        labels=torch.full(shape, IGNORE_INDEX, dtype=torch.long),
        position_ids=torch.zeros(shape, dtype=torch.long),
        segment_ids=torch.zeros(shape, dtype=torch.long),
        is_image=torch.zeros(shape, dtype=torch.bool),
        num_samples=len(samples),
    )
    for row, indices in enumerate(rows):
        start = 0
        for index in indices:
            ids, is_image = samples[index]
            ids, is_image = ids[:length], is_image[:length]
            end = start + len(ids)
            not_targets = max(1, prompt_lengths[index]) if prompt_lengths else 1
            batch.input_ids[row, start:end] = ids
            batch.labels[row, start + not_targets:end] = ids[not_targets:]
            batch.position_ids[row, start:end] = torch.arange(len(ids))
            batch.segment_ids[row, start:end] = index + 1
            batch.is_image[row, start:end] = is_image
            batch.num_tokens += len(ids)
            start = end
    targets = batch.labels != IGNORE_INDEX
    batch.num_image_targets = int((targets & batch.is_image).sum())
    batch.num_text_targets = int(targets.sum()) - batch.num_image_targets
    return batch
