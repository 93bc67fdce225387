"""DreamBooth images: read a folder, fix orientation and mode, crop to a square, scale to [-1, 1].

Every file is decoded once when the dataset is built, so a corrupt or unreadable image fails
before training starts with a message naming it. Images are resized there too (shorter side
= resolution); the crop and flip are drawn per access from torch's global RNG, so the loop's
seed fixes them, as in the diffusers DreamBooth script (Resize -> Center/RandomCrop -> Flip).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nora_cli.errors import NoraError

if TYPE_CHECKING:
    import torch
    from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name (so runs are reproducible)."""
    path = Path(folder)
    if not path.is_dir():
        raise NoraError(f"image folder not found: {path}")
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_image(path: Path) -> Image.Image:
    """Decode fully (truncated files fail here, not mid-training), apply EXIF orientation, convert to RGB."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as raw:
            raw.load()
            image = ImageOps.exif_transpose(raw)
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise NoraError(f"cannot read image {path}: {err}") from None


def resize_shorter(image: Image.Image, resolution: int) -> Image.Image:
    """Scale so the shorter side equals `resolution` (bilinear, antialiased by PIL's resampler)."""
    from PIL import Image

    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR) if size != image.size else image


def to_training_tensor(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool) -> torch.Tensor:
    """Crop a `resolution` square (center or random), maybe flip, and map [0, 255] to [-1, 1] as (3, H, W)."""
    import numpy as np
    import torch

    width, height = image.size
    if center_crop:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    else:
        left = int(torch.randint(0, width - resolution + 1, ()).item())
        top = int(torch.randint(0, height - resolution + 1, ()).item())
    pixels = torch.from_numpy(np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.float32))
    pixels = pixels.permute(2, 0, 1) / 127.5 - 1.0
    if random_flip and torch.rand(()) < 0.5:
        pixels = pixels.flip(-1)
    return pixels.contiguous()


class ImageFolder(Sequence):
    """The images of one folder, decoded and resized once; item i is a fresh (3, res, res) tensor."""

    def __init__(self, folder: str | Path, resolution: int, center_crop: bool = True, random_flip: bool = False,
                 limit: int | None = None):
        paths = list_images(folder)[:limit]
        if not paths:
            raise NoraError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
        self.paths = paths
        self.images = [resize_shorter(load_image(p), resolution) for p in paths]
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        return to_training_tensor(self.images[index], self.resolution, self.center_crop, self.random_flip)


class DreamBoothExamples(Sequence):
    """Instance images (and, with prior preservation, class images) paired by index.

    Length is the larger of the two folders, as in the diffusers script, so every class image is seen
    once per epoch while instance images repeat.
    """

    def __init__(self, instance: ImageFolder, prior: ImageFolder | None = None):
        self.instance, self.prior = instance, prior

    def __len__(self) -> int:
        return max(len(self.instance), len(self.prior) if self.prior is not None else 0)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(index)
        example = {"instance": self.instance[index % len(self.instance)]}
        if self.prior is not None:
            example["prior"] = self.prior[index % len(self.prior)]
        return example


def ensure_class_images(
    folder: str | Path, count: int, generate: Callable[[int, int], list[Image.Image]], batch_size: int = 4
) -> int:
    """Fill `folder` up to `count` images by calling `generate(first_index, n)`; returns how many were written.

    The index seeds generation, so a rerun after an interruption continues with new images instead of
    repeating the ones already on disk; names carry a content hash so nothing is overwritten.
    """
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    existing = len(list_images(path))
    missing = max(0, count - existing)
    written = 0
    while written < missing:
        for image in generate(existing + written, min(batch_size, missing - written)):
            digest = hashlib.sha1(image.tobytes()).hexdigest()[:12]
            image.save(path / f"{existing + written:04d}-{digest}.jpg")
            written += 1
    return written
