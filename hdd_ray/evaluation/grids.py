"""Sample grids: images as PNG pages, a row per distinct prompt with its text on the left.

What a person looks at: an evaluated mixture's ``grid.png``, a finished expert's preview
(:mod:`hdd_ray.preview`) and ``jobs/sample.py``'s output. Tiles are enlarged (nearest) only up
to :data:`MIN_TILE` pixels, so 8 px digits are visible and 256 px images stay at their size; a
page holds :data:`ROWS_PER_PAGE` prompts and further prompts go to further pages
(``grid.png``, ``grid-p2.png``, ...), none dropped unless the caller caps the pages.
"""

from __future__ import annotations

import io
import logging

import torch
from torch import Tensor

from hdd_ray import storage

__all__ = ["MIN_TILE", "ROWS_PER_PAGE", "page_path", "save_grid", "tile_scale"]

log = logging.getLogger(__name__)

#: images smaller than this many pixels are enlarged (by a whole factor) towards it
MIN_TILE = 32
#: prompts (rows) per page
ROWS_PER_PAGE = 16
_LABEL_W = 220


def tile_scale(height: int, width: int) -> int:
    """The whole enlargement factor of a ``height`` x ``width`` image (1 from MIN_TILE up)."""
    return max(1, MIN_TILE // max(height, width))


def page_path(path: str, page: int) -> str:
    """The file of page ``page`` (0-based) of the grid at ``path``: ``path`` itself for the
    first, ``<stem>-p<page + 1><ext>`` after it."""
    if page == 0:
        return path
    stem, dot, ext = path.rpartition(".")
    return f"{stem}-p{page + 1}.{ext}" if dot and "/" not in ext else f"{path}-p{page + 1}"


def save_grid(path: str, images: Tensor, prompts: list[str], per_row: int = 8,
              max_pages: int | None = None) -> list[bytes]:
    """Write the grid as PNG pages (:func:`page_path`), one row per distinct prompt (its
    first ``per_row`` images, its text on the left), :data:`ROWS_PER_PAGE` rows a page; at
    most ``max_pages`` pages (None: every prompt, and a capped grid says so in the log).
    Returns the pages' PNG bytes, in order."""
    rows: dict[str, list[Tensor]] = {}
    for img, p in zip(images, prompts, strict=True):
        if len(rows.get(p, [])) < per_row:
            rows.setdefault(p, []).append(img)
    items = list(rows.items())
    pages = [items[i: i + ROWS_PER_PAGE] for i in range(0, max(1, len(items)), ROWS_PER_PAGE)]
    if max_pages is not None and len(pages) > max_pages:
        log.info("grid %s: the first %d of %d prompts (%d pages)", path,
                 max_pages * ROWS_PER_PAGE, len(items), max_pages)
        pages = pages[:max_pages]
    out = []
    for number, page in enumerate(pages):
        png = _page_png(page, tuple(images.shape[1:]), per_row)
        storage.write_bytes(page_path(path, number), png)
        out.append(png)
    return out


def _page_png(rows: list[tuple[str, list[Tensor]]], shape: tuple[int, ...],
              per_row: int) -> bytes:
    from PIL import Image, ImageDraw

    c, h, w = shape
    scale = tile_scale(h, w)
    cell_h, cell_w = h * scale + 2, w * scale + 2
    canvas = Image.new("RGB", (_LABEL_W + per_row * cell_w, max(1, len(rows)) * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (prompt, imgs) in enumerate(rows):
        draw.text((4, r * cell_h + cell_h // 2 - 5), prompt[:36], fill="black")
        for j, img in enumerate(imgs):
            arr = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            arr = arr[0].numpy() if c == 1 else arr.permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr).convert("RGB")
            if scale > 1:
                tile = tile.resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (_LABEL_W + j * cell_w + 1, r * cell_h + 1))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
