"""The `seed-lightning` command.

    seed-lightning tokenizer fit -c conf/tokenizer/tiny.yaml [--ckpt_path last]
    seed-lightning tokenizer validate -c conf/tokenizer/tiny.yaml --ckpt_path PATH
    seed-lightning extract-tokens --tokenizer DIR --shards PATTERN --out DIR [--prefix train]
    seed-lightning mllm fit -c conf/mllm/tiny.yaml [--ckpt_path last]
    seed-lightning caption IMAGE [--mllm DIR] [--tokenizer DIR]
    seed-lightning vqa IMAGE "QUESTION" [--mllm DIR] [--tokenizer DIR]
    seed-lightning generate "CAPTION" -o out.png [--mllm DIR] [--tokenizer DIR] [--sd DIR]

`tokenizer` and `mllm` are LightningCLIs over TokenizerModule / MLLMModule + ShardDataModule: every
YAML key is a typed argument of those classes or of the Trainer (`--help` lists them with their docstrings).
The tokenizer's YAML picks its stage by `model.class_path` (ContrastiveModule, CodebookModule).
Errors a user can fix (bad config key, missing path, no GPU, ...) print one line and exit 2.
"""

import argparse
import faulthandler
import logging
import os
import signal
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path

from seed_lightning.core.errors import ConfigError, DataError, SeedLightningError

log = logging.getLogger(__name__)

DEFAULT_MLLM = "checkpoints/mllm-tiny/export/merged"
"""Where `make train-mllm` leaves the merged multimodal LM."""
DEFAULT_TOKENIZER = "checkpoints/tokenizer-tiny/seed_tokenizer"
"""Where `make train-tokenizer` leaves the SEED tokenizer."""
DEFAULT_SD = "CompVis/stable-diffusion-v1-4"
"""The paper's Stable Diffusion; `make train-mllm` prints the --sd of the tiny one."""

USAGE = """usage: seed-lightning COMMAND ...

commands:
  tokenizer {fit,validate} ...   train / evaluate the SEED tokenizer (LightningCLI)
  extract-tokens ...             encode image shards once into token shards (the tokenizer's codes per image)
  mllm {fit,validate} ...        train / evaluate the multimodal LM on token shards (LightningCLI)
  caption IMAGE                  describe an image with a trained multimodal LM
  vqa IMAGE "QUESTION"           answer a question about an image
  generate "CAPTION" -o OUT.png  draw an image for a caption (LM codes -> tokenizer -> Stable Diffusion)
"""


def link_data_to_model(parser, model_class: type) -> None:
    """What the data must share with the model is set once, on the model: an MLLM's token shards hold
    `model.model.tokens_per_image` codes per image (its tokenizer's queries), so `data.codes_per_image` follows it."""
    from seed_lightning.mllm.module import MLLMModule

    if issubclass(model_class, MLLMModule):
        parser.link_arguments(
            "model",
            "data.codes_per_image",
            compute_fn=lambda module: module.mllm.config.tokens_per_image,
            apply_on="instantiate",
        )


def subclass_mode(model_class: type) -> bool:
    """Whether the YAML's `model.class_path` picks a subclass of `model_class`: the tokenizer's stages subclass
    TokenizerModule."""
    from seed_lightning.tokenizer.module import TokenizerModule

    return issubclass(model_class, TokenizerModule)


def check_checkpoint_class(model_class: type, ckpt_path: str) -> None:
    """`model_class.check_checkpoint(hyperparameters)`, where it has one, on an explicit checkpoint file: Lightning
    rebuilds the model from those hyperparameters right after parsing, and a checkpoint it cannot rebuild from gets
    one line instead of a parser trace."""
    check = getattr(model_class, "check_checkpoint", None)
    if check is not None and Path(ckpt_path).is_file():
        import torch

        check(torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=True).get("hyper_parameters") or {})


def _run_lightning_cli(model_class, argv: list[str]) -> None:
    import jsonargparse
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    from seed_lightning.core.checkpointing import checked_ckpt_path, checkpoint_dir, resolve_resume_path
    from seed_lightning.core.data.datamodule import ShardDataModule
    from seed_lightning.core.preflight import format_cli_error, preflight_config

    # Dataclass field docstrings become --help text.
    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)

    class RunConfigCallback(SaveConfigCallback):
        """Writes the run's config.yaml (`save_run_config`) once training has started, not at setup: a run
        that fails during setup, checkpoint restore or the sanity check leaves the folder as it was.
        `validate` writes none (it produces no checkpoint)."""

        def setup(self, trainer, pl_module, stage: str) -> None:
            pass

        def on_train_start(self, trainer, pl_module) -> None:
            log_dir = trainer.log_dir  # every rank: it broadcasts
            if trainer.is_global_zero:
                save_run_config(log_dir, self.parser.dump(self.config, skip_none=False))

    class SeedCLI(LightningCLI):
        def parse_arguments(self, parser, args):
            try:
                super().parse_arguments(parser, args)
            except ArgumentError as exc:
                raise ConfigError(format_cli_error(exc, parser)) from None
            ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
            if ckpt_path not in (None, "last"):
                # Lightning reads an explicit file's hyperparameters right after parsing, before any hook.
                checked_ckpt_path(ckpt_path)
                check_checkpoint_class(self.model_class, ckpt_path)

        def add_arguments_to_parser(self, parser) -> None:
            link_data_to_model(parser, self.model_class)

        def before_instantiate_classes(self) -> None:
            # Before the Trainer and the model exist: a missing file or tool fails in seconds, not after
            # minutes of model loading, and Lightning's own multi-line messages never show.
            preflight_config(self.config[self.subcommand], self.model_class, self.datamodule_class, self.subcommand)

        def before_fit(self) -> None:
            ckpt_path = self.config_init["fit"].get("ckpt_path")
            self.config_init["fit"]["ckpt_path"] = resolve_resume_path(ckpt_path, checkpoint_dir(self.trainer))

        def before_validate(self) -> None:
            ckpt_path = self.config_init["validate"].get("ckpt_path")
            self.config_init["validate"]["ckpt_path"] = resolve_resume_path(ckpt_path, checkpoint_dir(self.trainer))

    SeedCLI(
        model_class,
        ShardDataModule,
        args=argv,
        subclass_mode_model=subclass_mode(model_class),
        save_config_callback=RunConfigCallback,
        auto_configure_optimizers=False,
        parser_kwargs={"exit_on_error": False},
    )


RUN_CONFIG = "config.yaml"
"""The resolved config of a training run, in its log directory beside its checkpoints."""


def _run_settings(config_text: str) -> dict | None:
    """A saved config's settings, less `ckpt_path` (resuming changes it); None when it is not readable YAML."""
    import yaml

    try:
        config = yaml.safe_load(config_text)
    except yaml.YAMLError:
        return None
    if isinstance(config, dict):
        config.pop("ckpt_path", None)
    return config


def save_run_config(log_dir: str | os.PathLike, text: str) -> None:
    """Write `text` as `<log_dir>/config.yaml`, keeping an earlier run's different config.

    The config beside a checkpoint must be the one that produced it. The same config again (a resumed
    run; `ckpt_path` may differ) leaves the file as it is. A different one (changed settings on resume,
    or a new run in the same folder) is written after the earlier file is renamed
    `config.<its time>.yaml`, with one info line: the earlier checkpoints keep their config.
    """
    from seed_lightning.core.checkpointing import rename_aside
    from seed_lightning.core.io import atomic_open

    path = Path(log_dir) / RUN_CONFIG
    if path.is_file():
        if _run_settings(path.read_text()) == _run_settings(text):
            return
        kept = rename_aside(path, ".", when=path.stat().st_mtime)
        log.info(f"{path} was written by a run with other settings: kept as {kept.name}.")
    with atomic_open(path, "w") as file:
        file.write(text)


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
    parser = _inference_parser("generate", "Draw an image for a caption: LM codes -> generation embeddings -> SD.")
    parser.add_argument("caption", help="the caption, in quotes")
    parser.add_argument("-o", "--output", required=True, help="output image file (e.g. out.png)")
    parser.add_argument("--sd", default=DEFAULT_SD, help="Stable Diffusion folder or hub id (UNet, VAE, scheduler)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps")
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _dump_stacks_on_sigusr2()
    _configure_logging()
    silence_expected_warnings()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "tokenizer":
            from seed_lightning.tokenizer.module import TokenizerModule

            _run_lightning_cli(TokenizerModule, rest)
        elif command == "mllm":
            from seed_lightning.mllm.module import MLLMModule

            _run_lightning_cli(MLLMModule, rest)
        elif command == "extract-tokens":
            from seed_lightning.mllm import extract

            extract.main(rest)
        elif command in INFERENCE_COMMANDS:
            INFERENCE_COMMANDS[command](rest)
        else:
            print(f"seed-lightning: unknown command {command!r}\n{USAGE}", file=sys.stderr)
            return 2
    except SeedLightningError as error:
        print(f"seed-lightning: error: {error}", file=sys.stderr)
        return getattr(error, "exit_code", 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
