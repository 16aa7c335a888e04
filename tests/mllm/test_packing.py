import pytest
import torch

from seed_lightning.core.errors import ConfigError
from seed_lightning.mllm.packing import (
    IGNORE_INDEX,
    PackedBatch,
    block_causal_mask,
    build_sample,
    pack_samples,
    pad_batch,
)

BOS, EOS, PAD = 2, 2, 1
BEGIN, END = 90, 91


def image_span(codes: list[int]) -> list[int]:
    return [BEGIN, *codes, END]


def sample_of_length(length: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample with distinct token values start, start + 1, ... (a t2i sample with `length` tokens)."""
    caption = list(range(start, start + length - 6))
    return build_sample("t2i", caption, image_span([70, 71]), BOS, EOS)


def test_text_to_image_sample_layout():
    ids, is_image = build_sample("t2i", [10, 11, 12], image_span([70, 71]), BOS, EOS)
    assert ids.tolist() == [BOS, 10, 11, 12, BEGIN, 70, 71, END, EOS]
    assert is_image.tolist() == [False] * 5 + [True, True] + [False] * 2


def test_image_to_text_sample_layout():
    ids, is_image = build_sample("i2t", [10, 11], image_span([70, 71, 72]), BOS, EOS)
    assert ids.tolist() == [BOS, BEGIN, 70, 71, 72, END, 10, 11, EOS]
    assert is_image.tolist() == [False, False, True, True, True, False, False, False, False]


def test_unknown_sample_kind_is_rejected():
    with pytest.raises(ValueError, match="t2i"):
        build_sample("caption", [1], image_span([70]), BOS, EOS)


def test_first_fit_decreasing_never_splits_a_sample():
    lengths = [6, 10, 7, 8, 9, 12, 6]
    samples = [sample_of_length(length, 100 * index) for index, length in enumerate(lengths)]
    batch = pack_samples(samples, max_length=20, pad_id=PAD)
    # FFD, longest first: rows 12+8 | 10+9 | 7+6+6
    assert batch.input_ids.shape == (3, 20)
    assert batch.num_truncated == 0
    for index, (ids, is_image) in enumerate(samples):
        where = batch.segment_ids == index + 1
        rows = where.any(dim=1).nonzero().flatten()
        assert len(rows) == 1, "a sample must live in exactly one row"
        positions = where[rows[0]].nonzero().flatten()
        assert torch.equal(positions, torch.arange(positions[0], positions[0] + len(ids))), "contiguous"
        assert torch.equal(batch.input_ids[rows[0], positions], ids)
        assert torch.equal(batch.is_image[rows[0], positions], is_image)
        assert torch.equal(batch.position_ids[rows[0], positions], torch.arange(len(ids)))
    pads = batch.segment_ids == 0
    assert (batch.input_ids[pads] == PAD).all() and (batch.position_ids[pads] == 0).all()


def test_labels_are_every_non_pad_token_except_each_samples_first():
    samples = [sample_of_length(length, 100 * index) for index, length in enumerate([9, 7, 8, 6])]
    batch = pack_samples(samples, max_length=16, pad_id=PAD)
    first_of_sample = batch.segment_ids != torch.nn.functional.pad(batch.segment_ids, (1, 0), value=-1)[:, :-1]
    expected = torch.where((batch.segment_ids == 0) | first_of_sample, IGNORE_INDEX, batch.input_ids)
    assert torch.equal(batch.labels, expected)
    # After the model's one-token shift, a target never comes from a different sample than its input.
    inputs_segment, target_segment = batch.segment_ids[:, :-1], batch.segment_ids[:, 1:]
    has_target = batch.labels[:, 1:] != IGNORE_INDEX
    assert (inputs_segment[has_target] == target_segment[has_target]).all()
    assert int((batch.labels != IGNORE_INDEX).sum()) == sum(len(ids) - 1 for ids, _ in samples)


def test_too_long_samples_are_truncated_and_counted():
    samples = [sample_of_length(12, 0), sample_of_length(7, 100)]
    with pytest.warns(UserWarning, match="truncated"):
        batch = pack_samples(samples, max_length=10, pad_id=PAD)
    assert batch.num_truncated == 1
    assert torch.equal(batch.input_ids[0], samples[0][0][:10])
    assert batch.input_ids.shape == (2, 10)


def test_row_length_below_two_is_a_config_error():
    with pytest.raises(ConfigError, match="max_length"):
        pack_samples([sample_of_length(7, 0)], max_length=1, pad_id=PAD)


def test_block_causal_mask_matches_its_definition():
    segment_ids = torch.tensor([[1, 1, 1, 2, 2, 0, 0], [3, 3, 4, 4, 4, 4, 0]])
    mask = block_causal_mask(segment_ids)
    assert mask.shape == (2, 1, 7, 7) and mask.dtype == torch.bool
    for row in range(2):
        for query in range(7):
            for key in range(7):
                if segment_ids[row, query] == 0:
                    expected = key == query
                else:
                    expected = key <= query and segment_ids[row, key] == segment_ids[row, query]
                assert bool(mask[row, 0, query, key]) == expected, (row, query, key)
    additive = block_causal_mask(segment_ids, torch.float32)
    assert torch.equal(additive == 0, mask)
    assert (additive[~mask] == torch.finfo(torch.float32).min).all()


def test_pad_batch_keeps_order_one_sample_per_row():
    samples = [sample_of_length(7, 0), sample_of_length(11, 100), sample_of_length(9, 200)]
    batch = pad_batch(samples, pad_id=PAD)
    assert batch.input_ids.shape == (3, 11)
    for row, (ids, _) in enumerate(samples):
        assert torch.equal(batch.input_ids[row, :len(ids)], ids)
        assert (batch.input_ids[row, len(ids):] == PAD).all()
        assert (batch.segment_ids[row, :len(ids)] == row + 1).all()
        assert batch.labels[row, 0] == IGNORE_INDEX and torch.equal(batch.labels[row, 1:len(ids)], ids[1:])


def test_prompts_are_no_targets_and_the_rows_count_their_tokens():
    samples = [sample_of_length(12, 0), sample_of_length(9, 100), sample_of_length(10, 200)]
    prompt_lengths = [5, 0, 20]  # sample 3's prompt is longer than the sample: none of it is a target
    with pytest.warns(UserWarning, match="truncated"):
        batch = pack_samples(samples, 11, PAD, prompt_lengths)
    for segment, (ids, _) in enumerate(samples, start=1):
        kept = min(len(ids), 11)
        not_targets = max(1, prompt_lengths[segment - 1])
        expected = [IGNORE_INDEX] * min(not_targets, kept) + ids[not_targets:kept].tolist()
        assert batch.labels[batch.segment_ids == segment].tolist() == expected, segment
    targets = batch.labels != IGNORE_INDEX
    assert batch.num_samples == 3 and batch.num_tokens == 11 + 9 + 10
    assert batch.num_image_targets == int((targets & batch.is_image).sum()) == 2 + 2
    assert batch.num_text_targets == int((targets & ~batch.is_image).sum()) == (11 - 5 - 2) + (9 - 1 - 2)
    # One sample per row: the same targets and counts.
    packed, padded = pack_samples(samples, 12, PAD, prompt_lengths), pad_batch(samples, PAD, prompt_lengths)
    for segment in range(1, 4):
        assert torch.equal(padded.labels[padded.segment_ids == segment], packed.labels[packed.segment_ids == segment])
    assert (padded.num_tokens, padded.num_text_targets, padded.num_image_targets) == \
        (packed.num_tokens, packed.num_text_targets, packed.num_image_targets)


def test_rows_are_pinned_whole_by_the_data_loader(monkeypatch):
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor, *args: pinned.append(tensor) or tensor.clone())
    batch = pack_samples([sample_of_length(9, 0), sample_of_length(7, 100)], 16, PAD)
    copy = pin_memory({"rows": batch, "key": ["a", "b"]})["rows"]
    assert isinstance(copy, PackedBatch) and len(pinned) == 5, "input ids, labels, positions, segments, is_image"
    assert (copy.num_samples, copy.num_tokens, copy.num_text_targets) == (2, 16, batch.num_text_targets)
    assert torch.equal(copy.labels, batch.labels) and copy.labels is not batch.labels
