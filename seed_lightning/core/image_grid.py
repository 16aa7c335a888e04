"""Image grids with captions rendered in (original | regenerated | caption), for TensorBoard."""

import textwrap
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

CAPTION_LINES = 3
"""Lines of caption text under each row (longer captions are cut)."""
PADDING = 2
"""Pixels between cells and around the text."""


def image_grid(rows: Sequence[Sequence[Image.Image]], captions: Sequence[str], cell_size: int = 128) -> Image.Image:
    """One row per sample: its images side by side (each resized to cell_size x cell_size), its caption below.

    Every row must have the same number of images. Returns an RGB image of width
    columns * (cell_size + PADDING) + PADDING and height rows * (cell_size + caption block + PADDING) + PADDING.
    """
    if not rows or len(rows) != len(captions):
        raise ValueError(f"need one caption per row and at least one row, got {len(rows)} rows, {len(captions)} captions")
    columns = len(rows[0])
    if columns == 0 or any(len(row) != columns for row in rows):
        raise ValueError("every row needs the same, non-zero number of images")
    font = ImageFont.load_default()
    line_height = _line_height(font)
    caption_height = CAPTION_LINES * line_height + PADDING
    row_height = cell_size + caption_height + PADDING
    width = columns * (cell_size + PADDING) + PADDING
    grid = Image.new("RGB", (width, len(rows) * row_height + PADDING), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    chars_per_line = max(1, int((width - 2 * PADDING) // max(1.0, font.getlength("n"))))
    for row_number, (images, caption) in enumerate(zip(rows, captions)):
        top = PADDING + row_number * row_height
        for column, image in enumerate(images):
            cell = image.convert("RGB").resize((cell_size, cell_size), Image.Resampling.BICUBIC)
            grid.paste(cell, (PADDING + column * (cell_size + PADDING), top))
        lines = textwrap.wrap(caption, chars_per_line)[:CAPTION_LINES]
        for line_number, line in enumerate(lines):
            draw.text((PADDING, top + cell_size + PADDING + line_number * line_height), line, fill=(0, 0, 0), font=font)
    return grid


def _line_height(font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    left, top, right, bottom = font.getbbox("Ag")
    return int(bottom - top) + PADDING


def to_chw_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor [3, H, W] (what TensorBoard's add_image takes)."""
    pixels = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return pixels.view(image.height, image.width, 3).permute(2, 0, 1).contiguous()
