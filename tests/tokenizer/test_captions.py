import pickle

from transformers import AutoTokenizer

from seed_lightning.tokenizer.captions import CAPTION_IDS, CAPTION_MASK, CaptionTokens


def test_caption_tokens_pad_to_the_longest_caption_truncate_and_travel_to_workers(default_world):
    tokens = CaptionTokens(AutoTokenizer.from_pretrained(default_world.models / "bert-tokenizer"), max_length=8)
    batch = {"caption": ["a red circle", "a small blue square at the top on a gray background"], "key": ["0", "1"]}
    out = pickle.loads(pickle.dumps(tokens))(batch, rank=0, index=0)
    assert out["key"] == batch["key"] and out["caption"] == batch["caption"]
    ids, mask = out[CAPTION_IDS], out[CAPTION_MASK]
    assert ids.shape == mask.shape == (2, 8)  # the long caption is cut to max_length, the short one padded
    assert mask[0].sum() < 8 and mask[1].all()
    assert ids[0, 0] == tokens.tokenizer.cls_token_id and ids[1, -1] == tokens.tokenizer.sep_token_id
