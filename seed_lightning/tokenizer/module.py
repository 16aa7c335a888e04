"""TokenizerModule: the two training stages of the SEED tokenizer as one LightningModule.

stage "contrastive": frozen ViT -> Causal Q-Former, image-text contrastive loss (ITC) between the
    LAST causal query and the text [CLS]; trains the Q-Former, its queries and text branch,
    ln_vision, both projections and the temperature.
stage "codebook": ViT + Q-Former frozen (their causal embeddings cached on disk after the first
    visit); trains the codebook, its task layers and both heads with
    vq_weight * L_vq + recon_weight * L_recon + gen_weight * L_gen.
"""

import logging
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoTokenizer

from seed_lightning.core.checkpointing import load_checkpoint_data
from seed_lightning.core.config import as_config, plain_hyperparameters
from seed_lightning.core.distributed import ValSetMean, gather_objects, merge_by_index
from seed_lightning.core.errors import ConfigError
from seed_lightning.core.fp8 import convert_linears_to_fp8, require_fp8_support
from seed_lightning.core.frozen import FrozenDtype, resolve_frozen_dtype
from seed_lightning.core.optim import AdamWModule, OptimConfig
from seed_lightning.core.preflight import check_pretrained
from seed_lightning.tokenizer.embedding_cache import EmbeddingCache
from seed_lightning.tokenizer.losses import contrastive_loss, cosine_reconstruction_loss
from seed_lightning.tokenizer.model import SeedTokenizer, SeedTokenizerConfig
from seed_lightning.tokenizer.retrieval import retrieval_recall
from seed_lightning.tokenizer.sd_text_encoder import SDTextEncoder

log = logging.getLogger(__name__)

Stage = Literal["contrastive", "codebook"]


def _check_init_from(init_from: str | None) -> None:
    if init_from is not None and not Path(init_from).exists():
        raise ConfigError(
            f"model.init_from: {init_from} does not exist; run stage 1 first or point it at its last.ckpt"
        )


class TokenizerModule(AdamWModule):
    def __init__(
        self,
        model: SeedTokenizerConfig,
        text_tokenizer: str,
        stage: Stage = "contrastive",
        init_from: str | None = None,
        generation_target: str | None = None,
        optim: OptimConfig | None = None,
        temperature: float = 0.07,
        label_smoothing: float = 0.1,
        max_text_length: int = 32,
        vq_weight: float = 5.0,
        recon_weight: float = 2.0,
        gen_weight: float = 1.0,
        codebook_init: Literal["uniform", "data"] = "uniform",
        cache_embeddings: bool = True,
        cache_dir: str | None = None,
        export_dir: str | None = None,
        frozen_dtype: FrozenDtype = "auto",
        vision_fp8: bool = False,
        compile: bool = False,
    ):
        """
        Args:
            model: the tokenizer's architecture and the pretrained parts it starts from.
            text_tokenizer: hub id or folder of the BERT tokenizer of the Q-Former's text branch.
            stage: "contrastive" (stage 1, ITC) or "codebook" (stage 2, VQ + reconstruction + generation).
            init_from: stage 2 starts from this stage-1 Lightning checkpoint or exported tokenizer folder.
            generation_target: Stable Diffusion folder/hub id whose CLIP text encoder gives the L_gen
                target (stage 2; None disables L_gen).
            optim: AdamW + warm-up/cosine settings of this stage.
            temperature: initial ITC temperature (learned, clamped to [0.001, 0.5]).
            label_smoothing: label smoothing of the ITC cross-entropies.
            max_text_length: captions are truncated to this many BERT tokens.
            vq_weight: weight of the codebook loss (stage 2).
            recon_weight: weight of the causal-embedding reconstruction loss (stage 2).
            gen_weight: weight of the generation-embedding loss (stage 2).
            codebook_init: "uniform" keeps the reference U(-1/K, 1/K) codebook init; "data" sets the rows
                to encoder outputs of the first stage-2 batch (rank 0's, broadcast), which avoids most
                dead codes when data is small.
            cache_embeddings: stage 2 caches the frozen causal embeddings on disk and reuses them.
            cache_dir: where the cache lives (default: <run dir>/embedding_cache).
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
        model = as_config(model, SeedTokenizerConfig, "model.model")
        self.optim_config = as_config(optim, OptimConfig, "model.optim")
        # Plain data only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(plain_hyperparameters(locals(), model=model, optim=self.optim_config))
        self.stage = stage
        self.tokenizer = self._build_tokenizer(model, init_from)
        self.text_tokenizer = AutoTokenizer.from_pretrained(text_tokenizer)
        self.temperature = torch.nn.Parameter(torch.tensor(float(temperature)))
        self.generation_target = None
        if stage == "codebook" and generation_target is not None and gen_weight > 0:
            self.generation_target = SDTextEncoder.from_pretrained(generation_target)
        self._freeze_for_stage()
        # A buffer, so a resumed run does not initialise the codebook a second time.
        self.register_buffer("codebook_initialized", torch.tensor(codebook_init == "uniform"))
        self._cache: EmbeddingCache | None = None
        self._val_outputs: dict[int, dict] = {}
        self.val_means = torch.nn.ModuleDict({name: ValSetMean() for name in ("loss", "vq", "recon", "gen")})
        self._frozen_prepared = False
        self._codebook_needs_init = False

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def check_requirements(cls, init_args: dict, stage: str) -> None:
        """The pretrained parts, the text tokenizer, stage 2's start and its generation target exist, and FP8 has
        torchao and a GPU that runs it (see `seed_lightning.core.preflight`)."""
        model = as_config(init_args["model"], SeedTokenizerConfig, "model.model")
        check_pretrained(model.vision.pretrained, "model.model.vision.pretrained")
        check_pretrained(model.qformer.pretrained, "model.model.qformer.pretrained")
        check_pretrained(init_args["text_tokenizer"], "model.text_tokenizer", marker="tokenizer_config.json")
        _check_init_from(init_args["init_from"])
        if init_args["stage"] == "codebook" and init_args["gen_weight"] > 0:
            check_pretrained(init_args["generation_target"], "model.generation_target",
                             marker="text_encoder/config.json")
        if init_args["vision_fp8"]:
            require_fp8_support(None, "model.vision_fp8")

    def _build_tokenizer(self, config: SeedTokenizerConfig, init_from: str | None) -> SeedTokenizer:
        if init_from is None:
            if self.stage == "codebook":
                log.warning("stage 'codebook' without init_from: the Q-Former is untrained")
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

    def _freeze_for_stage(self) -> None:
        t = self.tokenizer
        if self.stage == "contrastive":
            trainable = [t.qformer]
            frozen = self._stage2_trained_parts()
            self.temperature.requires_grad_(True)
        elif self.stage == "codebook":
            trainable = self._stage2_trained_parts()
            frozen = [t.vision, t.qformer]
            self.temperature.requires_grad_(False)
        else:
            raise ConfigError(f"model.stage must be 'contrastive' or 'codebook', got {self.stage!r}")
        for module in frozen:
            module.requires_grad_(False)
        for module in trainable:
            module.requires_grad_(True)
        if self.stage == "codebook":
            t.vision.eval()
            t.qformer.eval()

    def _frozen_parts(self) -> list[torch.nn.Module]:
        vision = self.tokenizer.vision
        if vision.config.trainable:
            return [self.tokenizer.qformer] if self.stage == "codebook" else []
        if self.stage == "codebook":
            return [vision, self.tokenizer.qformer]
        return [vision.model.embeddings, vision.model.encoder]  # ln_vision is trained in stage 1

    def _stage2_trained_parts(self) -> list[torch.nn.Module]:
        t = self.tokenizer
        return [t.encode_task_layer, t.quantizer, t.decode_task_layer, t.recon_head, t.gen_head]

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
            # Multi-kernel lets Inductor also try single-pass (persistent) kernels for the wide LayerNorm/GELU
            # rows and keep the faster; bench/RESULTS.md measures the gain.
            encoder.compile(options={"triton.multi_kernel": 1})
            if self.stage == "codebook":
                for part in self._stage2_trained_parts():
                    part.compile()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.stage == "codebook":  # frozen encoders stay in eval mode (dropout off)
            self.tokenizer.vision.eval()
            self.tokenizer.qformer.eval()
        return self

    # ---- helpers ------------------------------------------------------------------------------
    def _tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.text_tokenizer(
            captions, padding="longest", truncation=True, max_length=self.hparams.max_text_length, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"].to(self.device), "attention_mask": encoded["attention_mask"].to(self.device)}

    def _features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        qformer = self.tokenizer.qformer
        causal = self.tokenizer.causal_embeddings(batch["pixel_values"])
        text = self._tokenize(batch["caption"])
        text_hidden = qformer.encode_text(text["input_ids"], text["attention_mask"])
        return qformer.image_features(causal), qformer.text_features(text_hidden)

    @staticmethod
    def _cache_keys(batch: dict) -> list[str]:
        # Keys repeat across data sets (img2dataset numbers every set from 0): qualify them by shard.
        urls = batch.get("url") or [""] * len(batch["key"])
        return [f"{url}#{key}" for url, key in zip(urls, batch["key"])]

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        """Stage-2 training batches whose embeddings are all cached travel without their pixels."""
        if self._cache is not None and self.trainer.training and "pixel_values" in batch:
            cached = self._cache.get(self._cache_keys(batch))
            if cached is not None:
                batch = {**{k: v for k, v in batch.items() if k != "pixel_values"}, "causal_embeds": cached}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _causal_embeddings(self, batch: dict) -> torch.Tensor:
        """Frozen causal embeddings: from the disk cache when the batch brought them, else computed (and cached)."""
        if "causal_embeds" in batch:
            return batch["causal_embeds"].float()
        with torch.no_grad():
            causal = self.tokenizer.causal_embeddings(batch["pixel_values"])
        if self._cache is not None:
            self._cache.put(self._cache_keys(batch), causal)
        return causal.float()

    @torch.no_grad()
    def _init_codebook_from(self, causal: torch.Tensor) -> None:
        quantizer = self.tokenizer.quantizer
        z = self.tokenizer.encode_task_layer(causal).reshape(-1, quantizer.code_dim).float()
        generator = torch.Generator(device="cpu").manual_seed(0)
        rows = torch.randint(len(z), (quantizer.num_codes,), generator=generator).to(z.device)
        if len(z) >= quantizer.num_codes:
            rows = torch.randperm(len(z), generator=generator)[: quantizer.num_codes].to(z.device)
        # Repeated rows get a little noise so that they can drift apart.
        weight = z[rows] + 1e-3 * z.std() * torch.randn(quantizer.num_codes, quantizer.code_dim, generator=generator).to(z.device)
        weight = self.trainer.strategy.broadcast(weight, src=0)
        quantizer.embedding.weight.copy_(weight.to(quantizer.embedding.weight.dtype))
        self.codebook_initialized.fill_(True)

    def _codebook_losses(self, causal: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
        t = self.tokenizer
        quantized = t.quantize(causal)
        decoded = t.decode_task_layer(quantized.z_q)
        losses = {
            "vq": quantized.loss,
            "recon": cosine_reconstruction_loss(t.recon_head(decoded), causal),
        }
        total = self.hparams.vq_weight * losses["vq"] + self.hparams.recon_weight * losses["recon"]
        if self.generation_target is not None:
            target = self.generation_target(captions).to(self.device)
            losses["gen"] = torch.nn.functional.mse_loss(t.gen_head(decoded).float(), target.float())
            total = total + self.hparams.gen_weight * losses["gen"]
        losses["loss"] = total
        losses["codes"] = quantized.codes
        return losses

    # ---- Lightning hooks ----------------------------------------------------------------------
    def on_train_start(self) -> None:
        # Read the buffer once (after any checkpoint restore): a tensor in `if` would sync every step.
        self._codebook_needs_init = not bool(self.codebook_initialized)

    def on_fit_start(self) -> None:
        if self.stage == "codebook" and self.hparams.cache_embeddings:
            directory = self.hparams.cache_dir or Path(self.trainer.default_root_dir) / "embedding_cache"
            self._cache = EmbeddingCache(directory, rank=self.global_rank)

    def on_train_epoch_end(self) -> None:
        if self._cache is not None:
            self._cache.flush()
            self.trainer.strategy.barrier()
            self._cache.refresh()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        batch_size = len(batch["caption"])
        if self.stage == "contrastive":
            with torch.no_grad():
                self.temperature.clamp_(0.001, 0.5)
            image_features, text_features = self._features(batch)
            loss = contrastive_loss(image_features, text_features, self.temperature, self.hparams.label_smoothing)
            self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
            self.log("train/temperature", self.temperature, batch_size=batch_size)
        else:
            causal = self._causal_embeddings(batch)
            if self._codebook_needs_init:
                self._init_codebook_from(causal)
                self._codebook_needs_init = False
            losses = self._codebook_losses(causal, batch["caption"])
            loss = losses["loss"]
            for name in ("loss", "vq", "recon", "gen"):
                if name in losses:
                    self.log(f"train/{name}", losses[name], prog_bar=name == "loss", batch_size=batch_size)
            usage = self.tokenizer.quantizer.usage(losses["codes"])
            self.log("train/codebook_perplexity", usage["perplexity"], batch_size=batch_size)
        datamodule = getattr(self.trainer, "datamodule", None)
        for reason, count in (getattr(datamodule, "skipped", None) or {}).items():
            self.log(f"data/skipped_{reason}", float(count), batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        batch_size = len(batch["caption"])
        with torch.no_grad():
            causal = self.tokenizer.causal_embeddings(batch["pixel_values"])
        # Retrieval in both stages: in stage 2 it reports the (frozen) encoder the codes come from.
        image_features = self.tokenizer.qformer.image_features(causal).float().cpu()
        captions = [m.get("captions") or [c] for m, c in zip(batch["meta"], batch["caption"])]
        rows = [{"image": feature, "captions": refs} for feature, refs in zip(image_features, captions)]
        if self.stage == "codebook":
            losses = self._codebook_losses(causal, batch["caption"])
            for name in ("loss", "vq", "recon", "gen"):
                if name in losses:  # means over the val images
                    self.val_means[name].update(losses[name], batch_size)
                    self.log(f"val/{name}", self.val_means[name], prog_bar=name == "loss")
            for row, codes in zip(rows, losses["codes"].cpu()):
                row["codes"] = codes
        self._val_outputs.update(zip(batch["index"].tolist(), rows))

    def on_validation_epoch_end(self) -> None:
        outputs = merge_by_index(gather_objects(self._val_outputs))
        self._val_outputs = {}
        if not outputs:
            return
        rows = [outputs[i] for i in sorted(outputs)]
        metrics = self._retrieval(rows)
        if self.stage == "codebook":
            usage = self.tokenizer.quantizer.usage(torch.stack([r["codes"] for r in rows]))
            metrics.update(codebook_used_fraction=float(usage["used_fraction"]), codebook_perplexity=float(usage["perplexity"]))
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
            encoded = self._tokenize(texts[start : start + 256])
            hidden = self.tokenizer.qformer.encode_text(encoded["input_ids"], encoded["attention_mask"])
            text_features.append(self.tokenizer.qformer.text_features(hidden).float().cpu())
        image_features = torch.stack([r["image"] for r in rows]).float()
        similarity = image_features @ torch.cat(text_features).t()
        return retrieval_recall(similarity, torch.tensor(owners))

    def on_fit_end(self) -> None:
        if self._cache is not None:
            self._cache.flush()
        if self.hparams.export_dir and self.trainer.is_global_zero:
            self.tokenizer.save(self.hparams.export_dir)
            log.info("tokenizer saved to %s", self.hparams.export_dir)
