import json

from transformers import AutoTokenizer, BertTokenizer, CLIPTokenizer

from bench.rehearsal import vocab


def test_opt_vocabulary_has_the_hub_size_special_ids_and_valid_merges(tmp_path):
    vocab.write_opt_tokenizer(tmp_path, vocab.corpus_lines())
    entries = json.loads((tmp_path / "vocab.json").read_text())
    assert len(entries) == vocab.OPT_VOCAB_SIZE
    assert [entries[t] for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    merges = (tmp_path / "merges.txt").read_text().splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) - 1 == vocab.OPT_VOCAB_SIZE - 4 - 256
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt"}))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = tokenizer("two small red circles").input_ids
    assert len(tokenizer) == vocab.OPT_VOCAB_SIZE and ids[0] == 2  # OPT prepends </s>
    assert len(ids) == 5  # corpus words are whole tokens, as real captions are with the real vocabulary


def test_blip2_tokenizer_adds_the_image_token_after_the_opt_vocabulary(tmp_path):
    vocab.write_opt_tokenizer(tmp_path, vocab.corpus_lines(), image_token=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == vocab.OPT_VOCAB_SIZE + 1
    assert tokenizer.convert_tokens_to_ids(vocab.BLIP2_IMAGE_TOKEN) == vocab.OPT_VOCAB_SIZE


def test_clip_vocabulary_has_the_hub_size_and_its_special_tokens_last(tmp_path):
    vocab.write_clip_tokenizer(tmp_path, vocab.corpus_lines(), with_tokenizer_json=False)
    assert not (tmp_path / "tokenizer.json").exists()  # SD v1's tokenizer/ ships none
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == vocab.CLIP_VOCAB_SIZE == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49406, 49407)
    ids = tokenizer("two small red circles", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[:1] == [49406] and ids[5:7] == [49407, 49407]


def test_bert_vocabulary_has_the_hub_size_and_special_ids(tmp_path):
    vocab.write_bert_tokenizer(tmp_path, vocab.corpus_lines())
    lines = (tmp_path / "vocab.txt").read_text().splitlines()
    assert len(lines) == len(set(lines)) == vocab.BERT_VOCAB_SIZE
    tokenizer = BertTokenizer.from_pretrained(tmp_path)
    assert [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id,
            tokenizer.mask_token_id] == [0, 100, 101, 102, 103]
    assert tokenizer.unk_token_id not in tokenizer("Two small red circles, at the top!").input_ids
