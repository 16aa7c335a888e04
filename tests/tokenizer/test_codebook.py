"""CodebookModule (stage 2): what trains, what stays frozen, its start from stage 1, its cache, what it logs."""

from pathlib import Path

import lightning as L
import pytest
import torch

from seed_lightning.core.data.datamodule import ShardDataModule, ShardSource
from seed_lightning.core.errors import ConfigError
from seed_lightning.tokenizer.codebook import CodebookModule
from seed_lightning.tokenizer.embedding_cache import EmbeddingCache
from seed_lightning.tokenizer.frozen_outputs import CAUSAL_EMBEDS, GENERATION_TARGETS
from tests.cli_runs import val_images
from tests.resume_helpers import LossRecorder
from tests.tokenizer.test_module import (
    assert_optimizer_state_only_for,
    fit_briefly,
    make_data,
    make_module,
    one_batch,
    optimizer_params,
    outside_fit,
    save_checkpoint,
    trainer,
)


def test_codebook_stage_freezes_the_encoders_and_trains_codebook_and_heads(default_world, tmp_path):
    module = make_module(default_world, CodebookModule, cache_embeddings=False)
    module.trainer = trainer(tmp_path, max_steps=1)
    tok = module.tokenizer
    in_optimizer = optimizer_params(module)
    frozen = list(tok.vision.parameters()) + list(tok.qformer.parameters())
    assert not {id(p) for p in frozen} & in_optimizer
    assert not {id(p) for p in module.generation_target.parameters()} & in_optimizer
    trainable = [tok.encode_task_layer, tok.quantizer, tok.decode_task_layer, tok.recon_head, tok.gen_head]
    assert {id(p) for m in trainable for p in m.parameters()} <= in_optimizer

    module.train()
    assert not tok.vision.training and not tok.qformer.training
    loss = outside_fit(module).training_step(one_batch(default_world), 0)
    loss.backward()
    assert all(p.grad is None for p in frozen)
    assert tok.encode_task_layer[0].weight.grad.abs().sum() > 0  # straight-through reaches the encoder side
    assert all(p.grad is not None for p in tok.gen_head.parameters() if p.requires_grad)
    assert tok.quantizer.embedding.weight.grad.abs().sum() > 0


def test_a_saved_tokenizer_as_init_from_trains_with_dropout_on(default_world, tmp_path):
    make_module(default_world).tokenizer.save(tmp_path / "stage1")
    tok = make_module(default_world, CodebookModule, init_from=str(tmp_path / "stage1")).tokenizer
    assert tok.gen_head.training and tok.recon_head.training, "Lightning's fit does not call train() itself"
    assert not tok.qformer.training and not tok.vision.model.training  # frozen in stage 2


def test_stage_2_starts_from_a_stage_1_checkpoint(default_world, tmp_path):
    stage1 = make_module(default_world)
    with torch.no_grad():  # as stage 1's training leaves them: unlike the pretrained start
        stage1.tokenizer.qformer.query_tokens += 1
        stage1.tokenizer.vision.ln_vision.weight += 1
    path = save_checkpoint(stage1, tmp_path / "last.ckpt")
    module = make_module(default_world, CodebookModule, init_from=path, cache_embeddings=False)
    for name in ("qformer", "vision"):
        trained = getattr(stage1.tokenizer, name).state_dict()
        started = getattr(module.tokenizer, name).state_dict()
        assert all(torch.equal(trained[key], value) for key, value in started.items()), name
    pretrained = make_module(default_world).tokenizer.qformer.query_tokens
    assert not torch.equal(module.tokenizer.qformer.query_tokens, pretrained)
    module.trainer = trainer(tmp_path, max_steps=1)
    assert torch.isfinite(outside_fit(module).training_step(one_batch(default_world), 0))


def test_codebook_stage_caches_causal_embeddings(default_world, tmp_path):
    module = make_module(default_world, CodebookModule, cache_dir=str(tmp_path / "cache"))
    fit = trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    fit.fit(module, datamodule=make_data(default_world, samples=16))
    cached = module.frozen_outputs.embeddings
    assert len(cached) > 0
    batch = one_batch(default_world)
    qualified = [f"{url}#{key}" for url, key in zip(batch["url"], batch["key"])]
    keys = [k for k in qualified if k in cached]
    assert keys == qualified, "a fresh stream's first batch is the first epoch's: all cached"
    with torch.no_grad():
        fresh = module.tokenizer.causal_embeddings(batch["pixel_values"])
    assert torch.allclose(cached.get(keys).float(), fresh, atol=2e-3)

    # A cached training batch travels to the device without its pixels; the encoders are not run.
    fit.training = True
    moved = module.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert "pixel_values" not in moved and moved["causal_embeds"].shape == fresh.shape
    module.tokenizer.vision.forward = None  # would raise if called
    assert torch.allclose(module._causal_embeddings(moved), fresh, atol=2e-3)


def test_data_init_spreads_the_first_batch_over_many_codes(default_world, tmp_path):
    batch = one_batch(default_world, batch_size=8)
    used = {}
    for init in ("uniform", "data"):
        torch.manual_seed(0)
        module = outside_fit(make_module(default_world, CodebookModule, cache_embeddings=False, codebook_init=init))
        module.trainer = trainer(tmp_path, max_steps=1)
        assert bool(module.codebook_initialized) == (init == "uniform")
        module.on_train_start()  # the Trainer's order: the flag is read once, then the steps run
        module.training_step(batch, 0)
        assert bool(module.codebook_initialized)
        with torch.no_grad():
            codes = module.tokenizer.encode(batch["pixel_values"])
        used[init] = len(codes.unique())
    assert used["data"] >= 2 * used["uniform"]
    # The flag travels in the state dict, so a resumed run keeps its trained codebook.
    assert "codebook_initialized" in module.state_dict()


@pytest.mark.slow
def test_fit_logs_the_three_losses_codebook_usage_and_retrieval_and_steps_only_the_trained_parameters(
        default_world, tmp_path):
    module = make_module(default_world, CodebookModule, cache_embeddings=False, export_dir=str(tmp_path / "export"))
    fit = fit_briefly(default_world, module, tmp_path)
    losses = {f"{split}/{name}" for split in ("train", "val") for name in ("loss", "vq", "recon", "gen")}
    usage = {"train/codebook_perplexity", "val/codebook_perplexity", "val/codebook_used_fraction"}
    assert losses | usage | {"val/i2t_R@1", "val/t2i_R@1"} <= set(fit.logged_metrics)
    assert "train/temperature" not in fit.logged_metrics
    assert_optimizer_state_only_for(fit, [p for m in module._trained_parts() for p in m.parameters()])
    assert (tmp_path / "export" / "config.json").is_file(), "the tokenizer is exported at the end of fit"


class RunsOnUnpickling:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_an_init_from_checkpoint_with_pickled_objects_is_refused_unrun(default_world, tmp_path):
    marker = tmp_path / "ran"
    torch.save({"state_dict": {}, "callbacks": RunsOnUnpickling(marker)}, tmp_path / "foreign.ckpt")
    with pytest.raises(ConfigError, match="model.init_from: .*foreign.ckpt holds pickled objects") as error:
        make_module(default_world, CodebookModule, init_from=str(tmp_path / "foreign.ckpt"))
    assert len(str(error.value).splitlines()) == 1
    assert not marker.exists(), "nothing in an untrusted checkpoint runs"


def test_the_generation_targets_are_computed_once_then_read_from_the_cache(default_world, tmp_path):
    # L_gen's target tower (the SD text encoder) is frozen: the first visit of a caption runs it and caches its
    # output, a batch whose captions are all cached brings them along and the tower does not run.
    module = make_module(default_world, CodebookModule, cache_dir=str(tmp_path / "cache"))
    encoder = module.generation_target
    calls = []
    encoder.register_forward_hook(lambda *args: calls.append(1))
    trained_batches = []
    original_step = module.training_step

    def recording_step(batch, batch_idx):
        trained_batches.append({key: batch[key] for key in ("caption", "key", "url")})
        return original_step(batch, batch_idx)

    module.training_step = recording_step
    fit = trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    fit.fit(module, datamodule=make_data(default_world, samples=16))
    assert len(calls) == len(trained_batches) == 2
    assert (tmp_path / "cache" / "generation_targets").is_dir()

    fit.state.stage = "train"  # as in a later epoch
    seen = trained_batches[1]
    moved = module.transfer_batch_to_device(dict(seen), torch.device("cpu"), 0)
    targets = module._generation_targets(moved)
    assert len(calls) == 2, "a batch of cached captions does not run the SD text encoder"
    with torch.no_grad():
        fresh = encoder(seen["caption"])
    torch.testing.assert_close(targets, fresh, atol=2e-3, rtol=2e-3)  # cached in fp16
    unseen = module.transfer_batch_to_device({**seen, "caption": ["a caption never trained on"]}, "cpu", 0)
    assert "generation_targets" not in unseen


def fit_two_epochs_on_four_images(world, root, connect: bool) -> tuple[list[dict], list[float], list[int]]:
    """Stage 2 with L_gen for 2 epochs of 2 batches, from 2 DataLoader workers, on a shard of 4 images read in order
    (every batch holds all 4: the first computes and caches them, every later one is all cached). Returns, per batch, what it
    carried when the loader handed it over (its keys; the cached rows), the losses, and the epoch of every cache
    lookup made in the main process (a worker's are made, and recorded, in its own copy of the list)."""
    root.mkdir()
    shard = val_images(root / "four.tar", start=0, count=4)
    L.seed_everything(0)
    module = make_module(world, CodebookModule, cache_dir=str(root / "cache"))
    handed_over, transfer = [], module.transfer_batch_to_device
    module.transfer_batch_to_device = lambda batch, *args: handed_over.append(dict(batch)) or transfer(batch, *args)
    data = ShardDataModule(train=[ShardSource(urls=shard)], image_size=64, batch_size=4, num_workers=2,
                           samples_per_epoch=8, shuffle_buffer=0)
    if not connect:
        data.connect = lambda train=None, val=None: None
    fit = trainer(root, max_epochs=2, limit_val_batches=0, callbacks=[LossRecorder()])
    lookups = []
    get = EmbeddingCache.get
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(EmbeddingCache, "get", lambda cache, keys: lookups.append(fit.current_epoch) or get(cache, keys))
        fit.fit(module, datamodule=data)
    return handed_over, next(c for c in fit.callbacks if isinstance(c, LossRecorder)).losses, lookups


@pytest.mark.slow
def test_the_dataloader_workers_attach_the_cached_outputs_and_the_losses_are_the_in_process_lookups(
        default_world, tmp_path):
    batches, losses, lookups = fit_two_epochs_on_four_images(default_world, tmp_path / "workers", connect=True)
    assert [sorted(batch) for batch in batches[2:]] == 2 * [sorted(batches[2])]
    # Epoch 1's workers started before anything was cached: its batches arrive with their pixels (the second's rows,
    # not yet flushed, are attached by the main process). Epoch 2's workers gather the rows themselves.
    assert all("pixel_values" in batch and CAUSAL_EMBEDS not in batch for batch in batches[:2])
    for batch in batches[2:]:
        assert "pixel_values" not in batch, "cached batches travel without their pixels"
        assert batch[CAUSAL_EMBEDS].shape[0] == batch[GENERATION_TARGETS].shape[0] == 4
    assert 0 in lookups and 1 not in lookups, "in epoch 2 the main process looks nothing up"

    _, in_process, lookups = fit_two_epochs_on_four_images(default_world, tmp_path / "main", connect=False)
    assert 1 in lookups
    assert len(losses) == 4 and losses == in_process
