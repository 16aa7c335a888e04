"""Tokenizer files of the real hub sizes, built offline (no real vocabulary can be downloaded here).

Each vocabulary starts as the real one does (special tokens and their ids, byte alphabet, BERT's
[unusedN] rows), then holds the BPE merges / WordPiece words learnt from the synthetic shapes corpus
(so the rehearsal's captions tokenize into whole words, as real captions do with real vocabularies),
then synthetic filler entries up to the real size:

- OPT (GPT-2 byte-level BPE, facebook/opt-*): 50265 entries, <s>=0 <pad>=1 </s>=2 <unk>=3, 50001 merges.
- CLIP (openai/clip-vit-*, SD v1 tokenizer/): 49408 entries: 256 bytes, 256 bytes + "</w>", 48894
  merges, <|startoftext|>=49406, <|endoftext|>=49407.
- BERT (bert-base-uncased): 30522 WordPiece entries, [PAD]=0 [UNK]=100 [CLS]=101 [SEP]=102 [MASK]=103.

The files are written in the layout the hub repos ship (vocab.json + merges.txt or vocab.txt, tokenizer_config.json,
special_tokens_map.json), not in the layout transformers 5 would save.
"""

import itertools
import json
import random
import string
from pathlib import Path

from tokenizers import pre_tokenizers

from devkit import synthetic
from devkit.tiny_models import (
    BERT_SPECIAL_TOKENS,
    CLIP_BOS,
    CLIP_EOS,
    OPT_SPECIAL_TOKENS,
    bert_words,
    clip_bpe_words,
    learn_bpe,
    opt_bpe_words,
)

OPT_VOCAB_SIZE = 50265
CLIP_VOCAB_SIZE = 49408
BERT_VOCAB_SIZE = 30522
BLIP2_IMAGE_TOKEN = "<image>"  # the token transformers' Blip2Processor expands (the hub repo added it as id 50265)
CORPUS_SCENES = 400
LEARNT_MERGES = 3000
"""At most this many merges learnt from the corpus (it supports fewer: its words are all merged by then)."""


def corpus_lines(num_scenes: int = CORPUS_SCENES, seed: int = 0) -> list[str]:
    """Captions, questions and answers of random synthetic scenes (the rehearsal data's language)."""
    rng = random.Random(f"rehearsal-vocab-{seed}")
    lines = []
    for _ in range(num_scenes):
        scene = synthetic.sample_scene(rng)
        lines += synthetic.describe(scene, rng)
        for question in synthetic.ask(scene, rng):
            lines += [question.question, question.answer]
    return lines


def _byte_symbols() -> list[str]:
    """The 256 byte-level symbols, letters and digits first (filler merges of those come first)."""
    preferred = [c for c in string.ascii_lowercase + string.ascii_uppercase + string.digits]
    rest = sorted(set(pre_tokenizers.ByteLevel.alphabet()) - set(preferred))
    return preferred + rest


def _fill(vocab: dict[str, int], merges: list[tuple[str, str]], candidates, size: int) -> None:
    """Appends candidate merges whose result is new until `vocab` holds `size` entries."""
    for left, right in candidates:
        if len(vocab) >= size:
            return
        token = left + right
        if token not in vocab and left in vocab and right in vocab:
            vocab[token] = len(vocab)
            merges.append((left, right))
    raise ValueError(f"not enough filler candidates to reach {size} entries")


def _add_merges(vocab: dict[str, int], merges: list[tuple[str, str]], learnt: list[tuple[str, str]]) -> None:
    for left, right in learnt:
        if left + right not in vocab:
            vocab[left + right] = len(vocab)
            merges.append((left, right))


def opt_vocab(lines: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab.json, merges) of a 50265-entry GPT-2-style byte-level BPE with OPT's special tokens."""
    vocab = {token: i for i, token in enumerate(OPT_SPECIAL_TOKENS)}
    symbols = _byte_symbols()
    vocab.update({symbol: len(vocab) + i for i, symbol in enumerate(symbols)})
    merges: list[tuple[str, str]] = []
    _add_merges(vocab, merges, learn_bpe(opt_bpe_words(lines), LEARNT_MERGES))
    _fill(vocab, merges, itertools.product(symbols, symbols), OPT_VOCAB_SIZE)
    return vocab, merges


def clip_vocab(lines: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab.json, merges) of a 49408-entry CLIP BPE ("</w>" word ends; the two special tokens last)."""
    symbols = _byte_symbols()
    vocab = {token: i for i, token in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges: list[tuple[str, str]] = []
    _add_merges(vocab, merges, learn_bpe(clip_bpe_words(lines), LEARNT_MERGES))
    letters = symbols[:36]
    candidates = itertools.chain(
        ((a, b + "</w>") for a, b in itertools.product(letters, letters)),
        itertools.product(letters, letters),
        ((a, b + "</w>") for a, b in itertools.product(symbols, symbols)),
        itertools.product(symbols, symbols),
    )
    _fill(vocab, merges, candidates, CLIP_VOCAB_SIZE - 2)
    vocab[CLIP_BOS], vocab[CLIP_EOS] = len(vocab), len(vocab) + 1
    return vocab, merges


def bert_vocab(lines: list[str]) -> list[str]:
    """The 30522 WordPiece entries of an uncased BERT, in id order."""
    pad, unk, cls, sep, mask = BERT_SPECIAL_TOKENS
    tokens = [pad] + [f"[unused{i}]" for i in range(99)] + [unk, cls, sep, mask]
    tokens += [f"[unused{i}]" for i in range(99, 994)]
    characters = [c for c in string.printable if not c.isspace() and not c.isupper()]
    filler = (prefix + "".join(p) for n in (2, 3) for p in itertools.product(string.ascii_lowercase, repeat=n)
              for prefix in ("", "##"))
    candidates = itertools.chain(characters, ("##" + c for c in characters), bert_words(lines), filler)
    return list(itertools.islice(dict.fromkeys(itertools.chain(tokens, candidates)), BERT_VOCAB_SIZE))


def _added_token(content: str, normalized: bool = True) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_bpe(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    _write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges), encoding="utf-8"
    )


def write_opt_tokenizer(folder: Path, lines: list[str], image_token: bool = False) -> None:
    """facebook/opt-*'s files (GPT2Tokenizer, </s> as BOS, EOS and UNK); with `image_token`, BLIP-2's added <image>."""
    vocab, merges = opt_vocab(lines)
    _write_bpe(folder, vocab, merges)
    end, pad = _added_token("</s>"), _added_token("<pad>")
    special = {"bos_token": end, "eos_token": end, "unk_token": end, "pad_token": pad}
    config = {
        "add_bos_token": True, "add_prefix_space": False, "errors": "replace", "model_max_length": 1000000000000000019884624838656,
        **{name: {**token, "__type": "AddedToken"} for name, token in special.items()}, "tokenizer_class": "GPT2Tokenizer",
    }
    if image_token:
        # The BLIP-2 repos also ship tokenizer.json (transformers 5 loads them through it alone).
        from transformers import GPT2Tokenizer

        _write_json(folder / "added_tokens.json", {BLIP2_IMAGE_TOKEN: len(vocab)})
        special["additional_special_tokens"] = [_added_token(BLIP2_IMAGE_TOKEN, normalized=False)]
        config["additional_special_tokens"] = [BLIP2_IMAGE_TOKEN]
        config["processor_class"] = "Blip2Processor"
        tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, bos_token="</s>", eos_token="</s>", unk_token="</s>",
                                  pad_token="<pad>", add_bos_token=True, add_prefix_space=False)
        tokenizer.add_special_tokens({"additional_special_tokens": [BLIP2_IMAGE_TOKEN]})
        tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", config)


def write_clip_tokenizer(folder: Path, lines: list[str], with_tokenizer_json: bool) -> None:
    """openai/clip-vit-*'s tokenizer files (with tokenizer.json) or SD v1's tokenizer/ (without)."""
    vocab, merges = clip_vocab(lines)
    _write_bpe(folder, vocab, merges)
    special = {"bos_token": _added_token(CLIP_BOS), "eos_token": _added_token(CLIP_EOS),
               "unk_token": _added_token(CLIP_EOS), "pad_token": CLIP_EOS}
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
        **{name: ({**token, "__type": "AddedToken"} if isinstance(token, dict) else token) for name, token in special.items()},
        "tokenizer_class": "CLIPTokenizer",
    })
    if with_tokenizer_json:
        from transformers import CLIPTokenizer

        CLIPTokenizer(vocab=vocab, merges=merges).backend_tokenizer.save(str(folder / "tokenizer.json"))


def write_bert_tokenizer(folder: Path, lines: list[str]) -> None:
    """bert-base-uncased's vocab.txt, tokenizer.json and tokenizer_config.json."""
    from transformers import BertTokenizer

    tokens = bert_vocab(lines)
    (folder / "vocab.txt").write_text("".join(token + "\n" for token in tokens), encoding="utf-8")
    _write_json(folder / "tokenizer_config.json", {"do_lower_case": True, "model_max_length": 512})
    vocab = {token: i for i, token in enumerate(tokens)}
    BertTokenizer(vocab=vocab, do_lower_case=True).backend_tokenizer.save(str(folder / "tokenizer.json"))
