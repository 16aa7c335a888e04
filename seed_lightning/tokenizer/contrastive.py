"""ContrastiveModule: stage 1 of the SEED tokenizer.

Frozen ViT -> Causal Q-Former, image-text contrastive loss (ITC) between the LAST causal query and the text
[CLS]; trains the Q-Former, its queries and text branch, ln_vision, both projections and the temperature.
"""

import torch

from seed_lightning.tokenizer.losses import contrastive_loss
from seed_lightning.tokenizer.module import TokenizerModule


class ContrastiveModule(TokenizerModule):
    def __init__(self, *, temperature: float = 0.07, label_smoothing: float = 0.1, **kwargs):
        """
        Args:
            temperature: initial ITC temperature (learned, clamped to [0.001, 0.5]).
            label_smoothing: label smoothing of the ITC cross-entropies.
            **kwargs: the arguments of `TokenizerModule` (model, text_tokenizer, optim, ...).
        """
        super().__init__(**kwargs)
        self._save_stage_hyperparameters(temperature=temperature, label_smoothing=label_smoothing)
        self.temperature = torch.nn.Parameter(torch.tensor(float(temperature)))
        t = self.tokenizer
        # The codebook side waits for stage 2. The ViT trunk and ln_vision train or not by the vision config.
        self._set_trainable(trainable=[t.qformer],
                            frozen=[t.encode_task_layer, t.quantizer, t.decode_task_layer, t.recon_head, t.gen_head])

    def _frozen_parts(self) -> list[torch.nn.Module]:
        vision = self.tokenizer.vision
        if vision.config.trainable:
            return []
        return [vision.model.embeddings, vision.model.encoder]  # ln_vision is trained in stage 1

    def setup(self, stage: str) -> None:
        # The captions of training batches are tokenised in the data module's DataLoader workers.
        datamodule = getattr(self.trainer, "datamodule", None)
        if callable(getattr(datamodule, "connect", None)):
            datamodule.connect(train=self.caption_tokens)
        super().setup(stage)

    def _features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        qformer = self.tokenizer.qformer
        causal = self.tokenizer.causal_embeddings(batch["pixel_values"])
        text_hidden = qformer.encode_text(*self._caption_tokens(batch))
        return qformer.image_features(causal), qformer.text_features(text_hidden)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        batch_size = len(batch["caption"])
        with torch.no_grad():
            self.temperature.clamp_(0.001, 0.5)
        image_features, text_features = self._features(batch)
        loss = contrastive_loss(image_features, text_features, self.temperature, self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/temperature", self.temperature, batch_size=batch_size)
        self._log_skipped_samples(batch_size)
        return loss
