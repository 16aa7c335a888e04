"""Retrieval recall on constructed similarity matrices whose ranks are known by hand."""

import pytest
import torch

from seed_lightning.core.errors import DataError
from seed_lightning.tokenizer.retrieval import retrieval_recall


def test_recall_with_several_texts_per_image():
    # 3 images, 6 texts; texts 0,1 -> image 0, texts 2,3 -> image 1, texts 4,5 -> image 2.
    text_to_image = torch.tensor([0, 0, 1, 1, 2, 2])
    similarity = torch.tensor(
        [
            # t0   t1   t2   t3   t4   t5
            [0.9, 0.1, 0.8, 0.0, 0.0, 0.0],  # image 0: best gt text t0 ranks 1st         -> rank 0
            [0.7, 0.0, 0.2, 0.6, 0.5, 0.0],  # image 1: t3 (0.6) behind t0 (0.7)           -> rank 1
            [0.3, 0.4, 0.5, 0.0, 0.1, 0.2],  # image 2: t5 (0.2) behind t2, t1, t0 (t4 gt) -> rank 3
        ]
    )
    # Text -> image ranks (column-wise): t0: img0 0.9 > 0.7 > 0.3 -> 0; t1: 0.1 behind 0.4 -> 1;
    # t2: img1 0.2 behind 0.8, 0.5 -> 2; t3: 0.6 -> 0; t4: img2 0.1 behind 0.5 -> 1; t5: 0.2 -> 0.
    result = retrieval_recall(similarity, text_to_image, ks=(1, 2, 3))
    assert result["i2t_R@1"] == pytest.approx(100 / 3)
    assert result["i2t_R@2"] == pytest.approx(200 / 3)
    assert result["i2t_R@3"] == pytest.approx(200 / 3)
    assert result["t2i_R@1"] == pytest.approx(50.0)
    assert result["t2i_R@2"] == pytest.approx(500 / 6)
    assert result["t2i_R@3"] == pytest.approx(100.0)
    assert result["i2t_mean"] == pytest.approx((100 / 3 + 400 / 3) / 3)
    assert result["t2i_mean"] == pytest.approx((50 + 500 / 6 + 100) / 3)
    assert result["mean_R"] == pytest.approx((result["i2t_mean"] + result["t2i_mean"]) / 2)


def test_default_ks_and_k_beyond_candidate_count():
    generator = torch.Generator().manual_seed(0)
    similarity = torch.randn(4, 4, generator=generator)
    result = retrieval_recall(similarity, torch.arange(4))
    assert set(result) == {
        "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_mean", "t2i_mean", "mean_R",
    }
    # Only 4 candidates per query: every query is within its top 5 and top 10.
    for key in ("i2t_R@5", "i2t_R@10", "t2i_R@5", "t2i_R@10"):
        assert result[key] == 100.0
    diagonal_wins_rows = (similarity.argmax(dim=1) == torch.arange(4)).float().mean().item() * 100
    assert result["i2t_R@1"] == pytest.approx(diagonal_wins_rows)


def test_identity_similarity_is_perfect_and_transposed_roles_swap():
    perfect = retrieval_recall(torch.eye(5), torch.arange(5), ks=(1,))
    assert perfect["i2t_R@1"] == perfect["t2i_R@1"] == perfect["mean_R"] == 100.0
    # A permuted similarity: image i's text is at column (i+1) % 5 but text_to_image says column i.
    shifted = torch.eye(5).roll(1, dims=1)
    assert retrieval_recall(shifted, torch.arange(5), ks=(1,))["mean_R"] == 0.0


def test_ties_count_against_the_model():
    # All scores equal (a collapsed model): each gt is behind every other candidate.
    similarity = torch.zeros(3, 3)
    result = retrieval_recall(similarity, torch.arange(3), ks=(1, 2, 3))
    assert result["i2t_R@1"] == result["t2i_R@1"] == 0.0
    assert result["i2t_R@2"] == result["t2i_R@2"] == 0.0
    assert result["i2t_R@3"] == result["t2i_R@3"] == 100.0
    # Two gt texts tied with each other do not push each other down.
    tied_gts = torch.tensor([[0.5, 0.5, 0.1], [0.0, 0.0, 0.9]])
    assert retrieval_recall(tied_gts, torch.tensor([0, 0, 1]), ks=(1,))["i2t_R@1"] == 100.0


def test_invalid_inputs_raise_data_error():
    with pytest.raises(DataError, match="N_images, N_texts"):
        retrieval_recall(torch.zeros(3), torch.arange(3))
    with pytest.raises(DataError, match="integer tensor"):
        retrieval_recall(torch.zeros(2, 3), torch.arange(2))
    with pytest.raises(DataError, match="image indices"):
        retrieval_recall(torch.zeros(2, 2), torch.tensor([0, 2]))
    with pytest.raises(DataError, match="have no text"):
        retrieval_recall(torch.zeros(3, 2), torch.tensor([0, 1]))
    with pytest.raises(DataError, match="NaN"):
        retrieval_recall(torch.full((2, 2), float("nan")), torch.arange(2))
    with pytest.raises(DataError, match="ks"):
        retrieval_recall(torch.eye(2), torch.arange(2), ks=(0,))
