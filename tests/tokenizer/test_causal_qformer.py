import pytest
import torch
import torch.nn.functional as F
from tests.core.test_pretrained import tiny_blip2_config
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

from seed_lightning.core.errors import ConfigError
from seed_lightning.tokenizer.causal_qformer import CausalQFormer, CausalQFormerConfig

VISION_WIDTH = 24
TINY = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vocab_size=100, max_text_positions=32, num_queries=6, embed_dim=16)


def tiny_qformer(**overrides) -> CausalQFormer:
    torch.manual_seed(0)
    return CausalQFormer(CausalQFormerConfig(**{**TINY, **overrides}), vision_width=VISION_WIDTH).eval()


def outputs_after_perturbing_query(qformer, image_embeds, j):
    with torch.no_grad():
        before = qformer(image_embeds)
        qformer.query_tokens[0, j] += torch.randn(qformer.config.hidden_size)
        after = qformer(image_embeds)
    return before, after


@pytest.mark.parametrize("j", [0, 2, 5])
def test_query_i_only_sees_queries_up_to_i(j):
    qformer = tiny_qformer()
    before, after = outputs_after_perturbing_query(qformer, torch.randn(2, 5, VISION_WIDTH), j)
    assert before.shape == (2, 6, 32)
    torch.testing.assert_close(after[:, :j], before[:, :j], rtol=0, atol=1e-6)
    assert (after[:, j:] - before[:, j:]).abs().amax(dim=-1).gt(1e-4).all()  # query j and every later one change


def test_bidirectional_switch_lets_earlier_queries_see_later_ones():
    qformer = tiny_qformer(causal=False)
    before, after = outputs_after_perturbing_query(qformer, torch.randn(2, 5, VISION_WIDTH), 5)
    assert (after[:, :5] - before[:, :5]).abs().amax() > 1e-4


def test_image_padding_mask_hides_image_tokens():
    qformer = tiny_qformer()
    image = torch.randn(2, 5, VISION_WIDTH)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    changed = image.clone()
    changed[:, 3:] = torch.randn(2, 2, VISION_WIDTH)
    with torch.no_grad():
        a, b = qformer(image, mask), qformer(changed, mask)
    torch.testing.assert_close(a[0], b[0])
    assert (a[1] - b[1]).abs().amax() > 1e-4


def test_text_branch_and_itc_features():
    qformer = tiny_qformer()
    ids = torch.randint(1, 100, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    other_padding = ids.clone()
    other_padding[0, 4:] = 5
    with torch.no_grad():
        hidden = qformer.encode_text(ids, mask)
        text = qformer.text_features(hidden)
        text_other_padding = qformer.text_features(qformer.encode_text(other_padding, mask))
        image = qformer.image_features(qformer(torch.randn(3, 5, VISION_WIDTH)))
    assert hidden.shape == (3, 7, 32) and text.shape == image.shape == (3, 16)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text_other_padding[0], text[0])  # padding is ignored
    # [CLS] attends to the whole caption: changing its last real token changes the feature
    changed = ids.clone()
    changed[1, -1] = (ids[1, -1] % 99) + 1
    with torch.no_grad():
        assert (qformer.text_features(qformer.encode_text(changed, mask))[1] - text[1]).abs().amax() > 1e-5


def test_image_feature_uses_the_last_query():
    qformer = tiny_qformer()
    causal = torch.randn(2, 6, 32)
    edited = causal.clone()
    edited[:, :-1] = 0
    torch.testing.assert_close(qformer.image_features(edited), qformer.image_features(causal))
    expected = F.normalize(qformer.image_proj(causal[:, -1]), dim=-1)
    torch.testing.assert_close(qformer.image_features(causal), expected)


def test_loads_a_retrieval_checkpoint_and_matches_blip2(tmp_path):
    torch.manual_seed(0)
    hf = Blip2ForImageTextRetrieval(tiny_blip2_config()).eval()
    hf.query_tokens.data.normal_(std=0.5)  # BLIP-2 initialises them to zero
    hf.save_pretrained(tmp_path)

    config = CausalQFormerConfig(pretrained=str(tmp_path), causal=False)
    qformer = CausalQFormer.from_config(config, vision_width=32).eval()
    assert (qformer.config.num_queries, qformer.config.hidden_size, qformer.config.embed_dim) == (8, 32, 16)
    torch.testing.assert_close(qformer.image_proj.weight, hf.vision_projection.weight)

    image = torch.randn(2, 17, 32)
    ids = torch.randint(1, 100, (2, 6))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected_queries = hf.qformer(
            query_embeds=hf.query_tokens.expand(2, -1, -1), encoder_hidden_states=image
        ).last_hidden_state
        torch.testing.assert_close(qformer(image), expected_queries)
        expected_text = hf.qformer(query_embeds=hf.embeddings(ids), query_length=0, attention_mask=mask).last_hidden_state
        expected_text_features = F.normalize(hf.text_projection(expected_text[:, 0]), dim=-1)
        torch.testing.assert_close(qformer.text_features(qformer.encode_text(ids, mask)), expected_text_features)


def test_generation_checkpoint_without_text_branch_loads_the_rest(tmp_path, caplog):
    torch.manual_seed(0)
    hf = Blip2ForConditionalGeneration(tiny_blip2_config(text_branch=False))
    hf.query_tokens.data.normal_()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")

    qformer = CausalQFormer.from_config(CausalQFormerConfig(pretrained=str(tmp_path)), vision_width=32)
    torch.testing.assert_close(qformer.query_tokens, hf.query_tokens)
    hf_layer, layer = hf.qformer.encoder.layer[1], qformer.qformer.encoder.layer[1]
    torch.testing.assert_close(layer.output_query.dense.weight, hf_layer.output_query.dense.weight)
    assert "embeddings.word_embeddings.weight" in caplog.text and "text_proj.weight" in caplog.text


def test_checkpoint_for_another_vision_width_is_rejected(tmp_path):
    Blip2ForImageTextRetrieval(tiny_blip2_config()).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="cross-attends to 32-d image tokens"):
        CausalQFormer.from_config(CausalQFormerConfig(pretrained=str(tmp_path)), vision_width=48)
