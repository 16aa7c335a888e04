import torch

from seed_lightning.tokenizer.heads import GenerationHead, GenerationHeadConfig, ReconstructionHead, ReconstructionHeadConfig


def test_reconstruction_head_shape_structure_and_position_embedding():
    torch.manual_seed(0)
    head = ReconstructionHead(ReconstructionHeadConfig(depth=2, num_heads=2), dim=32, num_tokens=6)
    assert len(head.blocks) == 2 and head.pos_embed.shape == (1, 6, 32)
    block = head.blocks[0]
    assert block.mlp.fc1.out_features == 128 and block.layer_norm1.eps == 1e-6 and block.self_attn.qkv.bias is not None
    x = torch.randn(3, 6, 32)
    out = head(x)
    assert out.shape == (3, 6, 32)
    # tokens mix: changing token 0 changes token 5
    x2 = x.clone()
    x2[:, 0] += torch.randn(32)  # not a constant shift: LayerNorm would erase it
    assert (head(x2)[:, 5] - out[:, 5]).abs().amax() > 1e-4
    # the learned position embedding is added to the input
    with torch.no_grad():
        head.pos_embed.normal_()
    assert (head(x) - out).abs().amax() > 1e-4


def test_generation_head_reverse_qformer_layout_and_output():
    torch.manual_seed(0)
    config = GenerationHeadConfig(depth=1, num_heads=2, qformer_layers=4, num_queries=7, out_dim=24)
    head = GenerationHead(config, dim=32, num_tokens=6).eval()
    layers = head.reverse_qformer.encoder.layer
    assert [layer.has_cross_attention for layer in layers] == [True, False, True, False]
    assert layers[0].crossattention.attention.key.in_features == 32
    decoded = torch.randn(2, 6, 32)
    out = head(decoded)
    assert out.shape == (2, 7, 24)
    other = decoded.clone()
    other[1] = torch.randn(6, 32)
    changed = head(other)
    torch.testing.assert_close(changed[0], out[0])  # per-sample
    assert (changed[1] - out[1]).abs().amax() > 1e-4


def test_reverse_queries_are_bidirectional():
    torch.manual_seed(0)
    head = GenerationHead(GenerationHeadConfig(depth=1, num_heads=2, qformer_layers=2, num_queries=5, out_dim=8), 32, 6).eval()
    decoded = torch.randn(2, 6, 32)
    with torch.no_grad():
        before = head(decoded)
        head.reverse_queries[0, -1] += torch.randn(32)
        after = head(decoded)
    assert (after[:, 0] - before[:, 0]).abs().amax() > 1e-5  # the first query sees the last one


def test_every_generation_head_parameter_gets_gradient():
    torch.manual_seed(0)
    head = GenerationHead(GenerationHeadConfig(depth=1, num_heads=2, qformer_layers=2, num_queries=5, out_dim=8), 32, 6)
    decoded = torch.randn(2, 6, 32, requires_grad=True)
    head(decoded).pow(2).sum().backward()
    no_grad = [name for name, p in head.named_parameters() if p.grad is None]
    assert no_grad == []
    assert decoded.grad.abs().sum() > 0
