import io
import random

import pytest
import torch
from PIL import Image

from seed_lightning.core.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    ImageTransform,
    draft_for_box,
    random_resized_crop_box,
    to_rgb,
)

WHITE = (torch.ones(3) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)


def encoded(image: Image.Image, image_format: str) -> Image.Image:
    """The image as a decoder sees it: saved, then re-opened lazily."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return Image.open(io.BytesIO(buffer.getvalue()))


def gradient(width: int, height: int) -> Image.Image:
    """Red grows left to right, green top to bottom: every crop and flip changes the pixels."""
    vertical = Image.linear_gradient("L").resize((width, height))
    horizontal = Image.linear_gradient("L").transpose(Image.Transpose.ROTATE_90).resize((width, height))
    return Image.merge("RGB", (horizontal, vertical, Image.new("L", (width, height), 128)))


def sixteen_bit_grey(value: int) -> Image.Image:
    return encoded(Image.new("I;16", (12, 9), value), "PNG")


def palette_with_transparency() -> Image.Image:
    image = Image.new("P", (12, 9), 3)
    image.info["transparency"] = 3
    return image


@pytest.mark.parametrize(
    "make_image",
    [
        lambda: encoded(Image.new("L", (20, 15), 90), "PNG"),
        lambda: encoded(Image.new("LA", (20, 15), (90, 128)), "PNG"),
        lambda: encoded(Image.new("RGBA", (20, 15), (200, 10, 10, 60)), "PNG"),
        lambda: encoded(Image.new("P", (20, 15), 7), "GIF"),
        lambda: encoded(Image.new("CMYK", (20, 15), (0, 200, 200, 0)), "JPEG"),
        lambda: encoded(Image.new("L", (20, 15), 90), "JPEG"),
        lambda: Image.new("1", (20, 15), 1),
        lambda: Image.new("F", (20, 15), 0.25),
        lambda: sixteen_bit_grey(40000),
        lambda: encoded(gradient(10, 7), "JPEG"),
        palette_with_transparency,
    ],
    ids=["L", "LA", "RGBA", "P", "CMYK-jpeg", "L-jpeg", "1", "F", "I;16", "tiny-10x7", "P-transparency"],
)
@pytest.mark.parametrize("train", [True, False])
def test_any_mode_and_size_gives_finite_square_tensor(make_image, train):
    pixels = ImageTransform(image_size=24, train=train)(make_image(), random.Random(0))
    assert pixels.shape == (3, 24, 24)
    assert pixels.dtype == torch.float32
    assert torch.isfinite(pixels).all()


def test_alpha_and_palette_transparency_are_composited_on_white():
    assert to_rgb(Image.new("RGBA", (4, 4), (255, 0, 0, 0))).getpixel((1, 1)) == (255, 255, 255)
    assert to_rgb(Image.new("RGBA", (4, 4), (255, 0, 0, 255))).getpixel((1, 1)) == (255, 0, 0)
    assert to_rgb(palette_with_transparency()).getpixel((1, 1)) == (255, 255, 255)
    pixels = ImageTransform(image_size=8)(Image.new("LA", (8, 8), (0, 0)), random.Random(0))
    torch.testing.assert_close(pixels, WHITE.view(3, 1, 1).expand(3, 8, 8))


def test_sixteen_bit_grey_is_scaled_not_clipped():
    assert to_rgb(sixteen_bit_grey(65535)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(sixteen_bit_grey(128 * 257)).getpixel((0, 0)) == (128, 128, 128)


def test_eval_is_a_plain_bicubic_resize_with_clip_normalisation():
    image = gradient(40, 30)
    pixels = ImageTransform(image_size=16, train=False)(encoded(image, "PNG"), random.Random(0))
    expected = torch.tensor(list(image.resize((16, 16), Image.Resampling.BICUBIC).getdata()), dtype=torch.float32)
    expected = (expected.view(16, 16, 3).permute(2, 0, 1) / 255 - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(
        CLIP_STD
    ).view(3, 1, 1)
    torch.testing.assert_close(pixels, expected)


def test_train_crops_are_deterministic_per_rng_and_vary_across_rngs():
    transform = ImageTransform(image_size=16, train=True)
    image = gradient(64, 48)
    first = transform(encoded(image, "PNG"), random.Random(5))
    again = transform(encoded(image, "PNG"), random.Random(5))
    others = [transform(encoded(image, "PNG"), random.Random(seed)) for seed in range(6, 10)]
    assert torch.equal(first, again)
    assert all(not torch.equal(first, other) for other in others)


def test_hflip_flips_about_half_the_time():
    image = gradient(32, 32)
    full_view = ImageTransform(image_size=16, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    plain = ImageTransform(image_size=16, train=False)(image, random.Random(0))
    outputs = [full_view(image, random.Random(seed)) for seed in range(40)]
    flipped = sum(torch.equal(out, plain.flip(-1)) for out in outputs)
    unflipped = sum(torch.equal(out, plain) for out in outputs)
    assert flipped + unflipped == 40
    assert 10 <= flipped <= 30
    no_flip = ImageTransform(image_size=16, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False)
    assert all(torch.equal(no_flip(image, random.Random(seed)), plain) for seed in range(10))


def test_random_resized_crop_box_respects_scale_and_ratio():
    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = random_resized_crop_box(300, 200, (0.5, 1.0), (3 / 4, 4 / 3), rng)
        width, height = right - left, bottom - top
        assert 0 <= left and right <= 300 and 0 <= top and bottom <= 200
        assert 0.5 * 60000 * 0.97 <= width * height <= 60000
        assert 3 / 4 * 0.95 <= width / height <= 4 / 3 * 1.05


def test_random_resized_crop_falls_back_to_ratio_clamped_centre_crop():
    # A 100x1 strip has no crop with area >= 50 and aspect <= 4/3: torchvision's fallback is a 1x1 centre crop.
    assert random_resized_crop_box(100, 1, (0.5, 1.0), (3 / 4, 4 / 3), random.Random(0)) == (49, 0, 50, 1)
    assert random_resized_crop_box(1, 100, (0.5, 1.0), (3 / 4, 4 / 3), random.Random(0)) == (0, 49, 1, 50)


def test_large_jpeg_is_drafted_never_below_the_needed_size_and_stays_close():
    photo = encoded(gradient(1600, 1200).resize((3200, 2400)), "JPEG")
    box = draft_for_box(photo, (0, 0, 3200, 2400), 224)
    assert photo.size == (400, 300)  # decoded at 1/8: still >= 224 per side
    assert box == (0, 0, 400, 300)
    crop = draft_for_box(encoded(gradient(800, 600), "JPEG"), (100, 100, 300, 300), 64)
    assert crop == (50, 50, 150, 150)  # 1/2 scale keeps the 200-pixel crop at 100 >= 64

    drafted = ImageTransform(image_size=32)(encoded(gradient(1600, 1200), "JPEG"), random.Random(0))
    full = ImageTransform(image_size=32, jpeg_draft=False)(encoded(gradient(1600, 1200), "JPEG"), random.Random(0))
    assert (drafted - full).abs().mean() < 0.05


def test_png_is_never_drafted():
    image = encoded(gradient(800, 600), "PNG")
    assert draft_for_box(image, (0, 0, 800, 600), 32) == (0, 0, 800, 600)
    assert image.size == (800, 600)
