"""Benchmark images: distinct JPEGs cut from the photos bundled in scikit-learn and scikit-image.

Nothing is downloaded: scikit-image's ``skimage.data`` fetches some files with pooch, so only the
photos shipped inside the wheel are used and each is checked to be on disk before it is loaded.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

OUT_SIZE = (500, 375)
JPEG_QUALITY = 90
_META = "images.json"
MANIFEST = "manifest.csv"

# skimage.data loader -> the file it reads from the wheel (checked before calling the loader).
_SKIMAGE_PHOTOS = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "retina": "retina.jpg",
}


def _skimage_photos() -> list[np.ndarray]:
    import skimage.data

    bundled = Path(skimage.data.__file__).parent
    photos = []
    for loader, filename in _SKIMAGE_PHOTOS.items():
        if not (bundled / filename).is_file():  # would be fetched over the network: skip it
            continue
        fn: Callable[[], np.ndarray] = getattr(skimage.data, loader)
        photos.append(np.asarray(fn())[..., :3])
    return photos


def source_photos() -> list[np.ndarray]:
    """All bundled RGB photos as uint8 arrays [H, W, 3]."""
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(img)[..., :3] for img in load_sample_images().images]
    return photos + _skimage_photos()


def _random_view(photo: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A random crop (random scale, random place), random flips, resized to OUT_SIZE."""
    h, w = photo.shape[:2]
    aspect = OUT_SIZE[0] / OUT_SIZE[1]
    scale = rng.uniform(0.45, 1.0)
    cw = int(min(w, h * aspect) * scale)
    ch = int(cw / aspect)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = photo[y : y + ch, x : x + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.2:
        crop = crop[::-1, :]
    return Image.fromarray(np.ascontiguousarray(crop)).resize(OUT_SIZE, Image.Resampling.BILINEAR)


def _cached(folder: Path, n: int, seed: int) -> bool:
    meta = folder / _META
    if not (meta.is_file() and (folder / MANIFEST).is_file()):
        return False
    info = json.loads(meta.read_text())
    present = sum(1 for i in range(n) if (folder / f"img_{i:06d}.jpg").is_file())
    return info.get("seed") == seed and info.get("n", -1) >= n and present == n


def _write_manifest(folder: Path, n: int) -> Path:
    path = folder / MANIFEST
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["uri", "image_id"])
        for i in range(n):
            writer.writerow([str((folder / f"img_{i:06d}.jpg").resolve()), f"img_{i:06d}"])
    os.replace(tmp, path)
    return path


def make_images(folder: str | os.PathLike[str], n: int, seed: int = 0) -> str:
    """Write ``n`` distinct JPEGs and ``manifest.csv`` (``uri,image_id``) into ``folder``.

    Reuses the folder when it already holds at least ``n`` images made with the same seed
    (the manifest is rewritten to list exactly ``n``). Returns the manifest path.
    """
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    if _cached(root, n, seed):
        return str(_write_manifest(root, n))
    photos = source_photos()
    rng = np.random.default_rng(seed)
    for i in range(n):
        photo = photos[i % len(photos)]
        _random_view(photo, rng).save(root / f"img_{i:06d}.jpg", quality=JPEG_QUALITY)
    (root / _META).write_text(json.dumps({"seed": seed, "n": n, "sources": len(photos)}))
    return str(_write_manifest(root, n))


if __name__ == "__main__":
    import sys

    print(make_images(sys.argv[1], int(sys.argv[2])))
