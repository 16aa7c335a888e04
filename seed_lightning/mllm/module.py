"""MLLMModule: the SEED multimodal LM trained on token shards (codes + captions), never on pixels.

Every image of a batch becomes one training sequence: image-to-text `<img> codes </img> caption` with
probability `p_image_to_text`, else text-to-image `caption <img> codes </img>`; with `vqa_train` set, an
image that has training questions becomes `<img> codes </img>Question: q Answer: a` with probability
`vqa_train.probability` instead. The sequences are packed into rows of `max_length` tokens with a
block-diagonal causal mask and per-sample position ids (`seed_lightning.mllm.packing`), so a packed
sample computes exactly what it would alone. The loss is the mean next-token cross-entropy over every
non-pad token (VQA samples: the answer tokens only); its text-token and image-token parts are logged
separately.

Validation computes, for every val image, both directions: `val/caption_loss` (caption tokens given the
image) and `val/image_loss` (the 32 codes given the caption), as token means over the whole val set. Generation
metrics (captions, VQA, images) come from callbacks that use `self.mllm` and `self.seed_tokenizer`.
"""

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from seed_lightning.core.config import as_config, plain_hyperparameters
from seed_lightning.core.data.text import clean_caption
from seed_lightning.core.distributed import ValSetMean
from seed_lightning.core.errors import ConfigError
from seed_lightning.core.frozen import FrozenDtype, resolve_frozen_dtype
from seed_lightning.core.optim import AdamWModule, OptimConfig
from seed_lightning.core.preflight import check_files, check_folder, check_pretrained
from seed_lightning.core.pretrained import WEIGHTS_FILE
from seed_lightning.core.rng import restore_rng_states, save_rng_states
from seed_lightning.core.throughput import linear_flops_per_token
from seed_lightning.mllm.model import MultimodalLM, MultimodalLMConfig
from seed_lightning.mllm.packing import IGNORE_INDEX, PackedBatch, build_sample, pack_samples, pad_batch
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


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy [R, L] of predicting `labels[:, t]` from position t-1 (Hugging Face's unshifted labels).

    Position 0 and IGNORE_INDEX labels get 0.
    """
    shifted = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels.shape[0], -1)
    return F.pad(shifted, (1, 0))


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
            sample_seed: seed of the per-step choice of sample kinds and captions (with the step and rank).
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
        self.vqa_by_image = self._load_vqa(vqa_train) if vqa_train is not None else {}
        self.vqa_probability = vqa_train.probability if vqa_train is not None else 0.0
        self.val_means = torch.nn.ModuleDict({name: ValSetMean() for name in ("caption_loss", "image_loss", "loss")})
        self._batch_tokens = 0
        """Tokens of the last training step's rows, pads left out (ThroughputCallback's tokens/s and MFU)."""
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
        """Frozen weights to their dtype (+ compilation) once, before the Trainer moves the module."""
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

    def train(self, mode: bool = True):
        super().train(mode)
        if self.seed_tokenizer is not None:  # frozen: no dropout, ever
            self.seed_tokenizer.eval()
        return self

    # ---- samples ------------------------------------------------------------------------------
    def _caption_for(self, caption: str, meta: dict, rng: random.Random) -> str:
        references = [clean_caption(text) for text in meta.get("captions") or []] if self.hparams.all_captions else []
        references = [text for text in references if text]
        return rng.choice(references) if references else caption

    def build_samples(
        self, batch: dict, rng: random.Random
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[int]]:
        """One training sequence (input_ids, is_image) per image of a token-shard batch, and per sequence the
        length of its prompt, which gets no loss (0 for caption samples; BOS + image + question for VQA)."""
        mllm = self.mllm
        spans = mllm.visual.image_span(batch["codes"].cpu()).tolist()
        samples, prompt_lengths = [], []
        for span, caption, meta in zip(spans, batch["caption"], batch["meta"], strict=True):
            questions = self.vqa_by_image.get(meta.get("image_id"))
            if questions and rng.random() < self.vqa_probability:
                question, answer = rng.choice(questions)
                # Prompt ids exactly as MultimodalLM.answer builds them, then the answer with its own space.
                prompt = mllm.text_ids(f"Question: {question} Answer:")
                text = prompt + mllm.text_ids(f" {answer}")
                samples.append(build_sample("i2t", text, span, mllm.bos_id, mllm.eos_id))
                # Only the answer is a target: trained on the question too, the LM would continue a bare
                # `<img>..</img>` (the captioning prompt) with "Question:" instead of a caption.
                prompt_lengths.append(1 + len(span) + len(prompt))
                continue
            caption = self._caption_for(caption, meta, rng)
            if rng.random() < self.hparams.p_image_to_text:
                # The tokenizer adds no prefix space: the caption after `</img>` needs its own.
                samples.append(build_sample("i2t", mllm.text_ids(f" {caption}"), span, mllm.bos_id, mllm.eos_id))
            else:
                samples.append(build_sample("t2i", mllm.text_ids(caption), span, mllm.bos_id, mllm.eos_id))
            prompt_lengths.append(0)
        return samples, prompt_lengths

    def collate(
        self, samples: list[tuple[torch.Tensor, torch.Tensor]], prompt_lengths: list[int] | None = None
    ) -> PackedBatch:
        """Pack (or pad) the samples into rows, as configured; the first `prompt_lengths[i]` tokens of sample i
        are not targets."""
        if self.hparams.packing:
            rows = pack_samples(samples, self.hparams.max_length, self.mllm.pad_id)
        else:
            rows = pad_batch(samples, self.mllm.pad_id)
        if prompt_lengths and any(prompt_lengths):
            lengths = torch.tensor([0, *prompt_lengths])  # segment 0 = pads
            rows.labels[rows.position_ids < lengths[rows.segment_ids]] = IGNORE_INDEX
        return rows

    def batch_losses(self, rows: PackedBatch) -> LossBreakdown:
        """Forward the rows (4D block-diagonal mask + per-sample positions) and split the loss by token kind."""
        device = self.device
        output = self.mllm(
            rows.input_ids.to(device),
            attention_mask=rows.attention_mask().to(device),
            position_ids=rows.position_ids.to(device),
        )
        labels = rows.labels.to(device)
        losses = token_losses(output.logits, labels)
        # Token counts from the host copies: counting on the device would stall the host mid-step.
        image_cpu = (rows.labels != IGNORE_INDEX) & rows.is_image
        num_image = int(image_cpu.sum())
        num_text = int((rows.labels != IGNORE_INDEX).sum()) - num_image
        image = image_cpu.to(device)
        text = (labels != IGNORE_INDEX) & ~image
        return LossBreakdown(
            loss=losses.sum() / max(1, num_text + num_image),
            text_loss=(losses * text).sum() / max(1, num_text),
            image_loss=(losses * image).sum() / max(1, num_image),
            token_losses=losses,
            num_text=num_text,
            num_image=num_image,
        )

    # ---- what ThroughputCallback (core/throughput.py) measures --------------------------------------
    def throughput_counts(self, batch: dict) -> tuple[int, int]:
        """(images, tokens the LM ran on: the step's rows less their pads) of the last training batch."""
        return len(batch["caption"]), self._batch_tokens

    def flops_per_token(self) -> float:
        """Model FLOPs of one training step per token: 6N per trainable and 4N per frozen nn.Linear weight (LoRA
        adapters and the LM head included; attention scores and embedding lookups left out)."""
        return linear_flops_per_token(self.mllm.model)[0]

    # ---- Lightning hooks ----------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        rng = random.Random(f"{self.hparams.sample_seed}/{self.global_rank}/{self.global_step}")
        rows = self.collate(*self.build_samples(batch, rng))
        losses = self.batch_losses(rows)
        self._batch_tokens = int((rows.segment_ids > 0).sum())  # host copy: no device sync
        batch_size = len(batch["caption"])
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
        mllm = self.mllm
        spans = mllm.visual.image_span(batch["codes"].cpu()).tolist()
        image_to_text = [build_sample("i2t", mllm.text_ids(f" {c}"), s, mllm.bos_id, mllm.eos_id)
                         for s, c in zip(spans, batch["caption"])]
        text_to_image = [build_sample("t2i", mllm.text_ids(c), s, mllm.bos_id, mllm.eos_id)
                         for s, c in zip(spans, batch["caption"])]
        captioning_rows = self.collate(image_to_text)
        captioning = self.batch_losses(captioning_rows)
        generation = self.batch_losses(self.collate(text_to_image))
        # Caption loss: the caption tokens and EOS after `</img>`, not the (trivial) image markers.
        labels = captioning_rows.labels.to(self.device)
        markers = torch.tensor([mllm.visual.begin_image_id, mllm.visual.end_image_id], device=self.device)
        is_image = captioning_rows.is_image.to(self.device)
        caption_targets = (labels != IGNORE_INDEX) & ~is_image & ~torch.isin(labels, markers)
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
        save_rng_states(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.seed_tokenizer is not None:
            checkpoint["state_dict"].update(self.seed_tokenizer.state_dict(prefix=SEED_TOKENIZER_PREFIX))
        restore_rng_states(checkpoint)

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
