import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seed_lightning.mllm.loss import chunked_token_losses, token_losses
from seed_lightning.mllm.packing import IGNORE_INDEX


def test_token_losses_ignore_pads_and_the_first_position():
    logits = torch.randn(1, 4, 10)
    labels = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX, 7]])
    losses = token_losses(logits, labels)
    assert losses[0, 0] == 0 and losses[0, 2] == 0
    torch.testing.assert_close(losses[0, 3], F.cross_entropy(logits[0, 2], torch.tensor(7)))


def random_batch(rows=3, length=9, width=8, vocab=50, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, length, width, generator=generator)
    labels = torch.randint(vocab, (rows, length), generator=generator)
    labels[:, 0] = IGNORE_INDEX
    labels[0, 5:] = IGNORE_INDEX  # a padded tail
    labels[2, 3] = IGNORE_INDEX  # a second sample's first token
    head = nn.Linear(width, vocab, bias=False)
    torch.nn.init.normal_(head.weight, generator=generator)
    return hidden, head, labels


@pytest.mark.parametrize("chunk_tokens", [1, 5, 4096])
def test_losses_and_gradients_equal_those_of_full_logits(chunk_tokens):
    hidden, head, labels = random_batch()
    reference_hidden = hidden.clone().requires_grad_(True)
    reference = token_losses(head(reference_hidden), labels)
    reference.sum().backward()
    reference_weight_grad = head.weight.grad.clone()
    head.weight.grad = None

    hidden.requires_grad_(True)
    losses = chunked_token_losses(hidden, head, labels, chunk_tokens=chunk_tokens)
    losses.sum().backward()
    torch.testing.assert_close(losses, reference)
    assert (losses[labels == IGNORE_INDEX] == 0).all()
    torch.testing.assert_close(hidden.grad, reference_hidden.grad)
    torch.testing.assert_close(head.weight.grad, reference_weight_grad)
    assert hidden.grad[0, 4:].abs().sum() == 0, "positions whose next label is ignored get no gradient"


def test_the_head_sees_at_most_a_chunk_of_positions_at_a_time():
    hidden, head, labels = random_batch()
    seen = []
    head.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    with torch.no_grad():
        chunked_token_losses(hidden, head, labels, chunk_tokens=4)
    assert sum(seen) == labels[:, 1:].numel() and max(seen) == 4


def test_a_batch_without_targets_has_zero_losses():
    hidden, head, labels = random_batch()
    labels[:] = IGNORE_INDEX
    losses = chunked_token_losses(hidden, head, labels)
    assert losses.shape == labels.shape and (losses == 0).all()


def test_chunk_size_must_be_positive():
    hidden, head, labels = random_batch()
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_token_losses(hidden, head, labels, chunk_tokens=0)
