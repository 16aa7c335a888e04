"""ThroughputCallback: samples/s, tokens/s and MFU of the training loop, logged to the Trainer's logger.

The module may define hooks (all optional):
- `throughput_counts(batch) -> (samples, tokens)`: what one batch holds; tokens are the useful
  (non-pad) tokens. Default: samples = rows of the first tensor (or length of the first list) in
  the batch, tokens = samples.
- `flops_per_sample() -> float` or `flops_per_token() -> float`: model FLOPs of one training step
  per sample / per useful token (forward + backward, frozen parts forward only). With `peak_flops`
  given, MFU = achieved model FLOP/s per device / `peak_flops`.

Timing is wall-clock between log points, with the device synchronised only there, so the
callback itself does not stall the GPU pipeline between log points. Rates are per device (each
rank measures its own batches; rank 0 logs its own).
"""

import time
from collections.abc import Mapping

import lightning as L
import torch

from seed_lightning.core.errors import ConfigError


def default_counts(batch) -> tuple[int, int]:
    """(samples, tokens) of a batch without a module hook: rows of its first tensor or list."""
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else [batch]
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return value.shape[0], value.shape[0]
        if isinstance(value, (list, tuple)):
            return len(value), len(value)
    raise ConfigError("ThroughputCallback cannot count samples in this batch; define throughput_counts(batch) on the module")


class ThroughputCallback(L.Callback):
    def __init__(
        self,
        peak_flops: float | None = None,
        log_every_n_steps: int = 10,
        skip_first_steps: int = 2,
        prefix: str = "throughput/",
    ):
        """
        Args:
            peak_flops: peak FLOP/s of ONE device for the precision in use (H100/H200 SXM bf16 dense:
                989e12 by the datasheet, ~790e12 measured on random data); None logs no MFU.
            log_every_n_steps: training batches per measurement window (= per logged point).
            skip_first_steps: batches ignored at the start (compilation, allocator warm-up).
            prefix: name prefix of the logged metrics.
        """
        if log_every_n_steps < 1 or skip_first_steps < 0:
            raise ConfigError("ThroughputCallback: log_every_n_steps must be >= 1 and skip_first_steps >= 0")
        if peak_flops is not None and peak_flops <= 0:
            raise ConfigError(f"ThroughputCallback: peak_flops must be positive FLOP/s, got {peak_flops}")
        self.peak_flops = peak_flops
        self.log_every_n_steps = log_every_n_steps
        self.skip_first_steps = skip_first_steps
        self.prefix = prefix
        self.history: list[dict[str, float]] = []
        """Every logged point (also kept when no logger is attached, e.g. for benchmarks)."""
        self._reset()

    def _reset(self) -> None:
        self._seen = 0
        self._window_start: float | None = None
        self._samples = self._tokens = 0
        self._flops = 0.0

    def on_train_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        self._reset()

    @staticmethod
    def _synchronize(pl_module: "L.LightningModule") -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def _batch_flops(self, pl_module: "L.LightningModule", samples: int, tokens: int) -> float | None:
        if hasattr(pl_module, "flops_per_token"):
            return float(pl_module.flops_per_token()) * tokens
        if hasattr(pl_module, "flops_per_sample"):
            return float(pl_module.flops_per_sample()) * samples
        return None

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule", outputs, batch, batch_idx: int) -> None:
        self._seen += 1
        if self._seen < self.skip_first_steps:
            return
        if self._window_start is None:  # the window opens at the end of the last skipped batch
            self._synchronize(pl_module)
            self._window_start = time.perf_counter()
            return
        counts = getattr(pl_module, "throughput_counts", default_counts)
        samples, tokens = counts(batch)
        flops = self._batch_flops(pl_module, samples, tokens)
        self._samples += samples
        self._tokens += tokens
        self._flops = None if flops is None or self._flops is None else self._flops + flops
        if (self._seen - self.skip_first_steps) % self.log_every_n_steps:
            return
        self._synchronize(pl_module)
        now = time.perf_counter()
        metrics = self._window_metrics(now - self._window_start)
        self.history.append(metrics)
        if trainer.is_global_zero:  # straight to the loggers: one point per window, not repeated every step
            for logger in trainer.loggers:
                logger.log_metrics({self.prefix + k: v for k, v in metrics.items()}, step=trainer.global_step)
        self._window_start = now
        self._samples = self._tokens = 0
        self._flops = 0.0

    def _window_metrics(self, elapsed: float) -> dict[str, float]:
        """Per-device rates of one window."""
        metrics = {"samples_per_sec": self._samples / elapsed, "tokens_per_sec": self._tokens / elapsed}
        if self._flops is not None:
            metrics["flops_per_sec"] = self._flops / elapsed
            if self.peak_flops is not None:
                metrics["mfu"] = metrics["flops_per_sec"] / self.peak_flops
        return metrics
