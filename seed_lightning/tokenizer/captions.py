"""Caption tokenisation of the tokenizer's stage 1, run in the DataLoader workers.

`CaptionTokens` is a batch transform (`ShardDataModule.connect`): each worker adds the BERT ids and attention
mask of the batch's captions, so `training_step` receives tensors and the host does not tokenise between steps.
"""

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

CAPTION_IDS = "caption_ids"
CAPTION_MASK = "caption_mask"


@dataclass
class CaptionTokens:
    """The captions' token ids and attention mask, padded to the longest caption of the batch (picklable: it
    travels to the DataLoader workers)."""

    tokenizer: PreTrainedTokenizerBase
    max_length: int

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(captions, padding="longest", truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
        return {CAPTION_IDS: encoded["input_ids"], CAPTION_MASK: encoded["attention_mask"]}

    def __call__(self, batch: dict[str, Any], rank: int, index: int) -> dict[str, Any]:
        return {**batch, **self.encode(batch["caption"])}
