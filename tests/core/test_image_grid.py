"""image_grid: rows of images with the caption rendered under each row."""

import numpy as np
import pytest
from PIL import Image

from seed_lightning.core.image_grid import CAPTION_LINES, PADDING, image_grid, to_chw_tensor


def solid(color, size=(20, 30)):
    return Image.new("RGB", size, color)


def test_grid_shape_cells_and_caption_text():
    rows = [[solid((255, 0, 0)), solid((0, 0, 255))], [solid((0, 255, 0)), solid((0, 0, 0))]]
    grid = image_grid(rows, ["a red circle and a blue square", ""], cell_size=16)
    pixels = np.asarray(grid)
    row_height = (grid.height - PADDING) // 2
    assert grid.width == 2 * (16 + PADDING) + PADDING
    assert row_height > 16 + CAPTION_LINES * 8  # room for the caption lines
    assert tuple(pixels[PADDING + 8, PADDING + 8]) == (255, 0, 0)  # row 0, original
    assert tuple(pixels[PADDING + 8, PADDING + 16 + PADDING + 8]) == (0, 0, 255)  # row 0, regenerated
    assert tuple(pixels[PADDING + row_height + 8, PADDING + 8]) == (0, 255, 0)  # row 1
    first_caption = pixels[PADDING + 16 : row_height]
    second_caption = pixels[row_height + PADDING + 16 :]
    assert (first_caption < 128).any(), "caption text is drawn in dark pixels"
    assert (second_caption == 255).all(), "an empty caption leaves the area white"


def test_grid_rejects_ragged_rows():
    with pytest.raises(ValueError, match="same"):
        image_grid([[solid(0)], [solid(0), solid(0)]], ["a", "b"])
    with pytest.raises(ValueError, match="one caption per row"):
        image_grid([[solid(0)]], [])


def test_to_chw_tensor():
    tensor = to_chw_tensor(solid((1, 2, 3), size=(5, 4)))
    assert tensor.shape == (3, 4, 5) and tensor[:, 0, 0].tolist() == [1, 2, 3]
