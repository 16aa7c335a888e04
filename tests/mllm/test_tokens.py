import json

import pytest
import torch

from seed_lightning.core.data.shards import decode_codes_sample, iter_tar_samples
from seed_lightning.core.errors import ConfigError, DataError
from seed_lightning.mllm.tokens import TokenShardWriter, encode_codes, extract_tokens


def source(count: int, start: int = 0):
    """(key, caption, meta, image) tuples; the "image" is an int that encode_codes_of turns into codes."""
    return [(f"{index:05d}", f"caption number {index}", {"image_id": index}, index) for index in range(start, count)]


def encode_codes_of(images: list[int]) -> torch.Tensor:
    return torch.stack([(torch.arange(32) * 97 + image * 131) % 8192 for image in images])


def read_all(paths) -> list[dict]:
    """The samples as the data module reads them."""
    return [decode_codes_sample(raw, None, 32) for path in paths for raw in iter_tar_samples(str(path))]


def test_codes_are_little_endian_int16():
    assert encode_codes(torch.tensor([1, 258, 32767])) == b"\x01\x00\x02\x01\xff\x7f"
    codes = torch.randint(0, 8192, (32,), generator=torch.Generator().manual_seed(0))
    data = encode_codes(codes)
    assert len(data) == 64
    assert torch.equal(decode_codes_sample({"__key__": "k", "codes": data, "txt": b"x"}, None, 32)["codes"], codes)
    with pytest.raises(DataError, match="int16"):
        encode_codes(torch.tensor([0, 32768]))
    with pytest.raises(DataError, match="int16"):
        encode_codes(torch.tensor([-1]))


def test_shard_write_read_round_trip(tmp_path):
    samples = source(5)
    with TokenShardWriter(tmp_path, prefix="part", maxcount=2) as writer:
        for key, caption, meta, image in samples:
            writer.write(key, encode_codes_of([image])[0], caption, meta)
    assert [path.name for path in writer.shard_paths] == ["part-000000.tar", "part-000001.tar", "part-000002.tar"]
    stored = read_all(writer.shard_paths)
    assert [sample["key"] for sample in stored] == [key for key, *_ in samples]
    for sample, (_, caption, meta, image) in zip(stored, samples):
        assert sample["caption"] == caption and sample["meta"] == meta
        assert torch.equal(sample["codes"], encode_codes_of([image])[0])
    manifest = json.loads((tmp_path / "part-manifest.json").read_text())
    assert manifest["complete"] and [shard["count"] for shard in manifest["shards"]] == [2, 2, 1]
    assert not list(tmp_path.glob("*.tmp"))


def test_keys_with_dots_are_rejected(tmp_path):
    writer = TokenShardWriter(tmp_path)
    with pytest.raises(DataError, match="no '.'"):
        writer.write("a.b", torch.zeros(32, dtype=torch.long), "caption")


def test_extraction_is_deterministic(tmp_path):
    first = extract_tokens(encode_codes_of, source(7), tmp_path / "a", maxcount=3, batch_size=2)
    second = extract_tokens(encode_codes_of, source(7), tmp_path / "b", maxcount=3, batch_size=4)
    assert first.num_samples == second.num_samples == 7 and len(first.shards) == 3
    for path_a, path_b in zip(first.shards, second.shards, strict=True):
        assert path_a.read_bytes() == path_b.read_bytes()


def test_extraction_resumes_after_an_interruption_without_duplicates_or_gaps(tmp_path):
    calls = []

    def failing_encode(images):
        if len(calls) == 4:  # fifth batch (samples 8, 9): shard 2 (6..8) is half written
            assert list((tmp_path / "run").glob("*.tar.tmp"))
            raise KeyboardInterrupt
        calls.append(list(images))
        return encode_codes_of(images)

    with pytest.raises(KeyboardInterrupt):
        extract_tokens(failing_encode, source(10), tmp_path / "run", maxcount=3, batch_size=2)
    manifest = json.loads((tmp_path / "run" / "tokens-manifest.json").read_text())
    assert not manifest["complete"] and [shard["count"] for shard in manifest["shards"]] == [3, 3]
    assert not list((tmp_path / "run").glob("*.tmp")), "the unfinished shard is discarded"

    resumed_images = []

    def counting_encode(images):
        resumed_images.extend(images)
        return encode_codes_of(images)

    summary = extract_tokens(counting_encode, source(10), tmp_path / "run", maxcount=3, batch_size=2)
    assert resumed_images == list(range(6, 10)), "finished shards are not encoded again"
    assert summary.num_resumed == 6 and summary.num_samples == 10
    assert [sample["key"] for sample in read_all(summary.shards)] == [key for key, *_ in source(10)]
    reference = extract_tokens(encode_codes_of, source(10), tmp_path / "reference", maxcount=3, batch_size=2)
    assert [p.read_bytes() for p in summary.shards] == [p.read_bytes() for p in reference.shards]


def test_a_complete_folder_is_not_read_again(tmp_path):
    extract_tokens(encode_codes_of, source(4), tmp_path, maxcount=3)

    def must_not_iterate():
        raise AssertionError("input read although the folder is complete")
        yield

    summary = extract_tokens(encode_codes_of, must_not_iterate(), tmp_path, maxcount=3)
    assert summary.num_samples == 4 and summary.num_resumed == 4


def test_resuming_with_different_input_or_sharding_is_refused(tmp_path):
    def stop_after_first_shard(images):
        if images[0] >= 3:
            raise RuntimeError("interrupted")
        return encode_codes_of(images)

    with pytest.raises(RuntimeError, match="interrupted"):
        extract_tokens(stop_after_first_shard, source(8), tmp_path, maxcount=3, batch_size=3)
    with pytest.raises(DataError, match="expected key '00000'"):
        extract_tokens(encode_codes_of, source(8, start=1), tmp_path, maxcount=3)
    with pytest.raises(DataError, match="input ends after 2 samples"):
        extract_tokens(encode_codes_of, source(2), tmp_path, maxcount=3)
    with pytest.raises(ConfigError, match="maxcount 3"):
        extract_tokens(encode_codes_of, source(8), tmp_path, maxcount=4)


def test_encode_fn_must_return_one_row_per_image(tmp_path):
    with pytest.raises(DataError, match="codes of shape"):
        extract_tokens(lambda images: torch.zeros(32, dtype=torch.long), source(2), tmp_path)
