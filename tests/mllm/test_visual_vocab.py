import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from seed_lightning.core.errors import ConfigError, DataError
from seed_lightning.mllm.visual_vocab import VisualVocabulary

WORDS = ["</s>", "<pad>", "a", "cat", "on", "mat"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: ids 0..5 for WORDS."""
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(WORDS)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>")


def test_every_code_round_trips_through_a_contiguous_id_range():
    tokenizer = word_tokenizer()
    visual = VisualVocabulary(8192)
    assert visual.add_to(tokenizer)
    codes = torch.arange(8192)
    ids = visual.code_to_id(codes)
    assert ids[0] == len(WORDS)
    assert torch.equal(ids, torch.arange(len(WORDS), len(WORDS) + 8192))
    assert torch.equal(visual.id_to_code(ids), codes)
    assert tokenizer.convert_ids_to_tokens([int(ids[0]), int(ids[4711]), int(ids[-1])]) == [
        "<img_00000>", "<img_04711>", "<img_08191>"]
    assert tokenizer.convert_tokens_to_ids(["<img>", "</img>"]) == [visual.begin_image_id, visual.end_image_id]
    # The tokenizer itself turns the token strings into exactly these ids.
    encoded = tokenizer("a cat <img><img_00007><img_08191></img>", add_special_tokens=False).input_ids
    assert encoded[2:] == [visual.begin_image_id, int(ids[7]), int(ids[8191]), visual.end_image_id]


def test_image_span_wraps_codes_in_markers_for_a_batch():
    visual = VisualVocabulary(16)
    visual.add_to(word_tokenizer())
    codes = torch.tensor([[3, 0, 15], [1, 2, 3]])
    span = visual.image_span(codes)
    assert span.shape == (2, 5)
    assert (span[:, 0] == visual.begin_image_id).all() and (span[:, -1] == visual.end_image_id).all()
    assert torch.equal(visual.id_to_code(span[:, 1:-1]), codes)


def test_is_visual_marks_code_tokens_only():
    visual = VisualVocabulary(16)
    visual.add_to(word_tokenizer())
    ids = torch.tensor([0, 5, visual.first_code_id, visual.end_code_id - 1, visual.begin_image_id, visual.end_image_id])
    assert visual.is_visual(ids).tolist() == [False, False, True, True, False, False]


def test_non_visual_ids_and_out_of_range_codes_are_rejected():
    visual = VisualVocabulary(16)
    visual.add_to(word_tokenizer())
    with pytest.raises(DataError, match="not a visual code token"):
        visual.id_to_code(torch.tensor([visual.first_code_id, 3]))
    with pytest.raises(DataError, match="not a visual code token"):
        visual.id_to_code(torch.tensor([visual.begin_image_id]))
    with pytest.raises(DataError, match=r"\[0, 16\)"):
        visual.code_to_id(torch.tensor([0, 16]))


def test_ids_are_unavailable_before_add_to():
    with pytest.raises(RuntimeError, match="add_to"):
        VisualVocabulary(4).code_to_id(torch.tensor([1]))


def test_a_saved_tokenizer_is_reused_without_adding_tokens(tmp_path):
    tokenizer = word_tokenizer()
    first = VisualVocabulary(32)
    first.add_to(tokenizer)
    tokenizer.save_pretrained(tmp_path)
    reloaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    second = VisualVocabulary(32)
    assert not second.add_to(reloaded)
    assert len(reloaded) == len(tokenizer)
    assert (second.first_code_id, second.end_image_id) == (first.first_code_id, first.end_image_id)


def test_a_tokenizer_with_some_visual_tokens_is_a_config_error():
    tokenizer = word_tokenizer()
    tokenizer.add_tokens(["<img>"], special_tokens=True)
    with pytest.raises(ConfigError, match="1 of the 10 visual tokens"):
        VisualVocabulary(8).add_to(tokenizer)


def test_visual_tokens_in_the_wrong_order_are_a_config_error():
    tokenizer = word_tokenizer()
    visual = VisualVocabulary(8)
    tokenizer.add_tokens(list(reversed(visual.tokens)), special_tokens=True)
    with pytest.raises(ConfigError, match="not contiguous"):
        visual.add_to(tokenizer)
