"""ContrastiveModule (stage 1): what trains, what stays frozen, what it logs."""

import pytest

from tests.tokenizer.test_module import (
    assert_optimizer_state_only_for,
    fit_briefly,
    make_data,
    make_module,
    one_batch,
    optimizer_params,
    outside_fit,
    trainer,
)


def test_contrastive_stage_trains_the_qformer_side_only(default_world, tmp_path):
    module = make_module(default_world)
    module.trainer = trainer(tmp_path, max_steps=1)
    tok = module.tokenizer
    in_optimizer = optimizer_params(module)
    assert {id(p) for p in tok.qformer.parameters()} <= in_optimizer
    assert id(module.temperature) in in_optimizer
    assert {id(p) for p in tok.vision.ln_vision.parameters()} <= in_optimizer
    frozen = [tok.quantizer, tok.encode_task_layer, tok.decode_task_layer, tok.recon_head, tok.gen_head]
    trunk = [p for n, p in tok.vision.named_parameters() if "post_layernorm" not in n]
    for p in [p for m in frozen for p in m.parameters()] + trunk:
        assert id(p) not in in_optimizer and not p.requires_grad

    loss = outside_fit(module).training_step(one_batch(default_world), 0)
    loss.backward()
    assert all(p.grad is None for p in trunk)
    assert tok.qformer.query_tokens.grad is not None and tok.qformer.query_tokens.grad.abs().sum() > 0
    assert module.temperature.grad is not None


@pytest.mark.slow
def test_fit_logs_the_itc_loss_and_retrieval_and_steps_only_the_trained_parameters(default_world, tmp_path):
    module = make_module(default_world)
    fit = fit_briefly(default_world, module, tmp_path)
    assert {"train/loss", "train/temperature", "val/i2t_R@1", "val/t2i_R@1", "val/i2t_R@5"} <= set(fit.logged_metrics)
    assert not any(name.startswith(("train/vq", "val/vq", "val/codebook")) for name in fit.logged_metrics)
    tok = module.tokenizer
    trained = [*tok.qformer.parameters(), *tok.vision.ln_vision.parameters(), module.temperature]
    assert_optimizer_state_only_for(fit, trained)


def test_training_captions_arrive_tokenised_from_the_loader_workers(default_world, tmp_path):
    import torch

    from seed_lightning.tokenizer.captions import CAPTION_IDS, CAPTION_MASK

    module = make_module(default_world)
    received = []
    original_step = module.training_step

    def recording_step(batch, batch_idx):
        received.append(batch)
        return original_step(batch, batch_idx)

    def no_tokenising_in_the_step(captions):
        raise AssertionError("the step tokenised captions itself")

    module.training_step = recording_step
    module._tokenize = no_tokenising_in_the_step
    fit = trainer(tmp_path, max_steps=2, limit_val_batches=0)
    fit.fit(module, datamodule=make_data(default_world, batch_size=4, samples=8, num_workers=2))
    assert len(received) == 2
    for batch in received:
        expected = module.caption_tokens.encode(batch["caption"])
        assert torch.equal(batch[CAPTION_IDS], expected[CAPTION_IDS])
        assert torch.equal(batch[CAPTION_MASK], expected[CAPTION_MASK])
