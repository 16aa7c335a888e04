import dataclasses

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from seed_lightning.core.errors import ConfigError
from seed_lightning.mllm.model import LoraSettings, MultimodalLM, MultimodalLMConfig, VisualCodesOnly, short_answer
from seed_lightning.mllm.packing import build_sample, pack_samples
from seed_lightning.mllm.prompts import vqa_prompt

NUM_CODES = 64
CAPTIONS = ["a cat sitting on a mat", "a dog running in the park", "two birds on a wire", "what color is the cat"]


@pytest.fixture(scope="module")
def tiny_opt_dir(tmp_path_factory):
    """A byte-level BPE tokenizer (OPT's special tokens) and a random 2-layer OPT, saved like a hub folder."""
    directory = tmp_path_factory.mktemp("tiny-opt")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CAPTIONS * 5, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="</s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                       num_attention_heads=2, max_position_embeddings=128, word_embed_proj_dim=32,
                       pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0, attention_dropout=0.0,
                       init_std=0.3)  # large weights: attention visibly mixes tokens
    OPTForCausalLM(config).save_pretrained(directory)
    return directory


def make_lm(directory, **overrides) -> MultimodalLM:
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    return MultimodalLM(MultimodalLMConfig(pretrained=str(directory), num_visual_codes=NUM_CODES,
                                           **{"lora": lora, **overrides}))


def packed_pair(lm: MultimodalLM, first_caption: str, second_caption: str):
    """A t2i and an i2t sample packed into one row -> (samples, batch, segment ids in row order)."""
    torch.manual_seed(1)
    codes = torch.randint(0, NUM_CODES, (2, 32))
    samples = [
        build_sample("t2i", lm.text_ids(first_caption), lm.visual.image_span(codes[0]).tolist(), lm.bos_id, lm.eos_id),
        build_sample("i2t", lm.text_ids(second_caption), lm.visual.image_span(codes[1]).tolist(), lm.bos_id, lm.eos_id),
    ]
    batch = pack_samples(samples, max_length=128, pad_id=lm.pad_id)
    assert batch.input_ids.shape[0] == 1, "both samples share one row"
    row_order = torch.unique_consecutive(batch.segment_ids[0])
    return samples, batch, row_order[row_order > 0].tolist()


def train_one_step(lm: MultimodalLM) -> None:
    _, batch, _ = packed_pair(lm, CAPTIONS[0], CAPTIONS[1])
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    lm.train()
    lm(batch.input_ids, batch.attention_mask(), batch.position_ids, batch.labels).loss.backward()
    optimizer.step()
    lm.eval()


def segment_logits(lm, batch, segment: int) -> torch.Tensor:
    with torch.no_grad():
        logits = lm(batch.input_ids, batch.attention_mask(), batch.position_ids).logits
    return logits[batch.segment_ids == segment]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_samples_do_not_see_each_other(tiny_opt_dir, attn_implementation):
    lm = make_lm(tiny_opt_dir, attn_implementation=attn_implementation).eval()
    samples, batch, (earlier, later) = packed_pair(lm, CAPTIONS[0], CAPTIONS[1])
    for segment in (earlier, later):
        with torch.no_grad():
            alone = lm(samples[segment - 1][0][None]).logits[0]
        torch.testing.assert_close(segment_logits(lm, batch, segment), alone, atol=1e-5, rtol=1e-5)
    # Replacing the earlier sample's tokens changes its logits but not the later sample's.
    perturbed = dataclasses.replace(batch, input_ids=batch.input_ids.clone())
    earlier_tokens = batch.segment_ids == earlier
    replacement = torch.randint(3, 200, (int(earlier_tokens.sum()),), generator=torch.Generator().manual_seed(0))
    perturbed.input_ids[earlier_tokens] = replacement
    assert (segment_logits(lm, perturbed, earlier) - segment_logits(lm, batch, earlier)).abs().max() > 0.1
    torch.testing.assert_close(segment_logits(lm, perturbed, later), segment_logits(lm, batch, later),
                               atol=1e-5, rtol=1e-5)


def test_plain_causal_attention_would_leak_between_samples(tiny_opt_dir):
    """Guards the test above: without the block mask, the later sample's logits do change."""
    lm = make_lm(tiny_opt_dir).eval()
    _, batch, (_, later) = packed_pair(lm, CAPTIONS[0], CAPTIONS[1])
    with torch.no_grad():
        leaky = lm(batch.input_ids, position_ids=batch.position_ids).logits[batch.segment_ids == later]
    assert (leaky - segment_logits(lm, batch, later)).abs().max() > 0.1


def test_visual_rows_are_added_near_the_text_mean(tiny_opt_dir):
    lm = make_lm(tiny_opt_dir)
    weight = lm.model.get_input_embeddings().weight
    assert weight.shape[0] >= len(lm.tokenizer) and weight.shape[0] % 64 == 0
    first = lm.visual.first_code_id
    text, visual = weight[:first], weight[first:lm.visual.end_image_id + 1]
    assert (visual - text.mean(0)).abs().max() < 0.1 * text.std(0).max()
    assert torch.unique(visual, dim=0).shape[0] == visual.shape[0], "rows must differ from one another"
    # Deterministic: a second build gets the very same rows (what `load` relies on).
    torch.testing.assert_close(make_lm(tiny_opt_dir).model.get_input_embeddings().weight, weight, rtol=0, atol=0)


def test_only_lora_and_modules_to_save_train(tiny_opt_dir):
    lm = make_lm(tiny_opt_dir)
    trainable = set(lm.trainable_parameter_names())
    prefix = "base_model.model.model.decoder."
    expected = {prefix + "embed_tokens.modules_to_save.default.weight",
                prefix + "final_layer_norm.modules_to_save.default.weight",
                prefix + "final_layer_norm.modules_to_save.default.bias"}
    for layer in range(2):
        for projection in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                           "fc1", "fc2"]:
            expected |= {f"{prefix}layers.{layer}.{projection}.lora_{part}.default.weight" for part in "AB"}
        for norm in ["self_attn_layer_norm", "final_layer_norm"]:
            expected |= {f"{prefix}layers.{layer}.{norm}.modules_to_save.default.{kind}" for kind in ["weight", "bias"]}
    assert trainable == expected
    # The LM head stays tied to the trained embedding copy.
    assert lm.model.get_output_embeddings().weight is lm.model.get_input_embeddings().weight

    before = {name: p.detach().clone() for name, p in lm.model.named_parameters()}
    train_one_step(lm)
    changed = {name for name, p in lm.model.named_parameters() if not torch.equal(p, before[name])}
    assert changed <= trainable
    assert any("lora_B" in name for name in changed) and any("embed_tokens" in name for name in changed)


def test_full_fine_tune_trains_every_weight(tiny_opt_dir):
    lm = make_lm(tiny_opt_dir, lora=None)
    assert set(lm.trainable_parameter_names()) == {name for name, _ in lm.model.named_parameters()}
    assert not any("lora" in name for name in lm.trainable_parameter_names())


def test_unknown_lora_module_is_a_config_error_listing_modules(tiny_opt_dir):
    with pytest.raises(ConfigError, match=r"'o_proj' matches no module.*out_proj.*self_attn_layer_norm"):
        make_lm(tiny_opt_dir, lora=LoraSettings(target_modules=["q_proj", "o_proj"]))
    with pytest.raises(ConfigError, match=r"modules_to_save entry 'norm'"):
        make_lm(tiny_opt_dir, lora=LoraSettings(modules_to_save=["embed_tokens", "norm"]))


def test_missing_model_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer"):
        MultimodalLM(MultimodalLMConfig(pretrained=str(tmp_path / "absent")))


def test_gradient_checkpointing_gives_the_same_gradients(tiny_opt_dir):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # same LoRA initialisation for both models
        lm = make_lm(tiny_opt_dir, gradient_checkpointing=checkpointing).train()
        with torch.no_grad():
            for name, p in lm.model.named_parameters():
                if "lora_B" in name:  # non-zero so that gradients reach lora_A too
                    p.copy_(torch.linspace(-0.1, 0.1, p.numel()).view_as(p))
        _, batch, _ = packed_pair(lm, CAPTIONS[0], CAPTIONS[1])
        lm(batch.input_ids, batch.attention_mask(), batch.position_ids, batch.labels).loss.backward()
        grads.append({name: p.grad for name, p in lm.model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert all(grads[1][name] is not None and grads[1][name].abs().sum() > 0 for name in grads[1] if "lora_A" in name)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_visual_codes_only_processor_masks_everything_else():
    lm_visual = type("Vocab", (), {"first_code_id": 5, "end_code_id": 8})()
    scores = torch.randn(2, 12)
    masked = VisualCodesOnly(lm_visual)(torch.zeros(2, 1, dtype=torch.long), scores)
    assert torch.equal(masked[:, 5:8], scores[:, 5:8])
    assert torch.isinf(masked[:, :5]).all() and torch.isinf(masked[:, 8:]).all()


def test_image_code_generation_emits_exactly_32_visual_tokens(tiny_opt_dir):
    lm = make_lm(tiny_opt_dir)
    codes = lm.generate_image_codes(CAPTIONS[:3], temperature=1.0, seed=7)
    assert codes.shape == (3, 32) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < NUM_CODES
    assert torch.equal(codes, lm.generate_image_codes(CAPTIONS[:3], seed=7)), "same seed, same codes"
    assert not torch.equal(codes, lm.generate_image_codes(CAPTIONS[:3], seed=8))
    top1 = lm.generate_image_codes(CAPTIONS[:1], top_k=1, seed=1)
    assert torch.equal(top1, lm.generate_image_codes(CAPTIONS[:1], top_k=1, seed=2)), "top_k=1 is greedy"


def test_caption_and_answer_return_strings_independent_of_batching(tiny_opt_dir):
    lm = make_lm(tiny_opt_dir)
    train_one_step(lm)
    torch.manual_seed(3)
    codes = torch.randint(0, NUM_CODES, (2, 32))
    captions = lm.caption(codes, max_new_tokens=6)
    assert len(captions) == 2 and all(isinstance(text, str) for text in captions)
    questions = ["what color is the cat", "is it a dog?"]  # different lengths: left padding matters
    answers = lm.answer(codes, questions, max_new_tokens=4, num_beams=3)
    assert len(answers) == 2 and all(isinstance(text, str) and "\n" not in text for text in answers)
    one_by_one = [lm.answer(codes[i:i + 1], questions[i:i + 1], max_new_tokens=4, num_beams=3)[0] for i in range(2)]
    assert answers == one_by_one
    assert captions == [lm.caption(codes[i:i + 1], max_new_tokens=6)[0] for i in range(2)]
    assert lm.training is False


def test_generation_never_pads_so_a_prompt_does_not_depend_on_its_batch(tiny_opt_dir, monkeypatch):
    # Attention over left-padded keys rounds differently (~1e-7 on the logits), enough to flip a beam or an
    # argmax: a prompt's answer would depend on its batch-mates, and a DDP evaluation on the batches of its ranks.
    lm = make_lm(tiny_opt_dir)
    train_one_step(lm)
    torch.manual_seed(3)
    codes = torch.randint(0, NUM_CODES, (4, 32))
    questions = ["what color is the cat", "is it a dog?", "two birds", "what color is the dog"]
    calls = []
    generate = lm.model.generate

    def recording_generate(*args, **kwargs):
        calls.append(kwargs["attention_mask"].clone())
        return generate(*args, **kwargs)

    monkeypatch.setattr(lm.model, "generate", recording_generate)
    answers = lm.answer(codes, questions, max_new_tokens=4, num_beams=3)
    lengths = [len(lm.text_ids(vqa_prompt(question))) for question in questions]
    assert len(calls) == len(set(lengths)) > 1, "one call per prompt length"
    assert all(bool(mask.all()) for mask in calls), "no prompt padded"
    calls.clear()
    assert lm.answer(codes, questions, max_new_tokens=4, num_beams=3, batch_size=1) == answers
    assert len(calls) == 4
    assert answers == [lm.answer(codes[i:i + 1], questions[i:i + 1], max_new_tokens=4, num_beams=3)[0]
                       for i in range(4)]


def test_short_answer_keeps_the_first_sentence_of_the_first_line():
    assert short_answer("  yes. it is a cat\nQuestion: what") == "yes."
    assert short_answer("two Question: how many") == "two"
    assert short_answer("\n") == ""


def test_adapter_and_merged_saves_round_trip(tiny_opt_dir, tmp_path):
    lm = make_lm(tiny_opt_dir)
    train_one_step(lm)
    _, batch, _ = packed_pair(lm, CAPTIONS[2], CAPTIONS[0])
    reference = segment_logits(lm, batch, 1)

    lm.save(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = MultimodalLM.load(tmp_path / "adapter")
    assert not reloaded.training and not reloaded.trainable_parameter_names()
    torch.testing.assert_close(segment_logits(reloaded, batch, 1), reference, rtol=0, atol=0)
    assert dataclasses.asdict(reloaded.config)["lora"] == dataclasses.asdict(lm.config)["lora"]
    assert MultimodalLM.load(tmp_path / "adapter", trainable=True).trainable_parameter_names()

    lm.save_merged(tmp_path / "merged")
    merged = MultimodalLM.load(tmp_path / "merged")
    torch.testing.assert_close(segment_logits(merged, batch, 1), reference, atol=1e-5, rtol=1e-5)
    # A merged folder is a plain Hugging Face model: no peft needed.
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        logits = plain(batch.input_ids, attention_mask=batch.attention_mask(), position_ids=batch.position_ids).logits
    torch.testing.assert_close(logits[batch.segment_ids == 1], reference, atol=1e-5, rtol=1e-5)


def test_untied_embedding_copies_survive_a_merged_save(tiny_opt_dir, tmp_path):
    lm = make_lm(tiny_opt_dir, lora=LoraSettings(r=4, alpha=8, dropout=0.0, tie_embeddings=False))
    assert lm.model.get_output_embeddings().weight is not lm.model.get_input_embeddings().weight
    train_one_step(lm)
    _, batch, _ = packed_pair(lm, CAPTIONS[0], CAPTIONS[1])
    reference = segment_logits(lm, batch, 2)
    lm.save_merged(tmp_path / "merged")
    merged = MultimodalLM.load(tmp_path / "merged")
    torch.testing.assert_close(segment_logits(merged, batch, 2), reference, atol=1e-5, rtol=1e-5)


def test_load_without_a_saved_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="seed_mllm.json not found"):
        MultimodalLM.load(tmp_path)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_hidden_states_through_the_head_are_the_logits_of_packed_rows(tiny_opt_dir, attn_implementation):
    # The training loss runs the head on hidden states; with LoRA and tied, trained embeddings the two
    # paths must compute the same numbers, and the head must be the trained (tied) matrix.
    lm = make_lm(tiny_opt_dir, attn_implementation=attn_implementation).eval()
    _, batch, _ = packed_pair(lm, CAPTIONS[0], CAPTIONS[1])
    with torch.no_grad():
        logits = lm(batch.input_ids, batch.attention_mask(), batch.position_ids).logits
        hidden = lm.hidden_states(batch.input_ids, batch.segment_ids, batch.position_ids)
        head_logits = lm.output_head(hidden)
    real = batch.segment_ids > 0
    torch.testing.assert_close(head_logits[real], logits[real], atol=1e-5, rtol=1e-5)
    assert lm.output_head.weight.requires_grad
    assert lm.output_head.weight is lm.model.get_input_embeddings().weight


@pytest.mark.slow
def test_flex_attention_packed_rows_equal_sdpa(tiny_opt_dir):
    # flex_attention compiles its kernel on first use (about a minute on 2 CPU cores); GPUs are where it pays.
    sdpa = make_lm(tiny_opt_dir).eval()
    flex = make_lm(tiny_opt_dir, attn_implementation="flex_attention").eval()
    flex.load_state_dict(sdpa.state_dict())
    _, batch, _ = packed_pair(sdpa, CAPTIONS[0], CAPTIONS[1])
    with torch.no_grad():
        expected = sdpa.hidden_states(batch.input_ids, batch.segment_ids, batch.position_ids)
        actual = flex.hidden_states(batch.input_ids, batch.segment_ids, batch.position_ids)
    real = batch.segment_ids > 0
    torch.testing.assert_close(actual[real], expected[real], atol=1e-4, rtol=1e-4)


def test_an_attention_kernel_that_cannot_take_packed_rows_is_a_config_error(tiny_opt_dir):
    with pytest.raises(ConfigError, match="flash_attention_2.*sdpa, eager, flex_attention"):
        make_lm(tiny_opt_dir, attn_implementation="flash_attention_2")
