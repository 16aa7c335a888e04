"""The `seed-lightning` command.

    seed-lightning tokenizer fit -c conf/tokenizer/tiny.yaml [--ckpt_path last]
    seed-lightning tokenizer validate -c conf/tokenizer/tiny.yaml --ckpt_path PATH
    seed-lightning tokenizer evaluate -c conf/tokenizer/tiny.yaml -c conf/tokenizer/tiny-codebook.yaml --ckpt_path PATH
    seed-lightning extract-tokens --tokenizer DIR --shards PATTERN --out DIR [--prefix train]
    seed-lightning mllm fit|validate|evaluate -c conf/mllm/tiny.yaml [--ckpt_path last]
    seed-lightning caption IMAGE [--mllm DIR] [--tokenizer DIR]
    seed-lightning vqa IMAGE "QUESTION" [--mllm DIR] [--tokenizer DIR]
    seed-lightning generate "CAPTION" -o out.png [--mllm DIR] [--tokenizer DIR] [--sd DIR]

`tokenizer` and `mllm` run a Trainer: they are one LightningCLI (`lightning_cli.SeedCLI`) over TokenizerModule /
MLLMModule + ShardDataModule, whose every YAML key is a typed argument of those classes or of the Trainer
(`--help` lists them with their docstrings). The tokenizer's YAML picks its stage by `model.class_path`
(ContrastiveModule, CodebookModule). The other commands run no Trainer and take plain options.
Errors a user can fix (bad config key, missing path, no GPU, ...) print one line and exit 2, whatever the command.
"""

import argparse
import faulthandler
import importlib
import logging
import os
import signal
import sys
import warnings

from seed_lightning.core.errors import ConfigError, DataError, run_command


DEFAULT_MLLM = "checkpoints/tiny/mllm/export/merged"
"""Where `make train-mllm` leaves the merged multimodal LM."""
DEFAULT_TOKENIZER = "checkpoints/tiny/seed_tokenizer"
"""Where `make train-tokenizer` leaves the SEED tokenizer."""
DEFAULT_SD = "CompVis/stable-diffusion-v1-4"
"""The paper's Stable Diffusion; `make train-mllm` prints the --sd of the default world's tiny decoder."""

PRODUCTS = {
    "tokenizer": "seed_lightning.tokenizer.module:TokenizerModule",
    "mllm": "seed_lightning.mllm.module:MLLMModule",
}
"""The commands that run a Trainer: name -> the LightningModule class (module:class) their SeedCLI builds."""

USAGE = """usage: seed-lightning COMMAND ...

commands:
  tokenizer {fit,validate,evaluate} ...   train / validate / evaluate the SEED tokenizer (LightningCLI)
  extract-tokens ...                      encode image shards once into token shards (the tokenizer's codes per image)
  mllm {fit,validate,evaluate} ...        train / validate / evaluate the multimodal LM on token shards (LightningCLI)
  caption IMAGE                           describe an image with a trained multimodal LM
  vqa IMAGE "QUESTION"                    answer a question about an image
  generate "CAPTION" -o OUT.png           draw an image for a caption (LM codes -> tokenizer -> image decoder)
"""


def product_class(product: str) -> type:
    """The LightningModule class of the Trainer command `product` (a key of PRODUCTS)."""
    module_name, class_name = PRODUCTS[product].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def _inference_parser(command: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"seed-lightning {command}", description=description)
    parser.add_argument("--mllm", default=DEFAULT_MLLM, help="folder of a saved MultimodalLM (merged or adapter)")
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                        help="folder of the SeedTokenizer it was trained with")
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu", help="torch device")
    return parser


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _load_models(args: argparse.Namespace):
    """(MultimodalLM, SeedTokenizer) on args.device, in eval mode; one-line errors for missing folders."""
    from transformers.utils import logging as transformers_logging

    from seed_lightning.mllm.model import MultimodalLM
    from seed_lightning.tokenizer.model import SeedTokenizer

    for option, path in (("--mllm", args.mllm), ("--tokenizer", args.tokenizer)):
        if not os.path.isdir(path):
            raise ConfigError(f"{option} {path} does not exist; train first (make train-mllm) or pass {option} DIR")
    transformers_logging.disable_progress_bar()  # the answer is the only output
    mllm = MultimodalLM.load(args.mllm).to(args.device).eval()
    tokenizer = SeedTokenizer.load(args.tokenizer, map_location=args.device).eval()
    if tokenizer.config.num_codes != mllm.config.num_visual_codes:
        raise ConfigError(f"the tokenizer {args.tokenizer} has {tokenizer.config.num_codes} codes but the LM "
                          f"{args.mllm} knows {mllm.config.num_visual_codes}; pass the tokenizer it was trained with")
    return mllm, tokenizer


def _read_image(path: str):
    """The decoded PIL image at `path` (DataError when it cannot be read as an image)."""
    from PIL import Image

    try:
        image = Image.open(path)
        image.load()
    except (OSError, ValueError, SyntaxError, EOFError) as error:  # UnidentifiedImageError is an OSError
        raise DataError(f"cannot read image {path!r} ({error.__class__.__name__}: {error}); "
                        "pass a JPEG/PNG/WebP file") from None
    return image


def _image_codes(tokenizer, image):
    """Codes [1, 32] of one PIL image."""
    return tokenizer.encode(tokenizer.preprocess([image]).to(next(tokenizer.parameters()).device))


def _non_empty(text: str, what: str) -> str:
    if not text.strip():
        raise ConfigError(f"the {what} is empty; pass some text in quotes")
    return text.strip()


def _caption_command(argv: list[str]) -> None:
    parser = _inference_parser("caption", "Describe an image with a trained SEED multimodal LM.")
    parser.add_argument("image", help="image file")
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--num-beams", type=int, default=1)
    args = parser.parse_args(argv)
    image = _read_image(args.image)
    mllm, tokenizer = _load_models(args)
    print(mllm.caption(_image_codes(tokenizer, image), args.max_new_tokens, args.num_beams)[0])


def _vqa_command(argv: list[str]) -> None:
    parser = _inference_parser("vqa", "Answer a question about an image with a trained SEED multimodal LM.")
    parser.add_argument("image", help="image file")
    parser.add_argument("question", help="the question, in quotes")
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--num-beams", type=int, default=5)
    args = parser.parse_args(argv)
    question = _non_empty(args.question, "question")
    image = _read_image(args.image)
    mllm, tokenizer = _load_models(args)
    print(mllm.answer(_image_codes(tokenizer, image), [question], args.max_new_tokens, args.num_beams)[0])


def _generate_command(argv: list[str]) -> None:
    parser = _inference_parser("generate", "Draw an image for a caption: LM codes -> generation embeddings -> image "
                                           "decoder (Stable Diffusion, or the tiny decoder of the default world).")
    parser.add_argument("caption", help="the caption, in quotes")
    parser.add_argument("-o", "--output", required=True, help="output image file (e.g. out.png)")
    parser.add_argument("--sd", default=DEFAULT_SD, help="image decoder: a Stable Diffusion folder or hub id, or a tiny decoder folder")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (Stable Diffusion)")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the 32 codes")
    parser.add_argument("--top-k", type=int, default=None, help="sample codes among the k most likely")
    args = parser.parse_args(argv)
    caption = _non_empty(args.caption, "caption")
    output_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(output_dir):
        raise ConfigError(f"the folder of -o {args.output} does not exist; create it or choose another path")
    from seed_lightning.core.preflight import is_hub_id

    if not is_hub_id(args.sd) and not os.path.exists(os.path.expanduser(args.sd)):
        raise ConfigError(f"--sd {args.sd} does not exist; run make data or pass a Stable Diffusion folder/hub id")
    import torch

    from seed_lightning.tokenizer.image_decoder import ImageDecoder

    mllm, tokenizer = _load_models(args)
    codes = mllm.generate_image_codes([caption], args.temperature, args.top_k, args.seed)
    with torch.no_grad():
        embeddings = tokenizer.decode(codes.to(args.device))
    decoder = ImageDecoder.from_pretrained(args.sd, num_inference_steps=args.steps,
                                           guidance_scale=args.guidance_scale, seed=args.seed)
    decoder(embeddings)[0].save(args.output)
    print(f"image saved to {args.output} (codes: {' '.join(map(str, codes[0].tolist()))})")


def _configure_logging() -> None:
    # Our own logger only (Lightning prints through its own handler); it still propagates, so tools that
    # listen on the root logger (pytest's caplog) see our messages.
    logger = logging.getLogger("seed_lightning")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("SEED_LOG_LEVEL", "INFO"))


INFERENCE_COMMANDS = {"caption": _caption_command, "vqa": _vqa_command, "generate": _generate_command}


# Lightning warnings that are expected here and would only alarm users.
_EXPECTED_WARNINGS = [
    r".*module\(s\) in eval mode.*",  # the frozen towers are in eval mode on purpose
    r".*`IterableDataset` has `__len__` defined.*",  # ShardDataModule's streams split workers exactly
    r".*isinstance\(treespec, LeafSpec\).*",  # a torch deprecation inside Lightning
    r".*overridden `transfer_batch_to_device` in `LightningModule`.*",  # intended: stage 2's cache
    r"LightningCLI's args parameter is intended to run from within Python.*",  # args = argv less the command
    # Val metrics logged without sync_dist are computed from every rank's merged outputs: the same on every rank.
    r".*recommended to use `self.log\('val/.*sync_dist=True\)`.*",
]


def silence_expected_warnings() -> None:
    """Hide the Lightning warnings of `_EXPECTED_WARNINGS` (entry points call it first)."""
    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def _dump_stacks_on_sigusr2() -> None:
    """`kill -USR2 PID` prints the stack of every thread of a run that seems hung (a rank waiting in a collective)."""
    try:  # the process's own stderr: sys.stderr may be a stand-in without a file descriptor (pytest, notebooks)
        faulthandler.register(signal.SIGUSR2, file=sys.__stderr__, all_threads=True)
    except (AttributeError, OSError, ValueError):  # no SIGUSR2 (Windows) or no real stderr: no stack dumps
        pass


def _run(command: str, argv: list[str]) -> None:
    if command in PRODUCTS:
        from seed_lightning.lightning_cli import SeedCLI

        SeedCLI(product_class(command), args=argv)
    elif command == "extract-tokens":
        from seed_lightning.mllm import extract

        extract.main(argv)
    else:
        INFERENCE_COMMANDS[command](argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _dump_stacks_on_sigusr2()
    _configure_logging()
    silence_expected_warnings()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in (*PRODUCTS, "extract-tokens", *INFERENCE_COMMANDS):
        print(f"seed-lightning: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    return run_command("seed-lightning", lambda: _run(command, rest))


if __name__ == "__main__":
    sys.exit(main())
