"""seed-lightning: the SEED image tokenizer and multimodal LLM, trained with PyTorch Lightning."""

__version__ = "0.1.0"
