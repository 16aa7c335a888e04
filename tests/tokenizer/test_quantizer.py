import math

import torch

from seed_lightning.tokenizer.quantizer import VectorQuantizer


def quantizer_with_spread_codes(num_codes=64, code_dim=8, beta=0.25) -> VectorQuantizer:
    torch.manual_seed(0)
    quantizer = VectorQuantizer(num_codes, code_dim, beta)
    with torch.no_grad():
        quantizer.embedding.weight.normal_()  # the spec's tiny init puts every code near 0
    return quantizer


def test_init_is_uniform_in_one_over_num_codes():
    torch.manual_seed(0)
    weight = VectorQuantizer(64, 8).embedding.weight
    assert weight.shape == (64, 8)
    assert weight.abs().max() <= 1 / 64 and weight.abs().max() > 0.9 / 64


def test_nearest_code_equals_brute_force():
    quantizer = quantizer_with_spread_codes()
    z = torch.randn(3, 5, 8)
    out = quantizer(z)
    brute = torch.stack([((v - quantizer.embedding.weight) ** 2).sum(-1).argmin() for v in z.reshape(-1, 8)])
    assert out.codes.dtype == torch.long and out.codes.shape == (3, 5)
    assert torch.equal(out.codes.flatten(), brute)
    assert len(out.codes.unique()) > 3
    torch.testing.assert_close(out.z_q, quantizer.embedding.weight[out.codes])
    torch.testing.assert_close(quantizer.lookup(out.codes), quantizer.embedding.weight[out.codes])
    assert out.z is z


def test_distances_stay_fp32_under_bf16_autocast():
    # Codes 0.003 apart around 1: bf16 (spacing 2**-7 there) cannot tell them apart.
    quantizer = VectorQuantizer(num_codes=8, code_dim=1)
    with torch.no_grad():
        quantizer.embedding.weight.copy_(1 + 0.003 * torch.arange(8.0).unsqueeze(1))
    z = (1 + 0.003 * torch.tensor([6.9, 0.2, 3.1, 5.0])).view(1, 4, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = quantizer(z).codes
    assert codes.tolist() == [[7, 0, 3, 5]]


def test_loss_is_codebook_plus_beta_commitment_by_hand():
    quantizer = quantizer_with_spread_codes(beta=0.4)
    z = torch.randn(2, 4, 8)
    out = quantizer(z)
    z_q = quantizer.embedding.weight[out.codes]
    squared = ((z_q - z) ** 2).sum() / z.numel()
    torch.testing.assert_close(out.loss, (1 + 0.4) * squared)


def test_straight_through_gradient_and_codebook_gradient_from_its_term_only():
    quantizer = quantizer_with_spread_codes(beta=0.25)
    z = torch.randn(2, 4, 8, requires_grad=True)
    downstream = torch.randn(2, 4, 8)
    out = quantizer(z)
    (out.loss + (out.z_q * downstream).sum()).backward()

    z_q = quantizer.embedding.weight[out.codes].detach()
    n = z.numel()
    # encoder side: identity through the quantiser (downstream) + the commitment term 2(z - z_q)/n
    torch.testing.assert_close(z.grad, downstream + 2 * (z - z_q).detach() / n)
    # codebook: only beta * 2(z_q - z)/n, summed per code; nothing from the downstream term
    expected = torch.zeros_like(quantizer.embedding.weight)
    expected.index_add_(0, out.codes.flatten(), (0.25 * 2 * (z_q - z.detach()) / n).reshape(-1, 8))
    torch.testing.assert_close(quantizer.embedding.weight.grad, expected)


def test_usage_statistics():
    quantizer = VectorQuantizer(num_codes=8, code_dim=2)
    uniform = quantizer.usage(torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]]))
    assert math.isclose(float(uniform["perplexity"]), 4.0, rel_tol=1e-5)
    assert math.isclose(float(uniform["used_fraction"]), 0.5)
    single = quantizer.usage(torch.full((3, 5), 6))
    assert math.isclose(float(single["perplexity"]), 1.0, rel_tol=1e-5)
    assert math.isclose(float(single["used_fraction"]), 1 / 8)
    skewed = quantizer.usage(torch.tensor([0, 0, 0, 1]))
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert math.isclose(float(skewed["perplexity"]), math.exp(entropy), rel_tol=1e-5)
