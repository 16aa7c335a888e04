import torch

from seed_lightning.core import rng


class FakeCuda:
    """Stands in for torch.cuda on a CPU machine: `visible` devices, each with its own RNG state."""

    def __init__(self, visible: int, current: int = 0):
        self.states = [torch.tensor([i], dtype=torch.uint8) for i in range(visible)]
        self.current = current

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.states[self.current].clone())
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_state)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: self.states.__setitem__(slice(None), states))

    def set_state(self, state, device="cuda"):
        self.states[self.current] = state.clone()


def test_a_rank_saves_and_restores_only_its_own_device(monkeypatch):
    # Written by rank 1 of one node x 2 GPUs (both devices visible, rank 1 on device 1)...
    writer = FakeCuda(visible=2, current=1)
    writer.install(monkeypatch)
    state = rng._collect()
    assert torch.equal(state["cuda"], torch.tensor([1], dtype=torch.uint8))
    # ...and restored by rank 1 of 2 nodes x 1 GPU, which sees a single device 0 (it crashed with IndexError).
    reader = FakeCuda(visible=1, current=0)
    reader.install(monkeypatch)
    rng._apply(state)
    assert torch.equal(reader.states[0], torch.tensor([1], dtype=torch.uint8))


def test_checkpoints_with_every_device_state_restore_the_current_one(monkeypatch):
    reader = FakeCuda(visible=1, current=0)
    reader.install(monkeypatch)
    old = {**rng._collect(), "cuda": [torch.tensor([7], dtype=torch.uint8), torch.tensor([8], dtype=torch.uint8)]}
    rng._apply(old)
    assert torch.equal(reader.states[0], torch.tensor([7], dtype=torch.uint8))
