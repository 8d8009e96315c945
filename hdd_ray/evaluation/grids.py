"""Sample grids: images as one PNG, a row per distinct prompt with its text on the left.

What a person looks at: an evaluated mixture's ``grid.png``, a finished expert's preview
(:mod:`hdd_ray.preview`) and ``jobs/sample.py``'s output.
"""

from __future__ import annotations

import io

import torch
from torch import Tensor

from hdd_ray import storage

__all__ = ["save_grid"]


def save_grid(path: str, images: Tensor, prompts: list[str], per_row: int = 8,
              scale: int = 4) -> bytes:
    """A PNG grid (one row per distinct prompt, its text on the left); returns the PNG bytes."""
    from PIL import Image, ImageDraw

    rows: dict[str, list[Tensor]] = {}
    for img, p in zip(images, prompts, strict=True):
        if len(rows.get(p, [])) < per_row:
            rows.setdefault(p, []).append(img)
    rows = dict(list(rows.items())[:16])
    c, h, w = images.shape[1:]
    cell_h, cell_w, label_w = h * scale + 2, w * scale + 2, 220
    canvas = Image.new("RGB", (label_w + per_row * cell_w, max(1, len(rows)) * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (prompt, imgs) in enumerate(rows.items()):
        draw.text((4, r * cell_h + cell_h // 2 - 5), prompt[:36], fill="black")
        for j, img in enumerate(imgs):
            arr = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            arr = arr[0].numpy() if c == 1 else arr.permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr).convert("RGB").resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (label_w + j * cell_w + 1, r * cell_h + 1))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    storage.write_bytes(path, buf.getvalue())
    return buf.getvalue()
