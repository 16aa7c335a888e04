"""ThroughputCallback: samples/s (images/s), tokens/s, model FLOP/s and MFU of the training loop, logged to the
Trainer's logger as `throughput/*`. Every run has one (`throughput` in the CLI); a config sets `peak_flops`.

The module may define hooks (all optional):
- `throughput_counts(batch) -> (samples, tokens)`: what one batch holds; tokens are the useful
  (non-pad) tokens. Default: samples = rows of the first tensor (or length of the first list) in
  the batch, tokens = samples.
- `flops_per_token() -> float` or `flops_per_sample() -> float`: the module's model FLOPs of one training
  step per useful token / per sample (the MLLM: `linear_flops_per_token`, 6N per trainable and 4N per frozen
  nn.Linear weight).
Without them the FLOPs of a step are measured: the matmuls, convolutions and attention of the first batch of
every epoch (forward and backward as autograd runs them, recomputation included) as
`torch.utils.flop_counter` counts them, per sample; that batch is left out of the timing. With `peak_flops`
given, MFU = achieved model FLOP/s per device / `peak_flops`.

Timing is wall-clock between log points, with the device synchronised only there, so the
callback itself does not stall the GPU pipeline between log points. Rates are per device (each
rank measures its own batches; rank 0 logs its own).
"""

import time
from collections.abc import Mapping

import lightning as L
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from seed_lightning.core.errors import ConfigError


def linear_flops_per_token(model: nn.Module) -> tuple[float, float]:
    """(training FLOPs per token, matmul params) over every nn.Linear: 6N for trainable weights
    (forward + input and weight gradients), 4N for frozen ones that still pass gradients through
    (forward + input gradient). Embedding lookups and attention scores are not counted."""
    flops = params = 0.0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            n = module.in_features * module.out_features
            params += n
            flops += (6 if module.weight.requires_grad else 4) * n
    return flops, params


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
        log_every_n_steps: int | None = None,
        skip_first_steps: int = 2,
        prefix: str = "throughput/",
    ):
        """
        Args:
            peak_flops: peak FLOP/s of ONE device for the precision in use (H100/H200 SXM bf16 dense:
                989e12 by the datasheet, ~790e12 measured on random data); None logs no MFU.
            log_every_n_steps: training batches per measurement window (= per logged point); None: the
                Trainer's log_every_n_steps.
            skip_first_steps: batches ignored at the start (compilation, allocator warm-up).
            prefix: name prefix of the logged metrics.
        """
        if (log_every_n_steps is not None and log_every_n_steps < 1) or skip_first_steps < 0:
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
        self._measured_per_sample: float | None = None
        self._measure_next = False
        self._counter: FlopCounterMode | None = None

    def on_train_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        self._reset()
        self._every = self.log_every_n_steps or trainer.log_every_n_steps

    @staticmethod
    def _states_flops(pl_module: "L.LightningModule") -> bool:
        return hasattr(pl_module, "flops_per_token") or hasattr(pl_module, "flops_per_sample")

    def on_train_epoch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        # Measured anew each epoch: what a step runs changes between epochs (stage 2 reads its embedding cache
        # from the second on).
        self._measure_next = not self._states_flops(pl_module)

    def on_train_batch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule", batch, batch_idx: int) -> None:
        if self._measure_next and self._seen >= self.skip_first_steps:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def _stop_counting(self) -> float:
        flops = self._counter.get_total_flops()
        self._counter.__exit__(None, None, None)
        self._counter = None
        return float(flops)

    def on_exception(self, trainer: "L.Trainer", pl_module: "L.LightningModule", exception: BaseException) -> None:
        if self._counter is not None:
            self._stop_counting()

    @staticmethod
    def _synchronize(pl_module: "L.LightningModule") -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def _batch_flops(self, pl_module: "L.LightningModule", samples: int, tokens: int) -> float | None:
        if hasattr(pl_module, "flops_per_token"):
            return float(pl_module.flops_per_token()) * tokens
        if hasattr(pl_module, "flops_per_sample"):
            return float(pl_module.flops_per_sample()) * samples
        if self._measured_per_sample is not None:
            return self._measured_per_sample * samples
        return None

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule", outputs, batch, batch_idx: int) -> None:
        self._seen += 1
        counts = getattr(pl_module, "throughput_counts", default_counts)
        if self._counter is not None:  # a measured batch: counting slowed it, so it opens the window instead
            samples, _ = counts(batch)
            self._measured_per_sample = self._stop_counting() / samples
            self._measure_next = False
            self._synchronize(pl_module)
            self._window_start = time.perf_counter()
            self._samples = self._tokens = 0
            self._flops = 0.0
            return
        if self._seen < self.skip_first_steps:
            return
        if self._window_start is None:  # the window opens at the end of the last skipped batch
            self._synchronize(pl_module)
            self._window_start = time.perf_counter()
            return
        samples, tokens = counts(batch)
        flops = self._batch_flops(pl_module, samples, tokens)
        self._samples += samples
        self._tokens += tokens
        self._flops = None if flops is None or self._flops is None else self._flops + flops
        if (self._seen - self.skip_first_steps) % self._every:
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
