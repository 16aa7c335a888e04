"""TokenizerModule: what the two training stages of the SEED tokenizer share, as a LightningModule base.

Each stage is its own LightningModule over this base (as open_clip keeps one task class per objective):
- `contrastive.ContrastiveModule` (stage 1): frozen ViT -> Causal Q-Former, image-text contrastive loss;
- `codebook.CodebookModule` (stage 2): ViT + Q-Former frozen, codebook and heads trained.
The YAML's `model.class_path` picks the stage (`seed-lightning tokenizer fit` runs LightningCLI in subclass mode).

The base builds the SeedTokenizer (from its config, or from a checkpoint or exported folder: `init_from`), holds
the frozen parts in their dtype (+ FP8, compilation), tokenises captions, measures val retrieval in both stages,
keeps RNG states in checkpoints and exports the tokenizer at the end of fit.
"""

import logging
from pathlib import Path

import torch
from transformers import AutoTokenizer

from seed_lightning.core.checkpointing import load_checkpoint_data
from seed_lightning.core.config import as_config, plain_hyperparameters
from seed_lightning.core.distributed import gather_objects, merge_by_index
from seed_lightning.core.errors import ConfigError
from seed_lightning.core.fp8 import convert_linears_to_fp8, require_fp8_support
from seed_lightning.core.frozen import FrozenDtype, resolve_frozen_dtype
from seed_lightning.core.optim import AdamWModule, OptimConfig
from seed_lightning.core.preflight import check_pretrained
from seed_lightning.tokenizer.captions import CAPTION_IDS, CAPTION_MASK, CaptionTokens
from seed_lightning.tokenizer.model import SeedTokenizer, SeedTokenizerConfig
from seed_lightning.tokenizer.retrieval import retrieval_recall

log = logging.getLogger(__name__)

STAGE_CLASSES = {
    "contrastive": "seed_lightning.tokenizer.contrastive.ContrastiveModule",
    "codebook": "seed_lightning.tokenizer.codebook.CodebookModule",
}
"""The class of each stage, by the `stage` name the single TokenizerModule of earlier versions took."""
CHOOSE_A_STAGE = (f"model.class_path: choose a stage, {STAGE_CLASSES['contrastive']} (stage 1) or "
                  f"{STAGE_CLASSES['codebook']} (stage 2), not the TokenizerModule base")


def _check_init_from(init_from: str | None) -> None:
    if init_from is not None and not Path(init_from).exists():
        raise ConfigError(
            f"model.init_from: {init_from} does not exist; run stage 1 first or point it at its last.ckpt"
        )


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


ENCODER_COMPILE_OPTIONS = {"triton.multi_kernel": 1, "fx_graph_cache": False}
"""Inductor options of the frozen ViT encoder's compile. Multi-kernel lets Inductor also try single-pass
(persistent) kernels for the wide LayerNorm/GELU rows and keep the faster (bench/RESULTS.md measures the gain).
Its kernels cannot come back from Inductor's FX graph cache (torch 2.11 + Triton on the H200 image:
`MultiKernelCall` reads `JITFunction._hash_lock`, None after deserialisation, and the compile fails), which a
second compile of the same graph in one process hits, so that cache stays off for the encoder.
"""


class TokenizerModule(AdamWModule):
    """Base of the tokenizer's stage modules; build one of them (`model.class_path`), not this class."""

    trains_codebook = False
    """Whether the codebook and generation head train in this stage, so that codes decode into images."""

    def __init__(
        self,
        model: SeedTokenizerConfig,
        text_tokenizer: str,
        init_from: str | None = None,
        optim: OptimConfig | None = None,
        max_text_length: int = 32,
        export_dir: str | None = None,
        frozen_dtype: FrozenDtype = "auto",
        vision_fp8: bool = False,
        compile: bool = False,
    ):
        """
        Args:
            model: the tokenizer's architecture and the pretrained parts it starts from.
            text_tokenizer: hub id or folder of the BERT tokenizer of the Q-Former's text branch.
            init_from: start from the tokenizer weights of this Lightning checkpoint or exported tokenizer folder
                (stage 2: stage 1's last.ckpt).
            optim: AdamW + warm-up/cosine settings of this stage.
            max_text_length: captions are truncated to this many BERT tokens.
            export_dir: at the end of fit, the tokenizer (weights + config, no Lightning state) is
                saved here.
            frozen_dtype: dtype the frozen parts are held and run in (the ViT trunk; in stage 2 also ln_vision
                and the Q-Former): "auto" = bfloat16 under a bf16 Trainer precision, else float32. bf16 halves
                their memory and skips autocast's per-step weight casts.
            vision_fp8: run the frozen ViT's linear layers in FP8 through torchao (e4m3, per-token and per-channel
                scales; `pip install 'seed-lightning[fp8]'`) on GPUs with FP8 tensor cores (H100/H200, Ada), with the
                trunk in bf16; set `compile` too, or the scaling ops cost more than FP8 saves. It changes the ViT's
                output a little (bench/RESULTS.md measures by how much).
            compile: torch.compile the frozen ViT trunk and, in stage 2, the trained codebook layers and heads
                (fewer kernel launches, fused elementwise work; the first steps are slower while it compiles).
        """
        super().__init__()
        if type(self) is TokenizerModule:
            raise ConfigError(CHOOSE_A_STAGE)
        model = as_config(model, SeedTokenizerConfig, "model.model")
        self.optim_config = as_config(optim, OptimConfig, "model.optim")
        # Plain data only, so checkpoints load with torch.load(weights_only=True). The class path and instantiator
        # are saved as LightningCLI saves them: `fit --ckpt_path FILE` rebuilds this stage's class from them.
        # Each stage adds its own arguments (`_save_stage_hyperparameters`).
        self.save_hyperparameters({
            "_class_path": class_path(type(self)),
            "_instantiator": "lightning.pytorch.cli.instantiate_module",
            **plain_hyperparameters(locals(), model=model, optim=self.optim_config),
        })
        self.tokenizer = self._build_tokenizer(model, init_from)
        self.text_tokenizer = AutoTokenizer.from_pretrained(text_tokenizer)
        self.caption_tokens = CaptionTokens(self.text_tokenizer, max_text_length)
        """Tokenises captions: stage 1's training batches in the DataLoader workers (ContrastiveModule.setup)."""
        self._val_outputs: dict[int, dict] = {}
        self._frozen_prepared = False

    def _save_stage_hyperparameters(self, **stage_arguments) -> None:
        self.save_hyperparameters({**self.hparams, **stage_arguments})

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def check_requirements(cls, init_args: dict, stage: str) -> None:
        """A stage class is chosen; the pretrained parts, the text tokenizer and `init_from` exist, and FP8 has
        torchao and a GPU that runs it (see `seed_lightning.core.preflight`)."""
        if cls is TokenizerModule:  # a YAML without model.class_path: the base would fail later, in a parser trace
            raise ConfigError(CHOOSE_A_STAGE)
        model = as_config(init_args["model"], SeedTokenizerConfig, "model.model")
        check_pretrained(model.vision.pretrained, "model.model.vision.pretrained")
        check_pretrained(model.qformer.pretrained, "model.model.qformer.pretrained")
        check_pretrained(init_args["text_tokenizer"], "model.text_tokenizer", marker="tokenizer_config.json")
        _check_init_from(init_args["init_from"])
        if init_args["vision_fp8"]:
            require_fp8_support(None, "model.vision_fp8")

    @classmethod
    def check_checkpoint(cls, hyper_parameters: dict) -> None:
        """A checkpoint of the single TokenizerModule of earlier versions (its hyperparameters name a `stage`) cannot
        be restored by a stage class: one ConfigError line says which class starts from its weights instead."""
        stage = hyper_parameters.get("stage")
        if stage is not None:
            stage_class = STAGE_CLASSES.get(stage, " or ".join(STAGE_CLASSES.values()))
            raise ConfigError(
                f"the checkpoint was saved by the single TokenizerModule of an earlier version (stage {stage!r}), which"
                f" this version cannot resume or validate; start from its weights instead: model.class_path"
                f" {stage_class} with model.init_from set to the checkpoint and no ckpt_path"
            )

    def _build_tokenizer(self, config: SeedTokenizerConfig, init_from: str | None) -> SeedTokenizer:
        if init_from is None:
            return SeedTokenizer.from_config(config)
        _check_init_from(init_from)
        path = Path(init_from)
        if path.is_dir():
            return SeedTokenizer.load(path).train()  # loaded in eval mode; fit keeps modes, and the heads train
        tokenizer = SeedTokenizer.from_config(config)
        state = load_checkpoint_data(path, "model.init_from")["state_dict"]
        own = {k.removeprefix("tokenizer."): v for k, v in state.items() if k.startswith("tokenizer.")}
        missing, unexpected = tokenizer.load_state_dict(own, strict=False)
        if unexpected:
            raise ConfigError(f"model.init_from: {init_from} does not match the model config ({unexpected[:3]}...)")
        log.info("initialised from %s (%d tensors not in it: new in this stage)", init_from, len(missing))
        return tokenizer

    @staticmethod
    def _set_trainable(trainable: list[torch.nn.Module], frozen: list[torch.nn.Module]) -> None:
        for module in frozen:
            module.requires_grad_(False)
        for module in trainable:
            module.requires_grad_(True)

    def _frozen_parts(self) -> list[torch.nn.Module]:
        """The parts held in `frozen_dtype`."""
        raise NotImplementedError

    def _compiled_trained_parts(self) -> list[torch.nn.Module]:
        """Trained parts that `compile` compiles besides the frozen ViT trunk."""
        return []

    def setup(self, stage: str) -> None:
        """Frozen parts to their dtype (+ FP8, compilation) once, before the Trainer moves the module."""
        if self._frozen_prepared:
            return
        self._frozen_prepared = True
        dtype = resolve_frozen_dtype(self.hparams.frozen_dtype, self.trainer.precision)
        for part in self._frozen_parts():
            part.to(dtype)
        encoder = self.tokenizer.vision.model.encoder
        if self.hparams.vision_fp8:
            if self.tokenizer.vision.config.trainable:
                raise ConfigError("model.vision_fp8 needs a frozen ViT; set vision.trainable: false or vision_fp8: false")
            require_fp8_support(self.trainer.strategy.root_device, "model.vision_fp8")
            convert_linears_to_fp8(self.tokenizer.vision)  # the ViT's frozen trunk; the compiled encoder sits inside
        if self.hparams.compile:
            encoder.compile(options=ENCODER_COMPILE_OPTIONS)
            for part in self._compiled_trained_parts():
                part.compile()

    # ---- helpers ------------------------------------------------------------------------------
    def _tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask of `captions`, on this module's device."""
        encoded = self.caption_tokens.encode(captions)
        return encoded[CAPTION_IDS].to(self.device), encoded[CAPTION_MASK].to(self.device)

    def _caption_tokens(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's caption tokens: from the DataLoader workers (ContrastiveModule.setup), else tokenised here (loaders given
        to `fit` directly, e.g. the benches)."""
        if CAPTION_IDS in batch:
            return batch[CAPTION_IDS], batch[CAPTION_MASK]
        return self._tokenize(batch["caption"])

    def _log_skipped_samples(self, batch_size: int) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        for reason, count in (getattr(datamodule, "skipped", None) or {}).items():
            self.log(f"data/skipped_{reason}", float(count), batch_size=batch_size)

    # ---- validation: retrieval in both stages -------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        with torch.no_grad():
            causal = self.tokenizer.causal_embeddings(batch["pixel_values"])
        # Retrieval in both stages: in stage 2 it reports the (frozen) encoder the codes come from.
        image_features = self.tokenizer.qformer.image_features(causal).float().cpu()
        captions = [m.get("captions") or [c] for m, c in zip(batch["meta"], batch["caption"])]
        rows = [{"image": feature, "captions": refs} for feature, refs in zip(image_features, captions)]
        self._validate_embeddings(causal, batch, rows)
        self._val_outputs.update(zip(batch["index"].tolist(), rows))

    def _validate_embeddings(self, causal: torch.Tensor, batch: dict, rows: list[dict]) -> None:
        """The stage's own val work on a batch's causal embeddings; it may add entries to each image's row."""

    def _val_set_metrics(self, rows: list[dict]) -> dict[str, float]:
        """The stage's own metrics over the whole val set (its images' rows, in val order)."""
        return {}

    def on_validation_epoch_end(self) -> None:
        outputs = merge_by_index(gather_objects(self._val_outputs))
        self._val_outputs = {}
        if not outputs:
            return
        rows = [outputs[i] for i in sorted(outputs)]
        metrics = {**self._retrieval(rows), **self._val_set_metrics(rows)}
        for name, value in metrics.items():
            # Every rank computed the same merged numbers; no further reduction needed.
            self.log(f"val/{name}", value, prog_bar=name in ("i2t_R@1", "t2i_R@1"), rank_zero_only=False)

    @torch.no_grad()
    def _retrieval(self, rows: list[dict]) -> dict[str, float]:
        """Image<->text recall over the val set, every reference caption of every image a candidate."""
        texts, owners = [], []
        for image_index, row in enumerate(rows):
            texts.extend(row["captions"])
            owners.extend([image_index] * len(row["captions"]))
        text_features = []
        for start in range(0, len(texts), 256):
            input_ids, attention_mask = self._tokenize(texts[start : start + 256])
            hidden = self.tokenizer.qformer.encode_text(input_ids, attention_mask)
            text_features.append(self.tokenizer.qformer.text_features(hidden).float().cpu())
        image_features = torch.stack([r["image"] for r in rows]).float()
        similarity = image_features @ torch.cat(text_features).t()
        return retrieval_recall(similarity, torch.tensor(owners))

    # ---- checkpoints and export ---------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        hyper_parameters = checkpoint.get("hyper_parameters") or {}
        self.check_checkpoint(hyper_parameters)
        saved = hyper_parameters.get("_class_path")
        if saved not in (None, class_path(type(self))):
            raise ConfigError(
                f"the checkpoint holds a {saved.rpartition('.')[2]}, but the config builds a {type(self).__name__};"
                " pass the config of the checkpoint's stage (its model.class_path)"
            )
        super().on_load_checkpoint(checkpoint)  # the RNG states (AdamWModule)

    def on_fit_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            self.tokenizer.save(self.hparams.export_dir)
            log.info("tokenizer saved to %s", self.hparams.export_dir)
