"""The SEED multimodal LM: a causal LM (OPT in the paper) whose vocabulary gains the visual codes.

Training sees `caption <img> codes </img>` and `<img> codes </img> caption` sequences (see
`seed_lightning.mllm.packing`); inference captions images, answers questions and samples image codes.

Embedding decisions:
- New rows (visual tokens and any rows added to reach a multiple of 64) start at the mean of the
  text embeddings plus Gaussian noise at 1% of their per-dimension std: the new tokens begin with
  an average logit, so they do not swamp the softmax (Hewitt 2021, "Initializing new word
  embeddings"), yet differ from one another. The noise comes from a fixed seed, so a base model
  rebuilt for `load` gets the same rows as the one that was trained.
- OPT ties its LM head to the input embeddings. With LoRA, `embed_tokens` and `lm_head` in
  `modules_to_save` would give two independent trainable copies; `LoraSettings.tie_embeddings`
  (default) keeps them one shared matrix (peft's `ensure_weight_tying`), as OPT was pretrained,
  with half the trainable embedding parameters and optimizer state.
- Weights load in float32; precision (bf16 etc.) comes from the Trainer, never from this module.
"""

import copy
import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import peft
from peft.tuners.tuners_utils import BaseTunerLayer
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from seed_lightning.core.errors import ConfigError
from seed_lightning.core.io import write_json_atomic
from seed_lightning.core.modes import eval_mode
from seed_lightning.mllm.packing import block_causal_mask
from seed_lightning.mllm.prompts import QUESTION, vqa_prompt
from seed_lightning.mllm.visual_vocab import VisualVocabulary

SAVED_CONFIG_NAME = "seed_mllm.json"
EMBEDDING_ROWS_MULTIPLE = 64
"""Embedding matrices are padded to a multiple of this many rows (tensor-core friendly shapes)."""
NEW_ROW_NOISE_SEED = 0
NEW_ROW_NOISE_SCALE = 0.01
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")


@dataclass
class LoraSettings:
    """LoRA adapters via peft (reference recipe: r 16, alpha 32, dropout 0.05)."""

    r: int = 16
    """Rank of the low-rank update."""
    alpha: int = 32
    """LoRA scaling numerator (update scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA branch input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    """Module names (or dotted name suffixes) that get LoRA adapters; defaults are OPT's attention and MLP projections."""
    modules_to_save: list[str] = field(
        default_factory=lambda: ["embed_tokens", "lm_head", "self_attn_layer_norm", "final_layer_norm"]
    )
    """Modules trained fully and saved with the adapter: embeddings, LM head and OPT's LayerNorms
    (`self_attn_layer_norm`, and `final_layer_norm`, which names both each layer's MLP norm and the decoder's last norm)."""
    tie_embeddings: bool = True
    """Keep the trained embeddings and LM head one shared matrix when the base model ties them (OPT does)."""


@dataclass
class MultimodalLMConfig:
    """What `MultimodalLM` loads and how it is adapted."""

    pretrained: str = "facebook/opt-2.7b"
    """Hub id or local folder of any AutoModelForCausalLM (default: the paper's)."""
    tokenizer: str | None = None
    """Hub id or folder of the tokenizer; None uses `pretrained`."""
    num_visual_codes: int = 8192
    """Codebook size of the image tokenizer: one LM token per code."""
    tokens_per_image: int = 32
    """Codes per image (the image tokenizer's number of causal queries)."""
    lora: LoraSettings | None = field(default_factory=LoraSettings)
    """LoRA settings; None fine-tunes every weight."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (non-reentrant, so it works with frozen inputs and LoRA)."""
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] = "sdpa"
    """Attention kernel. Packed rows: "sdpa" and "eager" take a dense [R, 1, L, L] mask; "flex_attention"
    (GPU; compiled on first use) takes a block-sparse document mask and skips the blocks between samples."""


class VisualCodesOnly(LogitsProcessor):
    """Masks every token except the visual code tokens, so sampling can only emit image codes."""

    def __init__(self, visual: VisualVocabulary) -> None:
        self.first_id = visual.first_code_id
        self.end_id = visual.end_code_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        masked = torch.full_like(scores, -float("inf"))
        masked[:, self.first_id:self.end_id] = scores[:, self.first_id:self.end_id]
        return masked


class MultimodalLM(nn.Module):
    """Causal LM + visual vocabulary (+ LoRA), with captioning, VQA and image-code generation."""

    def __init__(self, config: MultimodalLMConfig) -> None:
        super().__init__()
        if config.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(f"attn_implementation {config.attn_implementation!r} cannot take packed rows; use one of "
                              f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
        self.config = config
        tokenizer_source = config.tokenizer or config.pretrained
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        except (OSError, ValueError) as error:
            raise ConfigError(f"cannot load a tokenizer from {tokenizer_source!r} ({error}); "
                              "pass a hub id or a folder holding tokenizer files") from None
        if self.tokenizer.eos_token_id is None:
            raise ConfigError(f"the tokenizer of {tokenizer_source!r} has no EOS token; use a causal-LM tokenizer")
        self.visual = VisualVocabulary(config.num_visual_codes)
        tokens_added = self.visual.add_to(self.tokenizer)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                config.pretrained, dtype=torch.float32, attn_implementation=config.attn_implementation
            )
        except (OSError, ValueError) as error:
            raise ConfigError(f"cannot load a causal LM from {config.pretrained!r} ({error}); "
                              "pass a hub id or a folder saved with save_pretrained") from None
        self._fit_embeddings(model, initialise=tokens_added)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.lora is not None:
            model = self._apply_lora(model, config.lora)
        self.model = model

    # ----------------------------------------------------------------------------------- set-up
    def _fit_embeddings(self, model: PreTrainedModel, initialise: bool) -> None:
        """Grow the embeddings to cover the tokenizer; give the visual and padding rows their start values.

        Rows are (re)initialised when the visual tokens were just added or the matrix had to grow;
        a model saved with its visual rows keeps them.
        """
        old_rows = model.get_input_embeddings().weight.shape[0]
        if old_rows < len(self.tokenizer):
            model.resize_token_embeddings(
                len(self.tokenizer), pad_to_multiple_of=EMBEDDING_ROWS_MULTIPLE, mean_resizing=False
            )
            initialise = True
        if not initialise:
            return
        first = self.visual.first_code_id
        generator = torch.Generator().manual_seed(NEW_ROW_NOISE_SEED)
        with torch.no_grad():
            matrices = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
                        if m is not None}
            for weight in matrices.values():
                text_rows = weight[:first].float()
                new_rows = weight.shape[0] - first
                noise = torch.randn(new_rows, weight.shape[1], generator=generator)
                values = text_rows.mean(0) + NEW_ROW_NOISE_SCALE * text_rows.std(0) * noise.to(weight.device)
                weight[first:] = values.to(weight.dtype)

    @staticmethod
    def _apply_lora(model: PreTrainedModel, settings: LoraSettings) -> peft.PeftModel:
        """Wrap `model` with LoRA adapters, checking first that every named module exists."""
        module_names = [name for name, _ in model.named_modules() if name]
        for option, wanted in (("target_modules", settings.target_modules), ("modules_to_save", settings.modules_to_save)):
            for target in wanted:
                if not any(name == target or name.endswith("." + target) for name in module_names):
                    leaves = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                                     if name and not any(module.children())})
                    raise ConfigError(f"LoRA {option} entry {target!r} matches no module of this model; "
                                      f"available leaf modules: {', '.join(leaves)}")
        input_embeddings, output_embeddings = model.get_input_embeddings(), model.get_output_embeddings()
        tied = output_embeddings is not None and output_embeddings.weight is input_embeddings.weight
        lora_config = peft.LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=list(settings.target_modules),
            modules_to_save=list(settings.modules_to_save),
            ensure_weight_tying=settings.tie_embeddings and tied,
            task_type=peft.TaskType.CAUSAL_LM,
        )
        adapted = peft.get_peft_model(model, lora_config)
        # peft casts each adapter's input to the adapter's fp32 dtype: under autocast that is a full fp32 copy of
        # every projection's input per step, which autocast casts straight back to bf16 for the product.
        for module in adapted.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
        return adapted

    # ------------------------------------------------------------------------------ properties
    def decoder_layers(self) -> nn.ModuleList:
        """The base LM's stack of decoder layers (the list with one entry per hidden layer)."""
        base = self.model.get_base_model() if isinstance(self.model, peft.PeftModel) else self.model
        count = base.config.num_hidden_layers
        for module in base.modules():
            if isinstance(module, nn.ModuleList) and len(module) == count:
                return module
        raise ConfigError(f"{type(base).__name__} has no list of {count} decoder layers to compile; set compile: false")

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """bf16/fp16 when some weights are held in it (frozen base weights) beside fp32 ones, else None."""
        dtypes = {p.dtype for p in self.model.parameters() if p.is_floating_point()}
        low = dtypes - {torch.float32}
        return next(iter(low)) if low and len(dtypes) > 1 else None

    @property
    def device(self) -> torch.device:
        """Where the LM's weights live (generation inputs are moved there)."""
        return next(self.model.parameters()).device

    @property
    def bos_id(self) -> int:
        """Start-of-sequence id (OPT: `</s>`); the EOS id when the tokenizer defines no BOS."""
        bos = self.tokenizer.bos_token_id
        return self.eos_id if bos is None else bos

    @property
    def eos_id(self) -> int:
        """End-of-sequence id: ends every training sample and stops caption/answer generation."""
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        """Padding id (never attended to nor trained on); the EOS id when the tokenizer defines no pad."""
        pad = self.tokenizer.pad_token_id
        return self.eos_id if pad is None else pad

    def text_ids(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens (samples and prompts add BOS/EOS themselves)."""
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def trainable_parameter_names(self) -> list[str]:
        """Names of the parameters that receive gradients."""
        return [name for name, parameter in self.model.named_parameters() if parameter.requires_grad]

    # -------------------------------------------------------------------------------- training
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """Logits [B, L, V] (and the mean next-token loss when unshifted `labels` are given).

        `attention_mask` is a 2D padding mask or a 4D bool mask (True = attend), e.g. from
        `PackedBatch.attention_mask()` together with its per-sample `position_ids`.
        """
        if attention_mask is not None and attention_mask.ndim == 4 and self.config.attn_implementation == "eager":
            # Eager attention adds the mask to the scores: True/False -> 0/-inf-like.
            dtype = self.model.get_input_embeddings().weight.dtype
            attention_mask = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill(
                ~attention_mask, torch.finfo(dtype).min
            )
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=False,
        )

    def packed_attention_mask(self, segment_ids: torch.Tensor):
        """The block-diagonal causal mask of packed rows (see `seed_lightning.mllm.packing`), in the form the
        configured attention takes: a dense [R, 1, L, L] bool (sdpa) or additive (eager) mask, or a flex BlockMask."""
        if self.config.attn_implementation == "flex_attention":
            from torch.nn.attention.flex_attention import create_block_mask

            def same_sample_causal(batch, head, query, key):
                # Pads (segment 0) attend to earlier pads of their row: never targets, never attended to.
                return (segment_ids[batch, query] == segment_ids[batch, key]) & (key <= query)

            rows, length = segment_ids.shape
            return create_block_mask(same_sample_causal, rows, None, length, length, device=segment_ids.device)
        if self.config.attn_implementation == "eager":
            return block_causal_mask(segment_ids, self.model.get_input_embeddings().weight.dtype)
        return block_causal_mask(segment_ids)

    def hidden_states(self, input_ids: torch.Tensor, segment_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Last hidden states [R, L, D] of packed rows (the input of `output_head`): each sample sees only itself."""
        base = self.model.get_base_model() if isinstance(self.model, peft.PeftModel) else self.model
        backbone = getattr(base, base.base_model_prefix)
        return backbone(input_ids=input_ids, attention_mask=self.packed_attention_mask(segment_ids),
                        position_ids=position_ids, use_cache=False).last_hidden_state

    @property
    def output_head(self) -> nn.Module:
        """The LM head: hidden states -> vocabulary logits (trained, and tied to the input embeddings for OPT)."""
        return self.model.get_output_embeddings()

    # ------------------------------------------------------------------------------ generation
    def caption(self, codes: torch.Tensor, max_new_tokens: int = 30, num_beams: int = 1) -> list[str]:
        """Describe images given as codes [B, tokens_per_image]: prompt `<img> codes </img>`."""
        prompts = [[self.bos_id, *span] for span in self.visual.image_span(codes).tolist()]
        new_tokens = self._generate(prompts, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def answer(
        self, codes: torch.Tensor, questions: list[str], max_new_tokens: int = 10, num_beams: int = 5,
        batch_size: int | None = None,
    ) -> list[str]:
        """Short answers: prompt `<img> codes </img>Question: {q} Answer:` (`prompts.vqa_prompt`), beam search,
        first sentence kept; at most `batch_size` prompts per generate call (None: no limit)."""
        spans = self.visual.image_span(codes).tolist()
        prompts = [[self.bos_id, *span, *self.text_ids(vqa_prompt(question))]
                   for span, question in zip(spans, questions, strict=True)]
        new_tokens = self._generate(prompts, batch_size, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                    do_sample=False)
        return [short_answer(text) for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def generate_image_codes(
        self, captions: list[str], temperature: float = 1.0, top_k: int | None = None, seed: int | None = None
    ) -> torch.Tensor:
        """Sample `tokens_per_image` codes per caption (prompt `{caption}<img>`) -> LongTensor[B, tokens_per_image]."""
        prompts = [[self.bos_id, *self.text_ids(caption), self.visual.begin_image_id] for caption in captions]
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            new_tokens = self._generate(
                prompts,
                max_new_tokens=self.config.tokens_per_image,
                do_sample=True,
                temperature=temperature,
                top_k=top_k or 0,
                top_p=1.0,
                num_beams=1,
                logits_processor=LogitsProcessorList([VisualCodesOnly(self.visual)]),
            )
        return self.visual.id_to_code(new_tokens.cpu())

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], batch_size: int | None = None, **generate_kwargs) -> torch.Tensor:
        """Run HF generate in eval mode on the prompt ids, at most `batch_size` prompts a call (None: no limit);
        return only the new tokens [B, T] (right-padded with `pad_id`), in prompt order.

        Prompts of one length are generated together, never padded: attention over padded keys rounds
        differently, so a padded prompt's output would depend on its batch-mates.
        """
        by_length: dict[int, list[int]] = {}
        for row, prompt in enumerate(prompts):
            by_length.setdefault(len(prompt), []).append(row)
        new_tokens: list[torch.Tensor | None] = [None] * len(prompts)
        dtype = self.compute_dtype  # mixed-dtype weights run under autocast, as they do in training
        # Compiled layers (a training option) run eagerly here: decoding changes shapes every step.
        with eval_mode(self.model), torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None), \
                torch.compiler.set_stance("force_eager"):
            for length, same_length in by_length.items():
                for start in range(0, len(same_length), batch_size or len(same_length)):
                    rows = same_length[start : start + (batch_size or len(same_length))]
                    input_ids = torch.tensor([prompts[row] for row in rows], dtype=torch.long, device=self.device)
                    output = self.model.generate(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        pad_token_id=self.pad_id,
                        eos_token_id=self.eos_id,
                        **generate_kwargs,
                    )
                    for row, tokens in zip(rows, output[:, length:]):
                        new_tokens[row] = tokens
        return torch.nn.utils.rnn.pad_sequence(new_tokens, batch_first=True, padding_value=self.pad_id)

    # ----------------------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> None:
        """Write what `load` needs: the LoRA adapter (with modules_to_save) or, without LoRA, the full model."""
        if self.config.lora is None:
            self.save_merged(directory)
            return
        directory = Path(directory)
        # The trained embedding rows travel as modules_to_save; peft's save_embedding_layers would add
        # several more full copies of the (resized) embedding matrix.
        self.model.save_pretrained(directory, save_embedding_layers=False)
        self.tokenizer.save_pretrained(directory)
        self._write_saved_config(directory, "adapter", self.config)

    def save_merged(self, directory: str | Path) -> None:
        """Write a plain Hugging Face model (LoRA merged in) + tokenizer, loadable without peft.

        Merging works on a copy so that this module keeps training; the copy costs one model of memory.
        """
        directory = Path(directory)
        # peft unties the saved config itself when the adapter trained separate embedding copies.
        merged = copy.deepcopy(self.model).merge_and_unload() if isinstance(self.model, peft.PeftModel) else self.model
        merged.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        full_config = dataclasses.replace(self.config, pretrained=str(directory), tokenizer=None, lora=None)
        self._write_saved_config(directory, "full", full_config)

    @staticmethod
    def _write_saved_config(directory: Path, weights: str, config: MultimodalLMConfig) -> None:
        record = {"weights": weights, "config": dataclasses.asdict(config)}
        write_json_atomic(directory / SAVED_CONFIG_NAME, record, indent=2)

    @classmethod
    def load(cls, directory: str | Path, trainable: bool = False) -> "MultimodalLM":
        """Rebuild a model written by `save` or `save_merged` (in eval mode unless `trainable`).

        An adapter is applied to its base model `config.pretrained`, which must still be reachable.
        """
        directory = Path(directory)
        record_path = directory / SAVED_CONFIG_NAME
        if not record_path.is_file():
            raise ConfigError(f"{record_path} not found; point at a folder written by MultimodalLM.save or save_merged")
        record = json.loads(record_path.read_text())
        fields = record["config"]
        lora = None if fields["lora"] is None else LoraSettings(**fields["lora"])
        config = MultimodalLMConfig(**{**fields, "lora": lora, "tokenizer": str(directory)})
        if record["weights"] == "adapter":
            module = cls(dataclasses.replace(config, lora=None))
            module.model = peft.PeftModel.from_pretrained(module.model, str(directory), is_trainable=trainable)
            module.config = config
        else:
            module = cls(dataclasses.replace(config, pretrained=str(directory)))
            module.model.requires_grad_(trainable)
        return module.train(trainable)


def short_answer(text: str) -> str:
    """First line and first sentence of a generated answer, stopping before any follow-up "Question:"."""
    line = text.strip().split("\n", 1)[0]
    line = line.split(QUESTION, 1)[0]
    return re.split(r"(?<=[.!?])\s", line.strip(), maxsplit=1)[0].strip()
