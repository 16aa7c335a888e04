import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from seed_lightning.tokenizer.losses import contrastive_loss, cosine_reconstruction_loss


def test_contrastive_loss_matches_hand_computation():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(4, 8), dim=-1)
    txt = F.normalize(torch.randn(4, 8), dim=-1)
    temp = torch.tensor(0.07)
    logits = img @ txt.t() / temp
    target = torch.arange(4)
    expected = (F.cross_entropy(logits, target, label_smoothing=0.1) + F.cross_entropy(logits.t(), target, label_smoothing=0.1)) / 2
    assert torch.allclose(contrastive_loss(img, txt, temp, 0.1), expected)


def test_contrastive_loss_is_low_for_aligned_pairs():
    torch.manual_seed(0)
    feats = F.normalize(torch.randn(8, 16), dim=-1)
    aligned = contrastive_loss(feats, feats, torch.tensor(0.05), 0.0)
    shuffled = contrastive_loss(feats, feats.roll(1, 0), torch.tensor(0.05), 0.0)
    assert aligned < 0.1 < shuffled


def test_cosine_reconstruction_loss():
    x = torch.randn(2, 3, 4)
    assert cosine_reconstruction_loss(x, x).abs() < 1e-6
    assert torch.isclose(cosine_reconstruction_loss(x, -x), torch.tensor(2.0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    img_all = F.normalize(torch.randn(4, 8), dim=-1)
    txt_all = F.normalize(torch.randn(4, 8), dim=-1)
    img = img_all[2 * rank : 2 * rank + 2].clone().requires_grad_(True)
    txt = txt_all[2 * rank : 2 * rank + 2].clone().requires_grad_(True)
    loss = contrastive_loss(img, txt, torch.tensor(0.1), 0.1)
    # DDP averages over ranks; the gather's backward sums every rank's loss terms into this slice.
    (loss / 2).backward()
    out[rank] = (loss.item(), img.grad.clone())
    dist.destroy_process_group()


@pytest.mark.slow
def test_negatives_are_gathered_across_two_ranks_with_gradients():
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_two_rank_worker, args=(_free_port(), out), nprocs=2, join=True)
    torch.manual_seed(0)
    img_all = F.normalize(torch.randn(4, 8), dim=-1).requires_grad_(True)
    txt_all = F.normalize(torch.randn(4, 8), dim=-1)
    # Each rank scores its 2 rows against all 4 columns: the mean of the two ranks' losses is the
    # full-batch loss, and the gradient of rank r's rows includes the other rank's loss terms.
    full = contrastive_loss(img_all, txt_all, torch.tensor(0.1), 0.1)
    assert (out[0][0] + out[1][0]) / 2 == pytest.approx(full.item(), rel=1e-5)
    full.backward()
    got = torch.cat([out[0][1], out[1][1]])
    assert torch.allclose(got, img_all.grad, atol=1e-6)
