"""The visual vocabulary of the multimodal LM: SEED code k <-> LM token id.

Each of the tokenizer's codes becomes one added token `<img_{k:05d}>`; an image span is wrapped in
`<img>` ... `</img>`. The tokens are added in the order code 0..N-1, `<img>`, `</img>`, so that the
code tokens occupy one contiguous id range and the mapping is a single offset. This class is the
only place that knows that offset: everything else converts through it.
"""

import torch
from transformers import PreTrainedTokenizerBase

from seed_lightning.core.errors import ConfigError, DataError

IMAGE_BEGIN_TOKEN = "<img>"
IMAGE_END_TOKEN = "</img>"


class VisualVocabulary:
    """Token strings and id mapping for `num_codes` visual codes plus the `<img>`/`</img>` markers."""

    def __init__(self, num_codes: int = 8192) -> None:
        if num_codes < 1:
            raise ConfigError(f"num_visual_codes must be >= 1, got {num_codes}; set it to the tokenizer codebook size")
        self.num_codes = num_codes
        self.code_tokens = [f"<img_{code:05d}>" for code in range(num_codes)]
        self.tokens = [*self.code_tokens, IMAGE_BEGIN_TOKEN, IMAGE_END_TOKEN]
        self._first_code_id: int | None = None

    def add_to(self, tokenizer: PreTrainedTokenizerBase) -> bool:
        """Add the visual tokens to `tokenizer` (as special tokens) and record their id range.

        A tokenizer that already holds all of them in the right contiguous order (one saved by
        `MultimodalLM.save`) is accepted as is. Returns True when tokens were added now.
        """
        vocab = tokenizer.get_vocab()
        present = [token for token in self.tokens if token in vocab]
        added = not present
        if added:
            tokenizer.add_tokens(self.tokens, special_tokens=True)
            vocab = tokenizer.get_vocab()
        elif len(present) != len(self.tokens):
            missing = next(token for token in self.tokens if token not in vocab)
            raise ConfigError(
                f"the tokenizer already has {len(present)} of the {len(self.tokens)} visual tokens "
                f"(e.g. {present[0]!r}) but not {missing!r}; use a tokenizer without them or one saved by MultimodalLM"
            )
        ids = [vocab[token] for token in self.tokens]
        first = ids[0]
        for offset, (token, token_id) in enumerate(zip(self.tokens, ids)):
            if token_id != first + offset:
                raise ConfigError(
                    f"visual token ids are not contiguous in the tokenizer ({token!r} has id {token_id}, "
                    f"expected {first + offset}); use a tokenizer that does not already define <img...> tokens"
                )
        self._first_code_id = first
        return added

    @property
    def first_code_id(self) -> int:
        """Token id of `<img_00000>`."""
        if self._first_code_id is None:
            raise RuntimeError("VisualVocabulary.add_to(tokenizer) must be called before using token ids")
        return self._first_code_id

    @property
    def end_code_id(self) -> int:
        """One past the token id of the last code token."""
        return self.first_code_id + self.num_codes

    @property
    def begin_image_id(self) -> int:
        """Token id of `<img>`."""
        return self.end_code_id

    @property
    def end_image_id(self) -> int:
        """Token id of `</img>`."""
        return self.end_code_id + 1

    def code_to_id(self, codes: torch.Tensor) -> torch.Tensor:
        """Map codes in [0, num_codes) to token ids (same shape)."""
        codes = torch.as_tensor(codes)
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise DataError(
                f"visual codes must lie in [0, {self.num_codes}), got range [{int(codes.min())}, {int(codes.max())}]; "
                "check that num_visual_codes matches the tokenizer codebook that produced the token shards"
            )
        return codes.long() + self.first_code_id

    def id_to_code(self, ids: torch.Tensor) -> torch.Tensor:
        """Map code token ids back to codes (same shape); any other id is an error."""
        ids = torch.as_tensor(ids)
        visual = self.is_visual(ids)
        if not bool(visual.all()):
            bad = int(ids[~visual].flatten()[0])
            raise DataError(f"token id {bad} is not a visual code token; only ids from <img_*> tokens map to codes")
        return ids.long() - self.first_code_id

    def is_visual(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool mask of the ids that are code tokens (`<img>`/`</img>` markers are not codes)."""
        ids = torch.as_tensor(ids)
        return (ids >= self.first_code_id) & (ids < self.end_code_id)

    def image_span(self, codes: torch.Tensor) -> torch.Tensor:
        """Token ids of `<img> c0 .. cN </img>` for codes [..., N] -> [..., N + 2]."""
        ids = self.code_to_id(codes)
        begin = ids.new_full((*ids.shape[:-1], 1), self.begin_image_id)
        end = ids.new_full((*ids.shape[:-1], 1), self.end_image_id)
        return torch.cat([begin, ids, end], dim=-1)
