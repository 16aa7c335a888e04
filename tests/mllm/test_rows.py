"""RowBuilder: the MLLM's train and val rows from token-shard batches, as the DataLoader workers build them.

Uses the tiny OPT folder that `make data` builds.
"""

import dataclasses
import json
import pickle
import random

import pytest
import torch

from seed_lightning.mllm.module import VQATrainMix
from seed_lightning.mllm.packing import IGNORE_INDEX, PackedBatch
from seed_lightning.mllm.prompts import vqa_prompt
from tests.mllm.test_module import make_module, token_batch

pytestmark = pytest.mark.usefixtures("default_world")  # the tiny OPT folder

TEXT_START = 2 + 32 + 1
"""Where the text of an image-to-text sample starts: after BOS <img> codes </img>."""


def vqa_files(tmp_path) -> VQATrainMix:
    """One question, about image 0."""
    questions = {"questions": [{"question_id": 1, "image_id": 0, "question": "how many stars are there?"}]}
    annotations = {"annotations": [{"question_id": 1, "image_id": 0, "answer_type": "number", "question_type": "how",
                                    "multiple_choice_answer": "2", "answers": [{"answer": "2"}] * 10}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    return VQATrainMix(str(tmp_path / "q.json"), str(tmp_path / "a.json"), probability=1.0)


def assert_same_rows(first: PackedBatch, second: PackedBatch) -> None:
    for field in dataclasses.fields(PackedBatch):
        a, b = getattr(first, field.name), getattr(second, field.name)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, field.name


def test_sample_kinds_follow_the_configured_mix():
    batch = token_batch(8)
    to_text = make_module(p_image_to_text=1.0)
    visual = to_text.mllm.visual
    for ids, _ in to_text.row_builder.samples(batch, random.Random(0))[0]:
        assert ids[1] == visual.begin_image_id, "image-to-text samples start with <img> after BOS"
    to_image = make_module(p_image_to_text=0.0)
    for ids, _ in to_image.row_builder.samples(batch, random.Random(0))[0]:
        assert ids[1] != visual.begin_image_id and ids[-2] == visual.end_image_id


def test_vqa_samples_ask_as_inference_does_and_train_on_the_answer_only(tmp_path, monkeypatch):
    mixed = make_module(vqa_train=vqa_files(tmp_path))
    batch = token_batch(8)
    samples, prompt_lengths = mixed.row_builder.samples(batch, random.Random(0))
    tokenizer = mixed.mllm.tokenizer
    assert tokenizer.decode(samples[0][0][TEXT_START:-1]) == "Question: how many stars are there? Answer: 2"
    # The prompt is token for token what MultimodalLM.answer feeds at inference.
    prompts = []
    monkeypatch.setattr(mixed.mllm, "_generate", lambda p, *args, **kwargs: prompts.extend(p) or torch.zeros(1, 0))
    mixed.mllm.answer(batch["codes"][:1], ["how many stars are there?"])
    assert samples[0][0][:len(prompts[0])].tolist() == prompts[0]
    assert all("Question" not in tokenizer.decode(ids) for ids, _ in samples[1:]), "only image 0 has questions"
    # Loss on the answer (and EOS) only: the question must not become the LM's continuation of `</img>`.
    assert prompt_lengths == [len(prompts[0])] + [0] * 7
    rows = mixed.row_builder.rows(samples, prompt_lengths)
    first_sample = rows.segment_ids == 1
    assert tokenizer.decode(rows.input_ids[first_sample & (rows.labels != IGNORE_INDEX)]) == " 2</s>"
    caption_sample = rows.segment_ids == 2
    assert (rows.labels[caption_sample] != IGNORE_INDEX).sum() == caption_sample.sum() - 1
    # Targets: every token but each sample's first and the rest of the VQA prompt; the counts say so too.
    assert rows.num_text_targets + rows.num_image_targets == rows.num_tokens - 8 - (prompt_lengths[0] - 1)


def test_all_captions_draws_among_the_reference_captions():
    batch = token_batch(1)
    batch["meta"][0]["captions"] = ["A first, caption.", "a second caption"]
    builder = make_module(p_image_to_text=1.0).row_builder
    seen = {builder.tokenizer.decode(builder.samples(batch, random.Random(seed))[0][0][0][TEXT_START:-1]).strip()
            for seed in range(20)}
    assert seen == {"a first, caption", "a second caption"}, "cleaned like the data pipeline cleans KEY.txt"


def test_train_rows_are_drawn_from_the_sample_seed_the_rank_and_the_batch_index():
    builder = make_module(sample_seed=5).row_builder
    batch = token_batch(16)

    def kinds(rank: int, index: int) -> list[bool]:
        rows = builder.train_batch(batch, rank, index)["rows"]
        order = rows.segment_ids[rows.position_ids == 1]  # each sample's second token, by sample
        second = rows.input_ids[rows.position_ids == 1]
        return [bool(token == builder.visual.begin_image_id) for _, token in sorted(zip(order.tolist(), second))]

    for rank, index in [(0, 0), (0, 1), (1, 0), (3, 17)]:
        rng = random.Random(f"5/{rank}/{index}")  # as the in-step sampling drew them, keyed by the global step
        assert kinds(rank, index) == [rng.random() < 0.5 for _ in range(16)], (rank, index)
    assert len({tuple(kinds(rank, index)) for rank, index in [(0, 0), (0, 1), (1, 0)]}) == 3
    assert_same_rows(builder.train_batch(batch, 1, 4)["rows"], builder.train_batch(batch, 1, 4)["rows"])
    assert builder.train_batch(batch, 1, 4)["key"] == batch["key"]


def test_rows_carry_their_counts(tmp_path):
    builder = make_module(vqa_train=dataclasses.replace(vqa_files(tmp_path), probability=0.5)).row_builder
    for packing in (True, False):
        rows = dataclasses.replace(builder, packing=packing, max_length=80).train_batch(token_batch(6), 0, 2)["rows"]
        targets = rows.labels != IGNORE_INDEX
        assert rows.num_samples == 6 and rows.num_tokens == int((rows.segment_ids > 0).sum())
        assert rows.num_image_targets == int((targets & rows.is_image).sum()) == 6 * 32
        assert rows.num_text_targets == int((targets & ~rows.is_image).sum())


def test_val_rows_hold_both_directions_of_every_image_beside_the_batch():
    builder = make_module().row_builder
    batch = {**token_batch(5), "index": torch.arange(5)}
    val = builder.val_batch(batch, rank=1, index=3)
    assert all(val[name] is batch[name] for name in batch), "codes, captions, keys and indices stay"
    captioning, generation = val["captioning_rows"], val["generation_rows"]
    spans = builder.visual.image_span(batch["codes"]).tolist()
    tokenizer = builder.tokenizer
    for sample, (span, caption) in enumerate(zip(spans, batch["caption"]), start=1):
        to_text = captioning.input_ids[captioning.segment_ids == sample].tolist()
        assert to_text[1:len(span) + 1] == span and tokenizer.decode(to_text[len(span) + 1:-1]) == " " + caption
        to_image = generation.input_ids[generation.segment_ids == sample].tolist()
        assert to_image[-len(span) - 1:-1] == span and tokenizer.decode(to_image[1:-len(span) - 1]) == caption
    for rows in (captioning, generation):  # every token but each sample's first is a target: no prompts in val
        assert rows.num_text_targets + rows.num_image_targets == rows.num_tokens - 5
    assert_same_rows(builder.val_batch(batch, 0, 0)["captioning_rows"], captioning), "no rank or index in val rows"


def test_the_row_builder_travels_to_spawned_workers(tmp_path):
    builder = make_module(vqa_train=dataclasses.replace(vqa_files(tmp_path), probability=0.5)).row_builder
    copy = pickle.loads(pickle.dumps(builder))
    batch = token_batch(6)
    assert_same_rows(copy.train_batch(batch, 0, 3)["rows"], builder.train_batch(batch, 0, 3)["rows"])
