"""Sample grids: float images in [-1, 1] -> one uint8 PNG."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] -> {0..255}: the inverse of the data scaling x/127.5 - 1 (Ho et al. §3.3), rounded and clipped."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, *, columns: int | None = None, padding: int = 1) -> np.ndarray:
    """[N, H, W, C] in [-1, 1] -> uint8 [rows·(H+p)+p, columns·(W+p)+p, C], row-major, black padding."""
    images = to_uint8(images)
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * (h + padding) + padding, columns * (w + padding) + padding, c), np.uint8)
    for i, image in enumerate(images):
        top, left = padding + (i // columns) * (h + padding), padding + (i % columns) * (w + padding)
        grid[top:top + h, left:left + w] = image
    return grid


def save_grid(path: str, images: np.ndarray, *, scale: int = 1) -> np.ndarray:
    """Saves make_grid(images) as a PNG, enlarged `scale` times (nearest) so 8×8 digits are visible."""
    grid = make_grid(images)
    pil = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), resample=Image.NEAREST)
    pil.save(path)
    return grid
