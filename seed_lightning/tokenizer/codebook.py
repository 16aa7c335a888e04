"""CodebookModule: stage 2 of the SEED tokenizer.

ViT + Causal Q-Former frozen, and so is L_gen's target, the SD text encoder: their outputs (causal embeddings
per image, 77 x D text embeddings per caption) are cached on disk after the first visit (`EmbeddingCache`), so
later epochs run neither tower (the DataLoader workers read the cached outputs into the batches: `FrozenOutputs`).
It trains the codebook, its task layers and both heads with vq_weight * L_vq + recon_weight * L_recon + gen_weight *
L_gen, starting from stage 1's checkpoint or exported tokenizer (`init_from`).
"""

import logging
from pathlib import Path
from typing import Literal

import torch

from seed_lightning.core.distributed import ValSetMean
from seed_lightning.core.preflight import check_pretrained
from seed_lightning.tokenizer.embedding_cache import EmbeddingCache
from seed_lightning.tokenizer.frozen_outputs import (
    CAUSAL_EMBEDS,
    GENERATION_TARGETS,
    FrozenOutputs,
    caption_keys,
    image_keys,
)
from seed_lightning.tokenizer.losses import cosine_reconstruction_loss
from seed_lightning.tokenizer.module import TokenizerModule
from seed_lightning.tokenizer.sd_text_encoder import SDTextEncoder

log = logging.getLogger(__name__)

LOSSES = ("loss", "vq", "recon", "gen")


class CodebookModule(TokenizerModule):
    trains_codebook = True

    def __init__(
        self,
        *,
        generation_target: str | None = None,
        vq_weight: float = 5.0,
        recon_weight: float = 2.0,
        gen_weight: float = 1.0,
        codebook_init: Literal["uniform", "data"] = "uniform",
        cache_embeddings: bool = True,
        cache_dir: str | None = None,
        **kwargs,
    ):
        """
        Args:
            generation_target: Stable Diffusion folder/hub id whose CLIP text encoder gives the L_gen
                target (None disables L_gen).
            vq_weight: weight of the codebook loss.
            recon_weight: weight of the causal-embedding reconstruction loss.
            gen_weight: weight of the generation-embedding loss.
            codebook_init: "uniform" keeps the reference U(-1/K, 1/K) codebook init; "data" sets the rows
                to encoder outputs of the first batch (rank 0's, broadcast), which avoids most
                dead codes when data is small.
            cache_embeddings: cache the frozen towers' outputs on disk and reuse them: the causal embeddings
                (32 x 768 fp16, 48 KiB per image) and, with L_gen, the SD text encoder's (77 x 768 fp16,
                118 KiB per distinct caption).
            cache_dir: where the cache lives (default: <run dir>/embedding_cache; L_gen targets in its
                `generation_targets/`).
            **kwargs: the arguments of `TokenizerModule` (model, text_tokenizer, init_from, optim, ...).
        """
        super().__init__(**kwargs)
        self._save_stage_hyperparameters(
            generation_target=generation_target, vq_weight=vq_weight, recon_weight=recon_weight,
            gen_weight=gen_weight, codebook_init=codebook_init, cache_embeddings=cache_embeddings, cache_dir=cache_dir,
        )
        if self.hparams.init_from is None:
            log.warning("CodebookModule without init_from: the Q-Former is untrained")
        self.generation_target = None
        if generation_target is not None and gen_weight > 0:
            self.generation_target = SDTextEncoder.from_pretrained(generation_target)
        t = self.tokenizer
        self._set_trainable(trainable=self._trained_parts(), frozen=[t.vision, t.qformer])
        t.vision.eval()
        t.qformer.eval()
        # A buffer, so a resumed run does not initialise the codebook a second time.
        self.register_buffer("codebook_initialized", torch.tensor(codebook_init == "uniform"))
        self.frozen_outputs: FrozenOutputs | None = None
        """The disk caches of the frozen towers' outputs (`cache_embeddings`), opened by `setup` when fitting."""
        self.val_means = torch.nn.ModuleDict({name: ValSetMean() for name in LOSSES})
        self._codebook_needs_init = False

    @classmethod
    def check_requirements(cls, init_args: dict, stage: str) -> None:
        """The base's requirements, and the generation target when L_gen is on."""
        super().check_requirements(init_args, stage)
        if init_args["gen_weight"] > 0:
            check_pretrained(init_args["generation_target"], "model.generation_target",
                             marker="text_encoder/config.json")

    def _trained_parts(self) -> list[torch.nn.Module]:
        t = self.tokenizer
        return [t.encode_task_layer, t.quantizer, t.decode_task_layer, t.recon_head, t.gen_head]

    def _frozen_parts(self) -> list[torch.nn.Module]:
        if self.tokenizer.vision.config.trainable:
            return [self.tokenizer.qformer]
        return [self.tokenizer.vision, self.tokenizer.qformer]

    def _compiled_trained_parts(self) -> list[torch.nn.Module]:
        return self._trained_parts()

    def train(self, mode: bool = True):
        super().train(mode)
        self.tokenizer.vision.eval()  # frozen encoders stay in eval mode (dropout off)
        self.tokenizer.qformer.eval()
        return self

    # ---- the embedding cache ------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """When fitting with `cache_embeddings`: open the caches (every rank writes its own chunks and reads all) and
        have the data module's DataLoader workers attach them to the training batches."""
        if stage == "fit" and self.hparams.cache_embeddings:
            directory = Path(self.hparams.cache_dir or Path(self.trainer.default_root_dir) / "embedding_cache")
            targets = None
            if self.generation_target is not None:
                targets = EmbeddingCache(directory / "generation_targets", rank=self.global_rank)
            self.frozen_outputs = FrozenOutputs(EmbeddingCache(directory, rank=self.global_rank), targets)
            datamodule = getattr(self.trainer, "datamodule", None)
            if callable(getattr(datamodule, "connect", None)):
                datamodule.connect(train=self.frozen_outputs)
        super().setup(stage)

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        """Training batches get the cached outputs that the DataLoader workers did not attach (see `FrozenOutputs`):
        those whose embeddings are all cached travel without their pixels."""
        if self.frozen_outputs is not None and self.trainer.training:
            batch = self.frozen_outputs.attach(batch)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _causal_embeddings(self, batch: dict) -> torch.Tensor:
        """Frozen causal embeddings: from the disk cache when the batch brought them, else computed (and cached)."""
        if CAUSAL_EMBEDS in batch:
            return batch[CAUSAL_EMBEDS].float()
        with torch.no_grad():
            causal = self.tokenizer.causal_embeddings(batch["pixel_values"])
        if self.frozen_outputs is not None:
            self.frozen_outputs.embeddings.put(image_keys(batch), causal)
        return causal.float()

    def _generation_targets(self, batch: dict) -> torch.Tensor:
        """L_gen targets: from the disk cache when the batch brought them, else the SD text encoder's (cached)."""
        if GENERATION_TARGETS in batch:
            return batch[GENERATION_TARGETS].float()
        target = self.generation_target(batch["caption"]).to(self.device)
        if self.frozen_outputs is not None and self.frozen_outputs.targets is not None and self.trainer.training:
            self.frozen_outputs.targets.put(caption_keys(batch["caption"]), target)
        return target.float()

    def _caches(self) -> list[EmbeddingCache]:
        return [] if self.frozen_outputs is None else self.frozen_outputs.caches

    def on_train_epoch_end(self) -> None:
        caches = self._caches()
        for cache in caches:
            cache.flush()
        if caches:
            self.trainer.strategy.barrier()
        for cache in caches:
            cache.refresh()

    def on_fit_end(self) -> None:
        for cache in self._caches():
            cache.flush()
        super().on_fit_end()

    # ---- the objective ------------------------------------------------------------------------
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

    def _losses(self, causal: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        t = self.tokenizer
        quantized = t.quantize(causal)
        decoded = t.decode_task_layer(quantized.z_q)
        losses = {
            "vq": quantized.loss,
            "recon": cosine_reconstruction_loss(t.recon_head(decoded), causal),
        }
        total = self.hparams.vq_weight * losses["vq"] + self.hparams.recon_weight * losses["recon"]
        if self.generation_target is not None:
            target = self._generation_targets(batch)
            losses["gen"] = torch.nn.functional.mse_loss(t.gen_head(decoded).float(), target)
            total = total + self.hparams.gen_weight * losses["gen"]
        losses["loss"] = total
        losses["codes"] = quantized.codes
        return losses

    def on_train_start(self) -> None:
        # Read the buffer once (after any checkpoint restore): a tensor in `if` would sync every step.
        self._codebook_needs_init = not bool(self.codebook_initialized)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        batch_size = len(batch["caption"])
        causal = self._causal_embeddings(batch)
        if self._codebook_needs_init:
            self._init_codebook_from(causal)
            self._codebook_needs_init = False
        losses = self._losses(causal, batch)
        for name in LOSSES:
            if name in losses:
                self.log(f"train/{name}", losses[name], prog_bar=name == "loss", batch_size=batch_size)
        usage = self.tokenizer.quantizer.usage(losses["codes"])
        self.log("train/codebook_perplexity", usage["perplexity"], batch_size=batch_size)
        self._log_skipped_samples(batch_size)
        return losses["loss"]

    # ---- validation: the losses and codebook usage, besides the base's retrieval --------------
    def _validate_embeddings(self, causal: torch.Tensor, batch: dict, rows: list[dict]) -> None:
        losses = self._losses(causal, batch)
        for name in LOSSES:
            if name in losses:  # means over the val images
                self.val_means[name].update(losses[name], len(rows))
                self.log(f"val/{name}", self.val_means[name], prog_bar=name == "loss")
        for row, codes in zip(rows, losses["codes"].cpu()):
            row["codes"] = codes

    def _val_set_metrics(self, rows: list[dict]) -> dict[str, float]:
        usage = self.tokenizer.quantizer.usage(torch.stack([r["codes"] for r in rows]))
        return {"codebook_used_fraction": float(usage["used_fraction"]), "codebook_perplexity": float(usage["perplexity"])}
