"""MLLMModule: the SEED multimodal LM trained on token shards (codes + captions), never on pixels.

Every image of a batch becomes one training sequence: image-to-text `<img> codes </img> caption` with
probability `p_image_to_text`, else text-to-image `caption <img> codes </img>`; with `vqa_train` set, an
image that has training questions becomes `<img> codes </img>Question: q Answer: a` with probability
`vqa_train.probability` instead. The sequences are packed into rows of `max_length` tokens with a
block-diagonal causal mask and per-sample position ids (`seed_lightning.mllm.packing`), so a packed
sample computes exactly what it would alone. The DataLoader workers build the rows (`seed_lightning.mllm.rows`:
`setup` hands the module's `RowBuilder` to the data module), so the steps receive ready tensors. The loss
is the mean next-token cross-entropy over every non-pad token (VQA samples: the answer tokens only); its
text-token and image-token parts are logged separately.

Validation computes, for every val image, both directions: `val/caption_loss` (caption tokens given the
image) and `val/image_loss` (the 32 codes given the caption), as token means over the whole val set. Generation
metrics (captions, VQA, images) come from callbacks that use `self.mllm` and `self.seed_tokenizer`.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from seed_lightning.core.config import as_config, plain_hyperparameters
from seed_lightning.core.distributed import ValSetMean
from seed_lightning.core.errors import ConfigError
from seed_lightning.core.frozen import FrozenDtype, resolve_frozen_dtype
from seed_lightning.core.optim import AdamWModule, OptimConfig
from seed_lightning.core.preflight import check_files, check_folder, check_pretrained
from seed_lightning.core.pretrained import WEIGHTS_FILE
from seed_lightning.core.throughput import linear_flops_per_token
from seed_lightning.mllm.loss import chunked_token_losses
from seed_lightning.mllm.model import MultimodalLM, MultimodalLMConfig
from seed_lightning.mllm.packing import IGNORE_INDEX, PackedBatch
from seed_lightning.mllm.rows import CAPTIONING_ROWS, GENERATION_ROWS, ROWS, RowBuilder
from seed_lightning.mllm.vqa import read_vqa
from seed_lightning.tokenizer.model import CONFIG_FILE, SeedTokenizer

log = logging.getLogger(__name__)

SEED_TOKENIZER_PREFIX = "seed_tokenizer."
"""State-dict prefix of the frozen image tokenizer, which checkpoints leave out (it is reloaded from its folder)."""


def mllm_optim_config() -> OptimConfig:
    """The reference SEED-LLaMA/OPT recipe: AdamW(0.9, 0.95), eps 1e-5, wd 0.05, 1.5e-4, 3% warm-up, cosine to 5%."""
    return OptimConfig(lr=1.5e-4, min_lr=1.5e-4 * 0.05, warmup_start_lr=0.0, warmup_ratio=0.03,
                       weight_decay=0.05, betas=(0.9, 0.95), eps=1e-5)


@dataclass
class VQATrainMix:
    """VQAv2-format questions about TRAINING images, mixed into the caption samples."""

    questions: str = ""
    """VQAv2 questions JSON of the training images (e.g. data/synthetic/vqa/questions_train.json)."""
    annotations: str = ""
    """The matching VQAv2 annotations JSON (answers)."""
    probability: float = 0.3
    """Chance that an image with questions is trained as `<img>..</img>Question: q Answer: a` instead of a caption."""


@dataclass
class LossBreakdown:
    """Next-token losses of one batch of rows."""

    loss: torch.Tensor
    """Mean cross-entropy over every target token."""
    text_loss: torch.Tensor
    """Mean over targets that are not visual codes (text, `<img>`/`</img>`, EOS); NaN-free 0 when there are none."""
    image_loss: torch.Tensor
    """Mean over targets that are visual code tokens; 0 when there are none."""
    token_losses: torch.Tensor
    """Per-position loss [R, L] of predicting the token AT that position (0 where not a target)."""
    num_text: int
    num_image: int


class MLLMModule(AdamWModule):
    def __init__(
        self,
        model: MultimodalLMConfig | None = None,
        tokenizer: str | None = None,
        optim: OptimConfig | None = None,
        p_image_to_text: float = 0.5,
        max_length: int = 256,
        packing: bool = True,
        all_captions: bool = True,
        vqa_train: VQATrainMix | None = None,
        sample_seed: int = 0,
        export_dir: str | None = None,
        frozen_dtype: FrozenDtype = "auto",
        compile: bool = False,
    ):
        """
        Args:
            model: the causal LM, its visual vocabulary and LoRA settings.
            tokenizer: folder of the trained SeedTokenizer (SeedTokenizer.save); frozen, used by the generation
                callbacks (image codes -> generation embeddings) and to check the codebook size. None: not loaded.
            optim: AdamW + warm-up/cosine settings (default: the reference recipe, see `mllm_optim_config`).
            p_image_to_text: chance that a caption sample is image-to-text (`<img>..</img> caption`) rather than
                text-to-image (`caption <img>..</img>`).
            max_length: row length in tokens of packed batches (samples longer than this are truncated).
            packing: pack several samples per row (block-diagonal attention); False pads one sample per row.
            all_captions: train on a random one of the image's reference captions (meta "captions") instead of
                only its KEY.txt caption.
            vqa_train: mix in VQA samples for training images that have questions; None trains on captions only.
            sample_seed: seed of the per-batch choice of sample kinds and captions (with the rank and the batch's
                index in the rank's train stream, which is the global step without gradient accumulation).
            export_dir: at the end of fit the LoRA adapter (`adapter/`) and the merged model (`merged/`) are
                saved here.
            frozen_dtype: dtype the LM's frozen weights (all but LoRA and modules_to_save) are held in: "auto" =
                bfloat16 under a bf16 Trainer precision unless the strategy is FSDP (whose flat parameters need
                one dtype), else float32. bf16 halves their memory and skips autocast's per-step weight casts.
            compile: torch.compile each decoder layer of the LM (fuses its elementwise work: LayerNorm, dropout,
                residual adds, LoRA's scaling; the first steps are slower while it compiles).
        """
        super().__init__()
        model = as_config(model, MultimodalLMConfig, "model.model")
        optim = as_config(optim, OptimConfig, "model.optim") if optim is not None else mllm_optim_config()
        vqa_train = as_config(vqa_train, VQATrainMix, "model.vqa_train") if vqa_train is not None else None
        # Plain data only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(plain_hyperparameters(locals(), model=model, optim=optim, vqa_train=vqa_train))
        if not 0 <= p_image_to_text <= 1:
            raise ConfigError(f"model.p_image_to_text must be in [0, 1], got {p_image_to_text}")
        if max_length < model.tokens_per_image + 4:
            raise ConfigError(f"model.max_length={max_length} cannot hold one image span "
                              f"({model.tokens_per_image} codes + markers); raise it (e.g. 256)")
        self.optim_config = optim
        self.seed_tokenizer = self._load_seed_tokenizer(tokenizer, model) if tokenizer else None
        self.mllm = MultimodalLM(model).train()  # from_pretrained returns eval mode; training wants dropout on
        self.row_builder = RowBuilder(
            tokenizer=self.mllm.tokenizer,
            visual=self.mllm.visual,
            bos_id=self.mllm.bos_id,
            eos_id=self.mllm.eos_id,
            pad_id=self.mllm.pad_id,
            max_length=max_length,
            packing=packing,
            p_image_to_text=p_image_to_text,
            all_captions=all_captions,
            vqa_questions=self._load_vqa(vqa_train) if vqa_train is not None else {},
            vqa_probability=vqa_train.probability if vqa_train is not None else 0.0,
            sample_seed=sample_seed,
        )
        """What the DataLoader workers build this module's rows with (see `setup`)."""
        self.val_means = torch.nn.ModuleDict({name: ValSetMean() for name in ("caption_loss", "image_loss", "loss")})
        self._prepared = False

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def check_requirements(cls, init_args: dict, stage: str) -> None:
        """The tokenizer folder, the LM and the VQA training files exist (see `seed_lightning.core.preflight`)."""
        if init_args["tokenizer"] is not None:
            check_folder(init_args["tokenizer"], "model.tokenizer", CONFIG_FILE, WEIGHTS_FILE,
                         how="train the tokenizer first (stage 2 saves it in its model.export_dir) or point "
                             "model.tokenizer at a SeedTokenizer folder")
        model = as_config(init_args["model"], MultimodalLMConfig, "model.model")
        check_pretrained(model.pretrained, "model.model.pretrained")
        check_pretrained(model.tokenizer, "model.model.tokenizer", marker="tokenizer_config.json")
        vqa_train = init_args["vqa_train"]
        if vqa_train is not None:
            check_files("model.vqa_train", vqa_train["questions"] or None, vqa_train["annotations"] or None,
                        how="give the VQAv2 questions/annotations JSON of the training images, or vqa_train: null")

    @staticmethod
    def _load_seed_tokenizer(directory: str, model: MultimodalLMConfig) -> SeedTokenizer:
        seed_tokenizer = SeedTokenizer.load(directory)
        if seed_tokenizer.config.num_codes != model.num_visual_codes:
            raise ConfigError(f"the tokenizer in {directory} has {seed_tokenizer.config.num_codes} codes but "
                              f"model.model.num_visual_codes is {model.num_visual_codes}; make them equal")
        if seed_tokenizer.num_queries != model.tokens_per_image:
            raise ConfigError(f"the tokenizer in {directory} makes {seed_tokenizer.num_queries} codes per image but "
                              f"model.model.tokens_per_image is {model.tokens_per_image}; make them equal")
        return seed_tokenizer.requires_grad_(False).eval()

    @staticmethod
    def _load_vqa(mix: VQATrainMix) -> dict[int, list[tuple[str, str]]]:
        if not (mix.questions and mix.annotations):
            raise ConfigError("model.vqa_train needs both questions and annotations files (VQAv2 JSON of train images)")
        if not 0 <= mix.probability <= 1:
            raise ConfigError(f"model.vqa_train.probability must be in [0, 1], got {mix.probability}")
        by_image: dict[int, list[tuple[str, str]]] = {}
        for record in read_vqa(mix.questions, mix.annotations):
            by_image.setdefault(record.image_id, []).append((record.question, record.multiple_choice_answer))
        log.info("VQA training mix: %d questions about %d images", sum(map(len, by_image.values())), len(by_image))
        return by_image

    def setup(self, stage: str) -> None:
        """Rows built in the data module's workers; frozen weights to their dtype (+ compilation) once, before the
        Trainer moves the module."""
        self._connect_data()
        if self._prepared:
            return
        self._prepared = True
        fsdp = "fsdp" in type(self.trainer.strategy).__name__.lower()
        dtype = resolve_frozen_dtype(self.hparams.frozen_dtype, self.trainer.precision,
                                     single_dtype_shards=fsdp and self.mllm.config.lora is not None)
        for parameter in self.mllm.parameters():
            if not parameter.requires_grad:
                parameter.data = parameter.data.to(dtype)
        if self.hparams.compile:
            for layer in self.mllm.decoder_layers():
                layer.compile()

    def _connect_data(self) -> None:
        """Hand the row builder to the data module, whose DataLoader workers then turn every batch into rows. Without
        a data module (loaders given to `fit` directly) the loaders must yield such rows themselves."""
        datamodule = self.trainer.datamodule
        if datamodule is None:
            return
        if not callable(getattr(datamodule, "connect", None)):
            raise ConfigError(f"{type(datamodule).__name__} cannot build the MLLM's rows in its workers: use "
                              "seed_lightning.core.data.datamodule.ShardDataModule (data.kind: codes)")
        datamodule.connect(train=self.row_builder.train_batch, val=self.row_builder.val_batch)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.seed_tokenizer is not None:  # frozen: no dropout, ever
            self.seed_tokenizer.eval()
        return self

    # ---- steps ---------------------------------------------------------------------------------
    def batch_losses(self, rows: PackedBatch) -> LossBreakdown:
        """Forward rows on this module's device (block-diagonal mask + per-sample positions; the LM head runs a
        chunk of positions at a time, see `seed_lightning.mllm.loss`) and split the loss by token kind."""
        hidden = self.mllm.hidden_states(rows.input_ids, rows.segment_ids, rows.position_ids)
        losses = chunked_token_losses(hidden, self.mllm.output_head, rows.labels)
        # Token counts come with the rows, counted in the workers: counting on the device would stall the host.
        num_text, num_image = rows.num_text_targets, rows.num_image_targets
        targets = rows.labels != IGNORE_INDEX
        image = targets & rows.is_image
        text = targets & ~rows.is_image
        return LossBreakdown(
            loss=losses.sum() / max(1, num_text + num_image),
            text_loss=(losses * text).sum() / max(1, num_text),
            image_loss=(losses * image).sum() / max(1, num_image),
            token_losses=losses,
            num_text=num_text,
            num_image=num_image,
        )

    @staticmethod
    def _rows(batch: dict, name: str) -> PackedBatch:
        if name not in batch:
            raise ConfigError(f"MLLMModule got a batch without {name!r}: its rows are built by the data loaders "
                              "(ShardDataModule connected in setup, or loaders that yield RowBuilder batches)")
        return batch[name]

    # ---- what ThroughputCallback (core/throughput.py) measures --------------------------------------
    def throughput_counts(self, batch: dict) -> tuple[int, int]:
        """Samples and non-pad tokens of a train batch (for `seed_lightning.core.throughput.ThroughputCallback`)."""
        rows = batch[ROWS]
        return rows.num_samples, rows.num_tokens


    def flops_per_token(self) -> float:
        """Model FLOPs of one training step per token: 6N per trainable and 4N per frozen nn.Linear weight (LoRA
        adapters and the LM head included; attention scores and embedding lookups left out)."""
        return linear_flops_per_token(self.mllm.model)[0]

    # ---- Lightning hooks ----------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        rows = self._rows(batch, ROWS)
        losses = self.batch_losses(rows)
        batch_size = rows.num_samples
        self.log("train/loss", losses.loss, prog_bar=True, batch_size=batch_size)
        if losses.num_text:
            self.log("train/text_loss", losses.text_loss, batch_size=batch_size)
        if losses.num_image:
            self.log("train/image_loss", losses.image_loss, batch_size=batch_size)
        self.log("train/rows", float(rows.input_ids.shape[0]), batch_size=batch_size)
        if rows.num_truncated:
            self.log("train/truncated_samples", float(rows.num_truncated), batch_size=batch_size)
        return losses.loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        captioning_rows = self._rows(batch, CAPTIONING_ROWS)
        captioning = self.batch_losses(captioning_rows)
        generation = self.batch_losses(self._rows(batch, GENERATION_ROWS))
        # Caption loss: the caption tokens and EOS after `</img>`, not the (trivial) image markers.
        labels = captioning_rows.labels
        visual = self.mllm.visual
        markers = torch.tensor([visual.begin_image_id, visual.end_image_id], device=labels.device)
        caption_targets = (labels != IGNORE_INDEX) & ~captioning_rows.is_image & ~torch.isin(labels, markers)
        caption_loss = (captioning.token_losses * caption_targets).sum() / caption_targets.sum().clamp(min=1)
        tokens = [captioning.num_text + captioning.num_image, generation.num_text + generation.num_image]
        loss = (captioning.loss * tokens[0] + generation.loss * tokens[1]) / sum(tokens)
        # Token means over the whole val set: each batch's mean weighted by its number of target tokens.
        for name, value, weight in (("caption_loss", caption_loss, caption_targets.sum()),
                                    ("image_loss", generation.image_loss, generation.num_image),
                                    ("loss", loss, sum(tokens))):
            self.val_means[name].update(value, weight)
            self.log(f"val/{name}", self.val_means[name], prog_bar=name == "caption_loss")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The frozen image tokenizer is reloaded from `tokenizer`; do not copy it into every checkpoint.
        state = checkpoint["state_dict"]
        for name in [name for name in state if name.startswith(SEED_TOKENIZER_PREFIX)]:
            del state[name]
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.seed_tokenizer is not None:
            checkpoint["state_dict"].update(self.seed_tokenizer.state_dict(prefix=SEED_TOKENIZER_PREFIX))
        super().on_load_checkpoint(checkpoint)

    def on_fit_end(self) -> None:
        export_dir = self.hparams.export_dir
        if not export_dir or not self.trainer.is_global_zero:
            return
        export_dir = Path(export_dir)
        if self.mllm.config.lora is not None:
            self.mllm.save(export_dir / "adapter")
            log.info("LoRA adapter saved to %s", export_dir / "adapter")
        self.mllm.save_merged(export_dir / "merged")
        log.info("merged model saved to %s (load with MultimodalLM.load)", export_dir / "merged")
