import io
import os
import random
import re
import struct
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image
from webdataset import TarWriter

from seed_lightning.core.data.datamodule import (
    STREAM_STATE_KEY,
    ShardDataModule,
    ShardSource,
    ShardValDataset,
    val_batches,
)
from seed_lightning.core.data.shards import expand_urls, index_tar, make_decoder
from seed_lightning.core.data.transforms import ImageTransform
from seed_lightning.core.errors import ConfigError, DataError

pytestmark = pytest.mark.filterwarnings("ignore:shard .* cut off")


def jpeg_bytes(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (14, 10), (shade, 100, 255 - shade)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_shard(path, keys, codes: bool = False, codes_per_image: int = 32) -> None:
    with TarWriter(str(path), mtime=0) as writer:
        for number, key in enumerate(keys):
            sample = {"__key__": key, "txt": f"Sample {key}.", "json": {"number": number}}
            if codes:
                values = [(number * 7 + i) % 8192 for i in range(codes_per_image)]
                sample["codes"] = struct.pack(f"<{codes_per_image}h", *values)
            else:
                sample["jpg"] = jpeg_bytes(number * 30 % 256)
            writer.write(sample)


@pytest.fixture
def shards(tmp_path):
    for shard in range(3):
        write_shard(tmp_path / f"a-{shard:03d}.tar", [f"a{shard}_{i}" for i in range(5)])
    write_shard(tmp_path / "b-000.tar", [f"b_{i}" for i in range(4)])
    write_shard(tmp_path / "val-000.tar", [f"v{i:02d}" for i in range(7)])
    write_shard(tmp_path / "val-001.tar", [f"v{i:02d}" for i in range(7, 11)])
    return tmp_path


def make_module(shards, **overrides) -> ShardDataModule:
    settings = dict(
        train=[ShardSource(f"{shards}/a-{{000..002}}.tar", 2.0), ShardSource(f"{shards}/b-000.tar", 1.0)],
        val=f"{shards}/val-{{000..001}}.tar",
        image_size=16,
        batch_size=3,
        val_batch_size=4,
        num_workers=0,
        samples_per_epoch=15,
        shuffle_buffer=4,
    )
    return ShardDataModule(**{**settings, **overrides})


def consume(module: ShardDataModule, batches: int | None = None) -> list[list[str]]:
    """Iterate the train loader as Lightning does (on_after_batch_transfer before each step); return keys."""
    keys = []
    for batch in module.train_dataloader():
        batch = module.on_after_batch_transfer(batch, 0)
        assert STREAM_STATE_KEY not in batch
        keys.append(batch["key"])
        if batches is not None and len(keys) == batches:
            break
    return keys


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_and_val_loaders_give_design_batches(shards, num_workers):
    module = make_module(shards, num_workers=num_workers)
    loader = module.train_dataloader()
    assert len(loader) == 15 // 3
    batches = list(loader)
    assert len(batches) == 5
    for batch in batches:
        assert STREAM_STATE_KEY in batch
        assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
        assert len(batch["caption"]) == len(batch["key"]) == len(batch["meta"]) == 3
        assert all(caption == f"sample {key}" for caption, key in zip(batch["caption"], batch["key"]))
    val = list(module.val_dataloader())
    assert [b["index"].tolist() for b in val] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert [key for b in val for key in b["key"]] == [f"v{i:02d}" for i in range(11)]
    assert val[0]["pixel_values"].shape == (4, 3, 16, 16)


def test_codes_kind_batches(shards):
    for shard in range(2):
        write_shard(shards / f"tok-{shard}.tar", [f"t{shard}_{i}" for i in range(6)], codes=True)
    module = make_module(shards, kind="codes", train=[ShardSource(f"{shards}/tok-{{0..1}}.tar")], val=None)
    batch = module.on_after_batch_transfer(next(iter(module.train_dataloader())), 0)
    assert batch["codes"].shape == (3, 32) and batch["codes"].dtype == torch.long
    assert set(batch) == {"codes", "caption", "key", "url", "meta"}
    number = batch["meta"][0]["number"]
    assert batch["codes"][0].tolist() == [(number * 7 + i) % 8192 for i in range(32)]
    assert module.val_dataloader() == []


def test_codes_kind_reads_the_configured_codes_per_image(shards):
    write_shard(shards / "tok16.tar", [f"t{i}" for i in range(6)], codes=True, codes_per_image=16)
    module = make_module(shards, kind="codes", codes_per_image=16, train=[ShardSource(f"{shards}/tok16.tar")],
                         val=f"{shards}/tok16.tar")
    batches = consume(module)
    assert len(batches) == 5 and module.skipped == {}, "every sample is used, none skipped as bad codes"
    val = [batch["codes"] for batch in module.val_dataloader()]
    assert [codes.shape for codes in val] == [(4, 16), (2, 16)]


def test_val_batches_hold_the_same_samples_on_any_number_of_ranks(shards):
    # Batched arithmetic rounds differently with other batch-mates: for DDP to compute what one process does, the
    # val set is cut into batches first (in order) and the batches are dealt to the ranks: b to rank b % W.
    refs = [ref for url in expand_urls(f"{shards}/val-{{000..001}}.tar") for ref in index_tar(url).samples]
    decode = make_decoder("image", ImageTransform(image_size=8), 50, 32)
    expected = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10]]
    for world_size in (1, 2, 3):
        for rank in range(world_size):
            dataset = ShardValDataset(refs, decode, batch_size=2, rank=rank, world_size=world_size)
            loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
            batches = list(loader)
            assert len(batches) == len(loader)
            assert [b["index"].tolist() for b in batches] == expected[rank::world_size]  # in order, each once
            assert [b["key"] for b in batches] == [[f"v{i:02d}" for i in b["index"]] for b in batches]


def test_a_val_set_of_fewer_batches_than_ranks_gives_every_rank_one():
    assert val_batches(11, batch_size=6, world_size=1) == [range(0, 6), range(6, 11)]
    assert val_batches(11, batch_size=6, world_size=2) == [range(0, 6), range(6, 11)]
    assert val_batches(11, batch_size=6, world_size=3) == [range(0, 3), range(3, 7), range(7, 11)]


def test_ranks_get_different_streams_and_same_number_of_batches(shards):
    keys = {}
    for rank in range(2):
        module = make_module(shards, samples_per_epoch=30)
        module.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        keys[rank] = consume(module)
    assert len(keys[0]) == len(keys[1]) == 30 // (2 * 3)
    assert keys[0] != keys[1]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_state_dict_resumes_the_exact_batch_sequence_across_epochs(shards, num_workers):
    reference = make_module(shards, num_workers=num_workers)
    expected = [key for _ in range(3) for key in consume(reference)]  # 3 epochs of 5 batches
    assert len(expected) == 15

    for stop in (2, 5, 7):
        first = make_module(shards, num_workers=num_workers)
        seen = consume(first, batches=stop)
        if stop > 5:
            seen += consume(first, batches=stop - 5)
        buffer = io.BytesIO()
        torch.save(first.state_dict(), buffer)
        buffer.seek(0)
        resumed = make_module(shards, num_workers=num_workers)
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        assert len(resumed.train_dataloader()) == 5
        # Lightning asks for the rest of the interrupted epoch, then whole epochs.
        while len(seen) < 15:
            seen += consume(resumed)
        assert seen == expected, f"resumed after {stop} batches"
        assert resumed.skipped == reference.skipped


class RecordPlace:
    """A batch transform that keeps the keys and records the process it ran in, the rank and the index it was given."""

    def __call__(self, batch: dict, rank: int, index: int) -> dict:
        return {"key": batch["key"], "pid": os.getpid(), "rank": rank, "index": index}


def transformed(module: ShardDataModule, batches: int | None = None) -> list[dict]:
    """Iterate the train loader as Lightning does; return the batches the LightningModule would get."""
    seen = []
    for batch in module.train_dataloader():
        seen.append(module.on_after_batch_transfer(batch, 0))
        if batches is not None and len(seen) == batches:
            break
    return seen


@pytest.mark.parametrize("num_workers", [0, 2])
def test_connected_transforms_run_in_the_workers_with_the_rank_and_the_batch_index(shards, num_workers):
    plain = make_module(shards, num_workers=num_workers, samples_per_epoch=30, val_batch_size=2)
    plain.trainer = SimpleNamespace(global_rank=1, world_size=2)
    keys = consume(plain) + consume(plain)  # two epochs of 5 batches
    module = make_module(shards, num_workers=num_workers, samples_per_epoch=30, val_batch_size=2)
    module.trainer = SimpleNamespace(global_rank=1, world_size=2)
    module.connect(train=RecordPlace(), val=RecordPlace())
    batches = transformed(module) + transformed(module)
    assert [batch["key"] for batch in batches] == keys, "the transform sees the stream as it was"
    assert all(set(batch) == {"key", "pid", "rank", "index"} for batch in batches), "without the stream state"
    assert [(batch["rank"], batch["index"]) for batch in batches] == [(1, index) for index in range(10)]
    pids = {batch["pid"] for batch in batches}
    assert (os.getpid() in pids) is (num_workers == 0), "applied in the DataLoader workers"
    # Val: 11 samples in 6 batches of 2; rank 1 of 2 gets batches 1, 3 and 5, as numbered among all.
    val = list(module.val_dataloader())
    assert [(batch["rank"], batch["index"]) for batch in val] == [(1, 1), (1, 3), (1, 5)]
    assert [batch["key"] for batch in val] == [["v02", "v03"], ["v06", "v07"], ["v10"]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_stream_gives_its_transform_the_indices_of_an_uninterrupted_one(shards, num_workers):
    reference = make_module(shards, num_workers=num_workers)
    reference.connect(train=RecordPlace())
    expected = [batch["index"] for _ in range(2) for batch in transformed(reference)]
    assert expected == list(range(10))
    for stop in (2, 7):
        first = make_module(shards, num_workers=num_workers)
        first.connect(train=RecordPlace())
        seen = transformed(first, batches=stop) if stop < 5 else transformed(first) + transformed(first, stop - 5)
        resumed = make_module(shards, num_workers=num_workers)
        resumed.load_state_dict(first.state_dict())
        resumed.connect(train=RecordPlace())
        while len(seen) < 10:
            seen += transformed(resumed)
        assert [batch["index"] for batch in seen] == expected, f"resumed after {stop} batches"


def test_skipped_counts_are_summed_over_workers(shards):
    with TarWriter(str(shards / "bad.tar"), mtime=0) as writer:
        for i in range(4):
            writer.write({"__key__": f"bad{i}", "jpg": b"not an image", "txt": "x"})
            writer.write({"__key__": f"nocap{i}", "jpg": jpeg_bytes(9)})
            writer.write({"__key__": f"ok{i}", "jpg": jpeg_bytes(9), "txt": "fine"})
    module = make_module(shards, train=[ShardSource(f"{shards}/bad.tar")], num_workers=2, samples_per_epoch=12)
    keys = consume(module)
    assert all(key.startswith("ok") for batch in keys for key in batch)
    skipped = module.skipped
    assert skipped["corrupt_image"] >= 4 and skipped["missing_caption"] >= 4
    states = [state for state in module._book.states if state is not None]
    assert len(states) == 2
    assert skipped["corrupt_image"] == sum(state.skipped.get("corrupt_image", 0) for state in states)


def test_changed_configuration_resumes_on_fresh_streams_with_a_warning(shards):
    first = make_module(shards)
    consume(first, batches=2)
    changed = make_module(shards, batch_size=5)
    with pytest.warns(UserWarning, match="does not match"):
        changed.load_state_dict(first.state_dict())
    assert changed._book.batches == 2 and changed._book.states == [None]
    assert len(consume(changed)) == 15 // 5 - 2 % 3


def fitting(rank: int, world_size: int) -> SimpleNamespace:
    return SimpleNamespace(global_rank=rank, world_size=world_size, ckpt_path="run/last.ckpt",
                           state=SimpleNamespace(fn=TrainerFn.FITTING))


def test_a_checkpoint_of_another_number_of_ranks_is_refused_in_one_line(shards):
    one = make_module(shards)
    consume(one, batches=2)
    single = one.state_dict()  # 1 rank
    double = {**single, "ranks": single["ranks"] * 2, "fingerprint": {**single["fingerprint"], "world_size": 2}}
    for state, world_size in ((single, 2), (double, 1), (double, 3)):
        module = make_module(shards)
        module.trainer = fitting(0, world_size)
        with pytest.raises(ConfigError) as error:
            module.load_state_dict(state)
        saved = len(state["ranks"])
        message = str(error.value)
        assert "\n" not in message
        assert f"run/last.ckpt was written by {saved} processes and this run has {world_size}" in message
        assert f"resume with num_nodes x devices = {saved}" in message
    # The same number of ranks, however they were launched: each rank continues its own stream.
    for rank in range(2):
        module = make_module(shards)
        module.trainer = fitting(rank, 2)
        module.load_state_dict(double)
        assert module._book.batches == 2 and module._book.as_dict() == one._book.as_dict()


def test_validation_ignores_the_train_stream_state(shards, recwarn):
    # `evaluate` restores a fit checkpoint into trainer.validate: the stream position there is meaningless,
    # so it neither restores it nor warns that it does not match (here: another world size and batch size).
    first = make_module(shards)
    consume(first, batches=2)
    evaluating = make_module(shards, batch_size=5)
    evaluating.trainer = SimpleNamespace(global_rank=0, world_size=2, state=SimpleNamespace(fn=TrainerFn.VALIDATING))
    evaluating.load_state_dict(first.state_dict())
    assert not [w for w in recwarn if "data stream" in str(w.message)]
    assert evaluating._book.batches == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"samples_per_epoch": 2}, "samples_per_epoch"),
        ({"train": None}, "no training data"),
        ({"train": [ShardSource("x.tar", 0.0)]}, "weights"),
        ({"crop_scale": (0.6, 0.5)}, "crop_scale"),
        ({"kind": "video"}, "kind"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_configuration_is_a_one_line_config_error(shards, overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        make_module(shards, **overrides).train_dataloader()
    assert "\n" not in str(error.value)


def test_jpeg_draft_decoding_is_a_switch(tmp_path):
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((800, 600)).convert("RGB").save(buffer, format="JPEG")
    with TarWriter(str(tmp_path / "photos.tar"), mtime=0) as writer:
        writer.write({"__key__": "photo", "jpg": buffer.getvalue(), "txt": "a photo"})
    full_decode = ImageTransform(image_size=16, jpeg_draft=False)(Image.open(io.BytesIO(buffer.getvalue())), random.Random(0))
    for jpeg_draft in (True, False):
        module = ShardDataModule(val=str(tmp_path / "photos.tar"), image_size=16, num_workers=0, jpeg_draft=jpeg_draft)
        pixels = next(iter(module.val_dataloader()))["pixel_values"][0]
        assert torch.equal(pixels, full_decode) is not jpeg_draft, "draft decoding (the default) differs slightly"


def test_missing_shards_fail_at_setup(shards):
    with pytest.raises(DataError, match="a-003.tar"):
        make_module(shards, train=[ShardSource(f"{shards}/a-{{000..003}}.tar")]).setup("fit")
    with pytest.raises(DataError, match="nothing-"):
        make_module(shards, val=f"{shards}/nothing-*.tar").setup("validate")


def one_line_setup_error(module: ShardDataModule) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the error says it all: no warning line per file before it
        with pytest.raises(DataError) as error:
            module.setup("fit")
    assert "\n" not in str(error.value) and "data.val: null" in str(error.value)
    return str(error.value)


def test_a_validation_set_without_samples_is_an_error_at_start(shards):
    for shard in range(3):
        (shards / f"zero-{shard}.tar").touch()
    message = one_line_setup_error(make_module(shards, val=f"{shards}/zero-*.tar"))
    assert f"(3 files) has no usable sample (3 shard(s) empty file (first: {shards}/zero-0.tar" in message


def test_a_glob_of_images_as_validation_set_is_one_error_line(shards):
    for number in range(40):
        (shards / f"image-{number:02d}.jpg").write_bytes(jpeg_bytes(number))
    message = one_line_setup_error(make_module(shards, val=f"{shards}/*.jpg"))
    assert f"(40 files) has no usable sample (40 shard(s) not a tar archive (first: {shards}/image-00.jpg" in message


def test_a_validation_set_without_usable_members_is_an_error_at_start(shards):
    with TarWriter(str(shards / "gifs.tar"), mtime=0) as writer:
        writer.write({"__key__": "g0", "gif": b"GIF89a", "txt": "a gif"})
    message = one_line_setup_error(make_module(shards, val=f"{shards}/gifs.tar"))
    assert "1 samples, none with a jpg/jpeg/png/webp member" in message
    assert make_module(shards, val=None).val_dataloader() == []  # the explicit opt-out


def test_damaged_shards_are_counted_in_one_warning_line_per_kind(shards):
    for shard in range(5):
        (shards / f"val-zero-{shard}.tar").touch()
    (shards / "val-text.tar").write_text("not a tar" * 100)
    module = make_module(shards, val=f"{shards}/val-*.tar")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module.setup("validate")
    assert len(module._val_refs) == 11
    assert [str(warning.message).split(" (first")[0] for warning in caught] == [
        "validation shards: 1 shard(s) not a tar archive", "validation shards: 5 shard(s) empty file"
    ]
    for shard in range(20):
        (shards / f"zero-{shard}.tar").touch()
    module = make_module(shards, train=[ShardSource(f"{shards}/zero-{{0..19}}.tar::{shards}/a-000.tar")], val=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        consume(module)  # one epoch
    assert len(caught) == 1 and re.match(r"train stream 0: 1\d shard\(s\) empty file", str(caught[0].message))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_error_in_a_loader_worker_is_raised_as_its_one_line(tmp_path, num_workers):
    for shard in range(3):
        (tmp_path / f"empty-{shard}.tar").touch()
    module = make_module(tmp_path, train=[ShardSource(f"{tmp_path}/empty-{{0..2}}.tar")], val=None,
                         num_workers=num_workers)
    with pytest.raises(DataError, match="^train source 0 gave 1000 empty shards in a row") as error:
        consume(module)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_cli_prints_a_loader_worker_error_in_one_line(default_world, tmp_path):
    for shard in range(3):
        (tmp_path / f"empty-{shard}.tar").touch()
    command = [
        sys.executable, "-m", "seed_lightning.cli", "tokenizer", "fit", "-c", "conf/tokenizer/tiny.yaml",
        "--data.train", f"[{{urls: '{tmp_path}/empty-{{0..2}}.tar'}}]", "--data.val", "null",
        "--data.num_workers", "2", "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger", "false",
        "--trainer.callbacks", "[]", "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false",
    ]
    result = subprocess.run(command, cwd=default_world.repo, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "SEED_LOG_LEVEL": "WARNING"})
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("seed-lightning: error:")]
    assert len(errors) == 1 and "train source 0 gave 1000 empty shards in a row" in errors[0], result.stderr[-3000:]
    assert "3 shard(s) empty file" in errors[0]
    assert sum("empty file" in line for line in result.stderr.splitlines()) == 1  # no warning line per shard
    assert "Traceback" not in result.stderr and "Caught" not in result.stderr


def test_a_path_as_train_sources_says_what_is_expected(shards):
    expected = "data.train expects a list of sources such as [{urls: 'shards/{000000..000099}.tar'}]; got "
    with pytest.raises(ConfigError) as error:
        ShardDataModule(train=f"{shards}/a-000.tar")
    assert str(error.value) == expected + f"the file '{shards}/a-000.tar': write [{{urls: '{shards}/a-000.tar'}}]"
    with pytest.raises(ConfigError) as error:
        ShardDataModule(train=str(shards))
    assert str(error.value).startswith(expected + f"'{shards}', a directory: give a pattern of .tar shards inside it")
    assert str(error.value).endswith(f"e.g. [{{urls: '{shards}/*.tar'}}]")


@pytest.mark.slow
def test_cli_says_what_data_train_expects(default_world, capsys, monkeypatch):
    from seed_lightning import cli

    monkeypatch.chdir(default_world.repo)
    shard = default_world.shards / "train-000000.tar"
    for given, told in [(shard, f"got the file '{shard}'"), (default_world.shards, "a directory")]:
        argv = ["tokenizer", "fit", "-c", "conf/tokenizer/tiny.yaml", "--data.train", str(given)]
        assert cli.main(argv) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("seed-lightning: error:")]
        assert len(errors) == 1 and "data.train expects a list of sources" in errors[0] and told in errors[0]


def test_lightning_cli_can_build_it_from_yaml(shards):
    parser = ArgumentParser()
    parser.add_class_arguments(ShardDataModule, "data")
    config = {
        "data": {
            "train": [{"urls": f"{shards}/a-000.tar", "weight": 2.0}, {"urls": f"{shards}/b-000.tar"}],
            "kind": "image",
            "crop_scale": [0.4, 0.9],
            "batch_size": 2,
        }
    }
    module = parser.instantiate_classes(parser.parse_string(yaml.safe_dump(config))).data
    assert module.train_sources == [ShardSource(f"{shards}/a-000.tar", 2.0), ShardSource(f"{shards}/b-000.tar", 1.0)]
    assert module.crop_scale == (0.4, 0.9)
    assert module.hparams["train"][0] == {"urls": f"{shards}/a-000.tar", "weight": 2.0}
    with pytest.raises(SystemExit):  # jsonargparse rejects a kind outside the Literal
        parser.parse_string(yaml.safe_dump({"data": {"kind": "video"}}))
