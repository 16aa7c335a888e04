import io
import random
import struct
import tarfile
import warnings
from collections import Counter

import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from seed_lightning.core.data.shards import (
    MAX_CONSECUTIVE_SKIPS,
    ShuffleBuffer,
    SkipSample,
    StreamState,
    TrainStream,
    WeightedMixer,
    collate_samples,
    decode_codes_sample,
    decode_image_sample,
    expand_urls,
    index_tar,
    iter_tar_samples,
    make_decoder,
)
from seed_lightning.core.data.transforms import ImageTransform
from seed_lightning.core.errors import DataError

TRANSFORM = ImageTransform(image_size=8, train=True)


def jpeg_bytes(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 10), (shade, 255 - shade, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


def image_sample(key: str, caption: str | None = "A caption.", image: bytes | None = None) -> dict:
    sample = {"__key__": key, "jpg": jpeg_bytes(len(key) * 20 % 256) if image is None else image}
    if caption is not None:
        sample["txt"] = caption
    return sample


def write_shard(path, samples) -> str:
    with TarWriter(str(path), mtime=0) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def test_expand_urls_braces_globs_and_double_colon(tmp_path):
    for name in ["a-000.tar", "a-001.tar", "a-002.tar", "b-x.tar"]:
        (tmp_path / name).write_bytes(b"")
    assert expand_urls(f"{tmp_path}/a-{{000..002}}.tar") == [f"{tmp_path}/a-00{i}.tar" for i in range(3)]
    assert expand_urls(f"{tmp_path}/b-*.tar::{tmp_path}/a-{{001,000}}.tar") == [
        f"{tmp_path}/b-x.tar",
        f"{tmp_path}/a-001.tar",
        f"{tmp_path}/a-000.tar",
    ]


@pytest.mark.parametrize(
    ("pattern", "named"),
    [("a-{000..003}.tar", "a-003.tar"), ("c-*.tar", "c-*.tar"), ("a-000.tar::", "empty shard pattern")],
)
def test_expand_urls_missing_file_or_empty_match_is_a_data_error_naming_it(tmp_path, pattern, named):
    for name in ["a-000.tar", "a-001.tar", "a-002.tar"]:
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(DataError, match=named.replace("*", r"\*")):
        expand_urls(f"{tmp_path}/{pattern}")


def test_expand_urls_says_a_directory_is_a_directory(tmp_path):
    (tmp_path / "shards").mkdir()
    with pytest.raises(DataError, match=f"'{tmp_path}/shards' is a directory; .* e.g. {tmp_path}/shards/\\*.tar$"):
        expand_urls(f"{tmp_path}/shards")


def test_tar_samples_are_grouped_by_key_in_file_order(tmp_path):
    url = write_shard(
        tmp_path / "s.tar",
        [
            {**image_sample("k0", "first"), "json": {"image_id": 7}},
            {"__key__": "dir/k1", "png": b"png-bytes", "txt": "second", "seg.npy": b"x"},
            {"__key__": "k2", "codes": struct.pack("<32h", *range(32)), "txt": "third"},
        ],
    )
    samples = list(iter_tar_samples(url))
    assert [s["__key__"] for s in samples] == ["k0", "dir/k1", "k2"]
    assert samples[0]["txt"] == b"first" and samples[0]["json"] == b'{"image_id": 7}'
    assert set(samples[1]) == {"__key__", "__url__", "png", "txt", "seg.npy"}
    assert samples[1]["png"] == b"png-bytes"
    assert struct.unpack("<32h", samples[2]["codes"]) == tuple(range(32))


def cut(url: str, member: str, extra: int) -> None:
    """Truncate the file `extra` bytes after the start of `member`'s header (512 bytes) or data."""
    with tarfile.open(url) as tar:
        info = tar.getmember(member)
    data = open(url, "rb").read()
    open(url, "wb").write(data[: (info.offset if extra < 512 else info.offset_data - 512) + extra])


@pytest.mark.parametrize(
    ("extra", "kept"),
    # A cut header cannot be told apart from the last sample's next member, so that sample goes too.
    [(100, ["k0", "k1"]), (512 + 100, ["k0", "k1", "k2"])],
    ids=["in-header", "in-data"],
)
def test_truncated_tar_keeps_its_complete_samples_counts_and_warns(tmp_path, extra, kept):
    url = write_shard(tmp_path / "t.tar", [image_sample(f"k{i}") for i in range(6)])
    cut(url, "k3.jpg", extra)
    skipped = Counter()
    with pytest.warns(UserWarning, match="truncated"):
        keys = [s["__key__"] for s in iter_tar_samples(url, skipped)]
    assert keys == kept
    assert skipped == {"bad_shard": 1}


def test_garbage_after_good_members_is_reported(tmp_path):
    url = write_shard(tmp_path / "g.tar", [image_sample(f"k{i}") for i in range(3)])
    with tarfile.open(url) as tar:
        end = tar.getmember("k2.txt").offset_data + 512
    data = bytearray(open(url, "rb").read())
    data[end : end + 512] = b"garbage!" * 64
    open(url, "wb").write(bytes(data))
    index = index_tar(url)
    assert index.problem is not None and "header" in index.problem
    assert [ref.key for ref in index.samples] == ["k0", "k1"]  # the sample before the damage may be incomplete


def test_garbage_file_gives_no_samples_and_never_raises(tmp_path):
    url = tmp_path / "garbage.tar"
    url.write_bytes(b"this is not a tar file" * 100)
    skipped = Counter()
    with pytest.warns(UserWarning):
        assert list(iter_tar_samples(str(url), skipped)) == []
    assert skipped["bad_shard"] == 1
    assert index_tar(str(tmp_path / "missing.tar")).problem is not None


def raw(sample: dict) -> dict:
    """A writer-side sample as the reader yields it (members as bytes)."""
    return {k: v.encode() if isinstance(v, str) and not k.startswith("__") else v for k, v in sample.items()}


def test_decode_image_sample_cleans_caption_and_parses_json():
    decoded = decode_image_sample(
        {**raw(image_sample("k", "A RED  Car!")), "json": b'{"image_id": 3}'}, random.Random(0), TRANSFORM
    )
    assert decoded["caption"] == "a red car"
    assert decoded["meta"] == {"image_id": 3}
    assert decoded["key"] == "k"
    assert decoded["pixel_values"].shape == (3, 8, 8)


@pytest.mark.parametrize(
    ("sample", "reason"),
    [
        (raw(image_sample("k", image=b"\xff\xd8 not really a jpeg")), "corrupt_image"),
        (raw(image_sample("k", image=jpeg_bytes(3)[:200])), "corrupt_image"),
        (raw(image_sample("k", caption=None)), "missing_caption"),
        (raw(image_sample("k", caption=" ...!  ")), "empty_caption"),
        ({"__key__": "k", "txt": b"no image here"}, "missing_image"),
        ({**raw(image_sample("k")), "json": b"{broken"}, "bad_json"),
        ({**raw(image_sample("k")), "json": b"[1, 2]"}, "bad_json"),
    ],
)
def test_unusable_image_samples_raise_skip_with_reason(sample, reason):
    with pytest.raises(SkipSample) as skip:
        decode_image_sample(sample, random.Random(0), TRANSFORM)
    assert skip.value.reason == reason


def test_decode_codes_sample_reads_32_little_endian_int16():
    codes = [8191, 0, 1, 256] + list(range(100, 128))
    decoded = decode_codes_sample({"__key__": "k", "codes": struct.pack("<32h", *codes), "txt": b"A cat."}, None, 32)
    assert decoded["codes"].dtype == torch.long
    assert decoded["codes"].tolist() == codes
    assert decoded["caption"] == "a cat"
    for bad in [struct.pack("<31h", *range(31)), struct.pack("<32h", *([-1] + [0] * 31))]:
        with pytest.raises(SkipSample, match="bad_codes"):
            decode_codes_sample({"__key__": "k", "codes": bad, "txt": b"x"}, None, 32)
    with pytest.raises(SkipSample, match="missing_codes"):
        decode_codes_sample({"__key__": "k", "txt": b"x"}, None, 32)


def test_decode_codes_sample_reads_as_many_codes_as_it_is_told():
    raw = {"__key__": "k", "codes": struct.pack("<16h", *range(16)), "txt": b"x"}
    assert make_decoder("codes", TRANSFORM, 50, codes_per_image=16)(raw, None)["codes"].tolist() == list(range(16))
    with pytest.raises(SkipSample, match="bad_codes"):
        make_decoder("codes", TRANSFORM, 50, codes_per_image=32)(raw, None)


def test_collate_stacks_tensors_and_lists_the_rest():
    batch = collate_samples([{"codes": torch.arange(3) + i, "caption": f"c{i}", "meta": {"i": i}} for i in range(2)])
    assert batch["codes"].tolist() == [[0, 1, 2], [1, 2, 3]]
    assert batch["caption"] == ["c0", "c1"] and batch["meta"] == [{"i": 0}, {"i": 1}]


def test_shuffle_buffer_permutes_deterministically():
    def drain(seed, size):
        source = iter(range(100))
        buffer = ShuffleBuffer(size, random.Random(seed))
        return [buffer.draw(lambda: next(source)) for _ in range(90)]

    assert drain(0, 10) == drain(0, 10)
    assert drain(0, 10) != drain(1, 10)
    assert drain(0, 10) != list(range(90)) and len(set(drain(0, 10))) == 90
    assert max(abs(v - i) for i, v in enumerate(drain(0, 10))) < 40  # a window, not a global shuffle
    assert drain(0, 0) == list(range(90))


def test_mixer_respects_weights_and_resamples_shards(tmp_path):
    big = [write_shard(tmp_path / f"a{i}.tar", [image_sample(f"a{i}_{j}") for j in range(5)]) for i in range(2)]
    small = [write_shard(tmp_path / "b.tar", [image_sample(f"b_{j}") for j in range(3)])]
    mixer = WeightedMixer([big, small], [3.0, 1.0], random.Random(0), Counter())
    refs = [mixer.next_ref() for _ in range(2000)]
    from_big = sum(ref.url in big for ref in refs) / len(refs)
    assert 0.71 < from_big < 0.79
    assert {ref.key for ref in refs} == {f"a{i}_{j}" for i in range(2) for j in range(5)} | {f"b_{j}" for j in range(3)}


def shards_with_problems(tmp_path) -> list[str]:
    good = write_shard(tmp_path / "good.tar", [image_sample(f"g{i}", f"Good {i}") for i in range(7)])
    mixed = write_shard(
        tmp_path / "mixed.tar",
        [
            image_sample("m0"),
            image_sample("m1", image=b"corrupt"),
            image_sample("m2", caption=None),
            image_sample("m3"),
            image_sample("m4"),
        ],
    )
    cut(mixed, "m4.jpg", 512 + 50)
    return [good, mixed]


def new_stream(urls, state=None, batch_size=3):
    return TrainStream(
        [urls], [1.0], make_decoder("image", TRANSFORM, 50, 32), batch_size, 6, worker=0, stream_id="test", state=state
    )


def test_train_stream_skips_and_counts_bad_samples_without_raising(tmp_path):
    stream = new_stream(shards_with_problems(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = [stream.next_batch() for _ in range(12)]
        stream.report_problems()  # damaged shards are reported together, once per kind
    assert [str(warning.message) for warning in caught] == [
        f"train stream 0: 1 shard(s) truncated (first: {tmp_path}/mixed.tar: member 'm4.jpg' is cut off (truncated"
        " file)); the complete samples before any damage are used"
    ]
    assert all(b["pixel_values"].shape == (3, 3, 8, 8) for b in batches)
    keys = {key for b in batches for key in b["key"]}
    assert {"m0", "m3"} <= keys and not keys & {"m1", "m2", "m4"}
    assert stream.skipped["corrupt_image"] > 0 and stream.skipped["missing_caption"] > 0
    assert stream.skipped["bad_shard"] > 0


@pytest.mark.filterwarnings("ignore:shard .* cut off")
def test_train_stream_resumes_exactly_from_any_batch_state(tmp_path):
    urls = shards_with_problems(tmp_path)
    stream = new_stream(urls)
    batches, states = [], []
    for _ in range(8):
        batches.append(stream.next_batch())
        states.append(stream.state())
    for resume_after in (0, 3, 6):
        # Through the checkpoint's plain-data form, as torch.load(weights_only=True) returns it.
        buffer = io.BytesIO()
        torch.save(states[resume_after].as_dict(), buffer)
        buffer.seek(0)
        state = StreamState.from_dict(torch.load(buffer, weights_only=True))
        resumed = new_stream(urls, state)
        for expected in batches[resume_after + 1 :]:
            batch = resumed.next_batch()
            assert batch["key"] == expected["key"]
            assert torch.equal(batch["pixel_values"], expected["pixel_values"])
        assert resumed.skipped == stream.skipped


def test_train_stream_with_no_usable_sample_stops_with_a_data_error(tmp_path):
    url = write_shard(tmp_path / "captions-only.tar", [{"__key__": f"k{i}", "txt": "text"} for i in range(10)])
    stream = new_stream([url])
    with pytest.raises(DataError, match="in a row were unusable"):
        stream.next_batch()
    assert stream.skipped["missing_image"] == MAX_CONSECUTIVE_SKIPS
