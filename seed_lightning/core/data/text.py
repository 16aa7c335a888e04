"""Caption cleaning, as BLIP/LAVIS `BlipCaptionProcessor.pre_caption` does for SEED's training data."""

import re

CAPTION_PUNCTUATION = '.!"()*#:;~'
"""The characters LAVIS replaces by spaces (commas, apostrophes and hyphens are kept, as there)."""

_PUNCTUATION_RE = re.compile(f"[{re.escape(CAPTION_PUNCTUATION)}]")
_WHITESPACE_RE = re.compile(r"\s+")


def clean_caption(text: str, max_words: int = 50) -> str:
    """Lowercase, replace `CAPTION_PUNCTUATION` by spaces, collapse whitespace, keep at most `max_words` words.

    Unlike LAVIS, a single tab or newline is also collapsed into a space (LAVIS only collapses runs of two
    or more), so the result never contains anything but single spaces between words. Returns "" when nothing
    is left.
    """
    words = _WHITESPACE_RE.sub(" ", _PUNCTUATION_RE.sub(" ", text.lower())).strip().split(" ")
    return " ".join(words[:max_words])
