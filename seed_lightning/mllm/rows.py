"""The multimodal LM's training and validation rows, built from token-shard batches in the DataLoader workers.

`RowBuilder` holds what building takes (the text tokenizer, the visual vocabulary, the row settings, the VQA
training questions, the sample seed) and nothing of the model, so it is cheap to hand to the workers.
`MLLMModule.setup` connects its `train_batch` and `val_batch` to the data module (`ShardDataModule.connect`,
as litgpt's `DataModule.connect` hands its data the tokenizer); the workers apply them to every collated
batch, and the LightningModule receives ready `PackedBatch` rows, pinned and moved by Lightning.

Train: every image becomes one sequence (`seed_lightning.mllm.prompts` spells them): image-to-text
`<img> codes </img> caption` with probability `p_image_to_text`, else text-to-image `caption <img> codes </img>`;
with VQA questions given, an image that has some becomes `<img> codes </img>Question: q Answer: a` with
probability `vqa_probability` instead, with the answer (and EOS) as its only targets. The choices of batch
`index` of rank `rank` come from `random.Random(f"{sample_seed}/{rank}/{index}")`; the data module counts
`index` over the rank's train batches from the start of training, across epochs and resumes, so the rows
are as deterministic and resumable as the stream they come from.

Validation: every image in both directions, `captioning_rows` (image-to-text) and `generation_rows`
(text-to-image), each caption as stored (no choice among references, no VQA).
"""

import random
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from seed_lightning.core.data.text import clean_caption
from seed_lightning.mllm.packing import PackedBatch, SampleKind, build_sample, pack_samples, pad_batch
from seed_lightning.mllm.prompts import after_image, vqa_prompt
from seed_lightning.mllm.visual_vocab import VisualVocabulary

ROWS = "rows"
"""Train batch entry holding the packed rows; beside them a train batch keeps only its samples' `key`s."""
CAPTIONING_ROWS = "captioning_rows"
"""Val batch entry: every image's image-to-text sample, packed."""
GENERATION_ROWS = "generation_rows"
"""Val batch entry: every image's text-to-image sample, packed."""

Sample = tuple[torch.Tensor, torch.Tensor]
"""(input_ids LongTensor[T], is_image BoolTensor[T]), see `packing.build_sample`."""


@dataclass
class RowBuilder:
    """Token-shard batches -> packed rows of the multimodal LM (see the module docstring)."""

    tokenizer: PreTrainedTokenizerBase
    """The LM's text tokenizer (it holds the visual tokens too)."""
    visual: VisualVocabulary
    """Code <-> token id mapping, registered with `tokenizer`."""
    bos_id: int
    eos_id: int
    pad_id: int
    max_length: int = 256
    """Row length of packed rows; longer samples are truncated."""
    packing: bool = True
    """Several samples per row (block-diagonal attention); False pads one sample per row."""
    p_image_to_text: float = 0.5
    """Chance that a caption sample is image-to-text."""
    all_captions: bool = True
    """Train on a random one of the image's reference captions (meta "captions"), not only its KEY.txt caption."""
    vqa_questions: dict[int, list[tuple[str, str]]] = field(default_factory=dict)
    """(question, answer) pairs by image id (meta "image_id") of the training images that have questions."""
    vqa_probability: float = 0.0
    """Chance that an image with questions becomes a VQA sample."""
    sample_seed: int = 0
    """Seed of the choices (with the rank and the batch index)."""

    def train_batch(self, batch: dict[str, Any], rank: int, index: int) -> dict[str, Any]:
        """Train batch `index` of rank `rank` -> {"rows": its packed rows, "key": its samples' keys}."""
        rng = random.Random(f"{self.sample_seed}/{rank}/{index}")
        return {ROWS: self.rows(*self.samples(batch, rng)), "key": batch["key"]}

    def val_batch(self, batch: dict[str, Any], rank: int, index: int) -> dict[str, Any]:
        """The val batch (its codes, captions, keys and indices stay for the validation callbacks) with both
        directions of every image added as `captioning_rows` and `generation_rows`."""
        spans = self._spans(batch)
        captions = batch["caption"]
        to_text = self._text_ids([after_image(caption) for caption in captions])
        to_image = self._text_ids(captions)
        return {
            **batch,
            CAPTIONING_ROWS: self.rows([self._sample("i2t", ids, span) for ids, span in zip(to_text, spans)]),
            GENERATION_ROWS: self.rows([self._sample("t2i", ids, span) for ids, span in zip(to_image, spans)]),
        }

    def samples(self, batch: dict[str, Any], rng: random.Random) -> tuple[list[Sample], list[int]]:
        """One training sequence per image of a token-shard batch, and per sequence the length of its prompt, which
        gets no loss (0 for caption samples; BOS + image + question for VQA)."""
        # The choices first, in a fixed order of draws from `rng`; then one tokenizer call for every text.
        plans: list[tuple[SampleKind, str | None, str]] = []  # (kind, prompt or None, text)
        for caption, meta in zip(batch["caption"], batch["meta"], strict=True):
            questions = self.vqa_questions.get(meta.get("image_id"))
            if questions and rng.random() < self.vqa_probability:
                question, answer = rng.choice(questions)
                # Prompt ids exactly as MultimodalLM.answer builds them, then the answer with its own space.
                plans.append(("i2t", vqa_prompt(question), after_image(answer)))
                continue
            caption = self._caption_for(caption, meta, rng)
            if rng.random() < self.p_image_to_text:
                plans.append(("i2t", None, after_image(caption)))
            else:
                plans.append(("t2i", None, caption))
        ids = iter(self._text_ids([part for _, *parts in plans for part in parts if part is not None]))
        samples, prompt_lengths = [], []
        for (kind, prompt, _), span in zip(plans, self._spans(batch), strict=True):
            prompt_ids = next(ids) if prompt is not None else []
            samples.append(self._sample(kind, prompt_ids + next(ids), span))
            # VQA: only the answer is a target. Trained on the question too, the LM would continue a bare
            # `<img>..</img>` (the captioning prompt) with "Question:" instead of a caption.
            prompt_lengths.append(1 + len(span) + len(prompt_ids) if prompt is not None else 0)
        return samples, prompt_lengths

    def rows(self, samples: list[Sample], prompt_lengths: list[int] | None = None) -> PackedBatch:
        """Pack (or pad) the samples into rows, as configured; the first `prompt_lengths[i]` tokens of sample i
        are no targets."""
        if self.packing:
            return pack_samples(samples, self.max_length, self.pad_id, prompt_lengths)
        return pad_batch(samples, self.pad_id, prompt_lengths)

    def _caption_for(self, caption: str, meta: dict[str, Any], rng: random.Random) -> str:
        references = [clean_caption(text) for text in meta.get("captions") or []] if self.all_captions else []
        references = [text for text in references if text]
        return rng.choice(references) if references else caption

    def _spans(self, batch: dict[str, Any]) -> list[list[int]]:
        return self.visual.image_span(batch["codes"]).tolist()

    def _text_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens (the samples add BOS and EOS)."""
        return self.tokenizer(texts, add_special_tokens=False).input_ids if texts else []

    def _sample(self, kind: SampleKind, text_ids: list[int], span: list[int]) -> Sample:
        return build_sample(kind, text_ids, span, self.bos_id, self.eos_id)
