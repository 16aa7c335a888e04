"""The text around images in the multimodal LM's sequences, spelt once for the training rows and for generation.

    captioning      BOS <img> codes </img>{after_image(caption)} EOS
    VQA             BOS <img> codes </img>{vqa_prompt(question)}{after_image(answer)} EOS
    text-to-image   BOS {caption}<img> codes </img> EOS

At inference the same prompts stop where the LM's part begins: after `</img>` (caption), after `Answer:`
(VQA), after `<img>` (codes of a caption).
"""

QUESTION = "Question:"
"""Opens a VQA prompt; a generated answer is cut before a follow-up one."""


def vqa_prompt(question: str) -> str:
    """What follows `</img>` to ask `question`: `Question: {question} Answer:`."""
    return f"{QUESTION} {question} Answer:"


def after_image(text: str) -> str:
    """`text` (a caption, or an answer after its prompt) where it continues a sequence: the tokenizer adds no
    prefix space, so the text brings its own."""
    return f" {text}"
