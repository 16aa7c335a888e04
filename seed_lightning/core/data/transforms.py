"""The data loaders' image preprocessing with PIL + torch (no torchvision): any PIL mode -> RGB -> crop/resize ->
CLIP-normalised tensor.

The training crop is torchvision's RandomResizedCrop algorithm driven by an explicit `random.Random`, so a
sample's augmentation is a pure function of its position in the stream (needed for exact resume).

These transforms favour loader speed and robust decoding over bit-exactness: JPEGs are decoded at reduced scale
where the output keeps enough pixels (`jpeg_draft`, switchable: `ShardDataModule(jpeg_draft=...)`), transparency
is composited on white and 16-bit greyscale is scaled, not clipped. The exact official SEED inference input
(PIL `convert("RGB")`, bicubic resize, mean/std) is `SeedTokenizer.preprocess`, which token extraction and the
inference commands use.
"""

import math
import random
from dataclasses import dataclass

import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")

Box = tuple[float, float, float, float]
"""(left, upper, right, lower) in pixels, PIL's box convention."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha (and palette transparency) is composited on white, 16/32-bit greyscale
    is scaled down to 8 bits instead of being clipped (PIL's own `convert("L")` clips 16-bit values at 255)."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        image = image.convert("I").point(lambda value: value * (255 / 65535)).convert("L")
    elif image.mode in ("I", "F"):
        # 32-bit containers carry 16-bit data (TIFF/PNG) or floats in [0, 1]; scale only what exceeds 8 bits.
        high = image.getextrema()[1]
        scale = 255 / 65535 if high > 255 else 255.0 if image.mode == "F" and high <= 1.0 else 1.0
        image = image.point(lambda value: value * scale).convert("L")
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: random.Random,
) -> Box:
    """torchvision's `RandomResizedCrop.get_params`: 10 tries at a random area fraction and log-uniform aspect
    ratio, then a centre crop clamped to `ratio` as fallback."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_w = int(round(math.sqrt(target_area * aspect_ratio)))
        crop_h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = rng.randint(0, height - crop_h)
            left = rng.randint(0, width - crop_w)
            return (left, top, left + crop_w, top + crop_h)
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_w, crop_h = int(round(height * max(ratio))), height
    else:
        crop_w, crop_h = width, height
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return (left, top, left + crop_w, top + crop_h)


def draft_for_box(image: Image.Image, box: Box, output_size: int) -> Box:
    """Ask PIL to decode a not-yet-loaded JPEG at 1/2, 1/4 or 1/8 scale where the crop `box` still keeps at least
    `output_size` pixels per side; returns `box` in the coordinates of the (possibly) reduced image.

    JPEG decoding dominates the loader's CPU time for large photos, and DCT-domain downscaling is much cheaper
    (bench/RESULTS.md, data pipeline). Non-JPEGs and already loaded images are left as they are.
    """
    width, height = image.size
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    needed = (math.ceil(width * output_size / crop_w), math.ceil(height * output_size / crop_h))
    if image.format != "JPEG" or needed[0] > width or needed[1] > height:
        return box
    drafted = image.draft(None, needed)
    if drafted is None:
        return box
    factor = width / drafted[1][2]
    return (box[0] / factor, box[1] / factor, box[2] / factor, box[3] / factor)


def image_to_tensor(image: Image.Image, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """RGB PIL image -> normalised float tensor [3, H, W]."""
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = pixels.view(image.height, image.width, 3).permute(2, 0, 1).float().div_(255)
    return pixels.sub_(mean).div_(std)


@dataclass
class ImageTransform:
    """PIL image (any mode, ideally not yet loaded so JPEG draft decoding applies) -> FloatTensor[3, S, S].

    Train: random-resized crop (bicubic) + optional horizontal flip; eval: bicubic resize to S x S (no centre crop,
    as SEED evaluates; see the module docstring for how it differs from the exact official input). Randomness comes
    only from the `rng` argument. With `jpeg_draft` it may reduce a lazily opened JPEG in place (`Image.draft`):
    give it images it owns, as the loaders do.
    """

    image_size: int = 224
    """Output side S in pixels."""
    train: bool = False
    """Random-resized crop + flip (True) or plain resize (False)."""
    scale: tuple[float, float] = (0.5, 1.0)
    """Range of the crop's area as a fraction of the image area (train only)."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Range of the crop's aspect ratio w/h (train only)."""
    hflip: bool = True
    """Flip horizontally with probability 0.5 (train only)."""
    mean: tuple[float, float, float] = CLIP_MEAN
    """Per-channel mean subtracted after scaling to [0, 1]."""
    std: tuple[float, float, float] = CLIP_STD
    """Per-channel standard deviation divided by after subtracting the mean."""
    jpeg_draft: bool = True
    """Decode large JPEGs at reduced scale (never below what the output needs): several times faster, pixels
    slightly different from a full-size decode."""

    def __post_init__(self) -> None:
        self._mean = torch.tensor(self.mean).view(3, 1, 1)
        self._std = torch.tensor(self.std).view(3, 1, 1)

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        width, height = image.size
        if self.train:
            box = random_resized_crop_box(width, height, self.scale, self.ratio, rng)
        else:
            box = (0, 0, width, height)
        if self.jpeg_draft:
            box = draft_for_box(image, box, self.image_size)
        size = (self.image_size, self.image_size)
        image = to_rgb(image).resize(size, Image.Resampling.BICUBIC, box=box)
        if self.train and self.hflip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image_to_tensor(image, self._mean, self._std)
