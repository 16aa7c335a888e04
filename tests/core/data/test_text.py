import pytest

from seed_lightning.core.data.text import clean_caption


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        ("A Dog runs.", "a dog runs"),
        ('  "Two" cats:  (sleeping)!! ', "two cats sleeping"),
        ("line one\nline\ttwo", "line one line two"),
        ("a*b#c~d;e", "a b c d e"),
        # LAVIS keeps commas, apostrophes and hyphens.
        ("the man's red-white hat, again", "the man's red-white hat, again"),
        ("...!!!", ""),
        ("", ""),
    ],
)
def test_clean_caption_matches_lavis_pre_caption(raw, cleaned):
    assert clean_caption(raw) == cleaned


def test_clean_caption_truncates_to_max_words():
    text = " ".join(f"W{i}." for i in range(80))
    assert clean_caption(text) == " ".join(f"w{i}" for i in range(50))
    assert clean_caption(text, max_words=3) == "w0 w1 w2"
