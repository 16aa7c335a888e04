"""Global RNG states in checkpoints, one per rank, so a resumed run draws the same dropout masks.

Lightning does not store them. States are kept as plain tensors/ints (loadable with
torch.load(weights_only=True)).
"""

import random

import numpy as np
import torch

from seed_lightning.core.distributed import gather_objects, world

CHECKPOINT_KEY = "rng_states"


def _collect() -> dict:
    numpy_name, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    version, python_state, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        # This rank's own device only: a process of another layout (one GPU visible per node) has no device 1.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else [],
        "numpy": [numpy_name, torch.from_numpy(numpy_keys.astype(np.int64)), numpy_pos, numpy_has_gauss, numpy_gauss],
        "python": [version, list(python_state), python_gauss],
    }


def _apply(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if isinstance(cuda, list):  # checkpoints before the per-device state: every visible device's, by index
        device = torch.cuda.current_device() if cuda and torch.cuda.is_available() else None
        cuda = cuda[device] if device is not None and device < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, python_state, python_gauss = state["python"]
    random.setstate((version, tuple(python_state), python_gauss))


def save_rng_states(checkpoint: dict) -> None:
    """Call from on_save_checkpoint on every rank (Lightning does): rank r's state lands at index r."""
    checkpoint[CHECKPOINT_KEY] = gather_objects(_collect())


def restore_rng_states(checkpoint: dict) -> None:
    states = checkpoint.get(CHECKPOINT_KEY)
    rank, world_size = world()
    if states and len(states) == world_size:
        _apply(states[rank])
