"""A small ADE20K-layout data set that needs no download: scenes built from textures of scikit-image's photographs,
for the segmentation demo (`examples/run_segmentation.py` without data)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from ..image_data import _photo
from .ade20k import ADE20K_SPLITS

logger = logging.getLogger(__name__)

# Raw ADE20K ids (objectInfo150 numbering, 0 = "other") of the demo's classes, and the scikit-image photograph whose
# texture stands for each (sky is a synthetic gradient). Grayscale textures get a tint, so that colour helps but
# texture is still needed (gravel vs moon rock, brick vs coffee). Textures are cut from the left 70% of each
# photograph for training and the right 30% for validation, so validation textures are unseen.
DEMO_ADE20K_CLASSES = {
    0: "other",
    1: "wall",
    3: "sky",
    10: "grass",
    13: "person",
    14: "earth",
    35: "rock",
    121: "food",
    127: "animal",
}
_DEMO_TEXTURES = {
    # id: (photograph, tint for grayscale ones or None)
    0: ("immunohistochemistry", None),
    1: ("brick", (1.0, 0.6, 0.45)),
    10: ("grass", (0.5, 0.85, 0.3)),
    13: ("astronaut", None),
    14: ("gravel", (0.85, 0.72, 0.55)),
    35: ("moon", (0.8, 0.8, 0.85)),
    121: ("coffee", None),
    127: ("chelsea", None),
}
_DEMO_GROUNDS = (10, 14)  # the lower part of each scene
_DEMO_OBJECTS = (1, 13, 35, 121, 127, 0)  # the shapes in front; 0 makes some "other" pixels (ignored after reduction)
_DEMO_VERSION = 1  # bump when the generator changes, so cached demo folders are regenerated
_DEMO_MARKER = "hf_dbp_demo_ade20k.json"


def _demo_sources(validation: bool) -> dict[int, np.ndarray]:
    sources = {}
    for label, (name, tint) in _DEMO_TEXTURES.items():
        photo = _photo(name)
        if tint is not None:
            photo = np.clip(photo[..., :1].astype(np.float32) * np.asarray(tint, np.float32), 0, 255).astype(np.uint8)
        cut = int(photo.shape[1] * 0.7)
        sources[label] = np.ascontiguousarray(photo[:, cut:] if validation else photo[:, :cut])
    return sources


def _demo_texture(source: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of `source` at a random scale, resized to (height, width), with a random brightness."""
    # Mostly downscaled crops (scale > 1): at 64 px a texture must show several pebbles/blades/bricks to be one.
    scale = min(rng.uniform(1.0, 4.0), source.shape[0] / height, source.shape[1] / width)
    crop_h, crop_w = max(1, int(height * scale)), max(1, int(width * scale))
    top = int(rng.integers(0, source.shape[0] - crop_h + 1))
    left = int(rng.integers(0, source.shape[1] - crop_w + 1))
    texture = cv2.resize(
        source[top : top + crop_h, left : left + crop_w], (width, height), interpolation=cv2.INTER_AREA
    )
    return np.clip(texture.astype(np.float32) * rng.uniform(0.85, 1.15), 0, 255).astype(np.uint8)


def _demo_sky(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    top = rng.uniform((60, 110, 190), (120, 170, 245))
    bottom = rng.uniform((185, 205, 230), (235, 235, 255))
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    sky = np.broadcast_to(top + (bottom - top) * t, (height, width, 3)).astype(np.float32)
    clouds = cv2.resize(rng.uniform(0, 1, (3, 4)).astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    sky = sky + 40.0 * np.clip(clouds, 0, 1)[..., None] + rng.normal(0, 3, (height, width, 1))
    return np.clip(sky, 0, 255).astype(np.uint8)


def _demo_shape(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of one random circle/ellipse, (rotated) rectangle or polygon."""
    canvas = PILImage.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    short = min(height, width)
    cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.2, 0.95) * height
    radius = rng.uniform(0.15, 0.4) * short
    kind = rng.integers(3)
    if kind == 0:
        rx, ry = radius, radius * rng.uniform(0.6, 1.4)
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=1)
    else:
        count = 4 if kind == 1 else int(rng.integers(3, 8))
        if kind == 1:  # a rectangle, turned by a random angle
            angles = rng.uniform(0, np.pi / 2) + np.array([0.0, 0.5, 1.0, 1.5]) * np.pi + rng.uniform(-0.3, 0.3)
            radii = np.full(count, radius)
        else:
            # Evenly spaced angles with jitter: fully random ones often give slivers.
            angles = np.linspace(0, 2 * np.pi, count, endpoint=False) + rng.uniform(0, 2 * np.pi)
            angles += rng.uniform(-0.4, 0.4, count) * np.pi / count
            radii = radius * rng.uniform(0.6, 1.2, count)
        points = [(float(cx + r * np.cos(a)), float(cy + r * np.sin(a))) for r, a in zip(radii, angles, strict=True)]
        draw.polygon(points, fill=1)
    return np.asarray(canvas, dtype=bool)


def _demo_scene(size: int, sources: dict[int, np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One (image, raw label map) pair: sky over a wavy horizon, grass or earth below, 1 to 3 textured shapes."""
    long = int(round(size * 4 / 3))
    height, width = [(size, size), (size, long), (long, size)][int(rng.integers(3))]  # aspect ratios vary, as in ADE
    label = np.full((height, width), 3, dtype=np.uint8)
    image = _demo_sky(height, width, rng)
    x = np.arange(width)
    horizon = height * rng.uniform(0.3, 0.6) + height * 0.06 * np.sin(x * rng.uniform(0.02, 0.1) + rng.uniform(0, 6))
    layers = [(int(rng.choice(_DEMO_GROUNDS)), np.arange(height)[:, None] >= horizon[None, :])]
    for _ in range(int(rng.integers(1, 4))):
        layers.append((int(rng.choice(_DEMO_OBJECTS)), _demo_shape(height, width, rng)))
    for class_id, mask in layers:  # later layers occlude earlier ones
        texture = _demo_texture(sources[class_id], height, width, rng)
        image[mask] = texture[mask]
        label[mask] = class_id
    return image, label


def _demo_files(root: Path, num_train: int, num_validation: int) -> list[tuple[Path, Path]]:
    files = []
    for folder, prefix, count in (("training", "ADE_train", num_train), ("validation", "ADE_val", num_validation)):
        for i in range(1, count + 1):
            name = f"{prefix}_{i:08d}"
            files.append((root / "images" / folder / f"{name}.jpg", root / "annotations" / folder / f"{name}.png"))
    return files


def make_demo_ade20k(root: str, num_train: int = 96, num_validation: int = 24, size: int = 64, seed: int = 0) -> str:
    """Write a small synthetic data set in the ADEChallengeData2016 layout, for tests and demos without a download.

    Args:
        root: the folder to write into (created if needed); `load_ade20k_folder(root)` loads the result.
        num_train: the number of training pairs (`images/training/ADE_train_00000001.jpg`, ... and
            `annotations/training/ADE_train_00000001.png`, ...).
        num_validation: the number of validation pairs (`ADE_val_...` under `validation/`).
        size: the short side of the images, in pixels; the long side is `size` or 4/3 of it.
        seed: the random seed; the same arguments give byte-identical files.

    Returns:
        `root`.

    Each scene is sky (a gradient, ADE20K id 3) over grass (10) or gravel "earth" (14), with one to three circles,
    rectangles or polygons in front, each filled with the texture of one scikit-image photograph standing for a
    class: brick "wall" (1), astronaut "person" (13), moon "rock" (35), coffee "food" (121), cat "animal" (127), and
    immunohistochemistry "other" (0). Annotations are mode "L" PNGs of raw ADE20K ids (see `DEMO_ADE20K_CLASSES`).
    A marker file records the arguments: when it matches and the files are there, nothing is rewritten. Call it from
    one process only (e.g. the main process first, under `TrainingArguments.main_process_first()`).
    """
    if num_train < 1 or num_validation < 1 or size < 8:
        raise ValueError(
            f"need num_train >= 1, num_validation >= 1 and size >= 8; got {num_train}, {num_validation}, {size}"
        )
    folder = Path(root)
    marker = folder / _DEMO_MARKER
    settings = {
        "version": _DEMO_VERSION,
        "num_train": num_train,
        "num_validation": num_validation,
        "size": size,
        "seed": seed,
    }
    files = _demo_files(folder, num_train, num_validation)
    recorded = json.loads(marker.read_text()) if marker.is_file() else None
    if recorded == settings and all(image.is_file() and label.is_file() for image, label in files):
        logger.info("demo ADE20K set already in %s", folder)
        return root
    subfolders = [folder / kind / split for kind in ("images", "annotations") for split in ADE20K_SPLITS.values()]
    existing = [path for sub in subfolders if sub.is_dir() for path in sub.iterdir()]
    if existing and recorded is None:
        # Without our marker these could be someone's real data set: never delete or mix into it.
        raise FileExistsError(
            f"{folder} already holds {len(existing)} file(s) under images/ or annotations/ and no demo marker "
            f"{_DEMO_MARKER}; give make_demo_ade20k an empty or new folder"
        )
    for path in existing:  # an older demo set (other arguments): remove it so that no stale pairs remain
        if path.is_file() and path.name.startswith(("ADE_train_", "ADE_val_")):
            path.unlink()
    marker.unlink(missing_ok=True)
    for sub in subfolders:
        sub.mkdir(parents=True, exist_ok=True)

    # One random stream per split, so that the validation set doesn't change with num_train.
    for split_index in (0, 1):
        rng = np.random.default_rng([seed, split_index])
        sources = _demo_sources(validation=split_index == 1)
        for image_path, label_path in files[:num_train] if split_index == 0 else files[num_train:]:
            image, label = _demo_scene(size, sources, rng)
            PILImage.fromarray(image).save(image_path, quality=92)
            PILImage.fromarray(label).save(label_path)  # uint8 (H, W): mode L
    temporary = marker.with_suffix(".tmp")
    temporary.write_text(json.dumps(settings))
    temporary.replace(marker)  # written last: an interrupted run is regenerated next time
    logger.info("wrote a demo ADE20K set of %d + %d pairs to %s", num_train, num_validation, folder)
    return root


__all__ = ["DEMO_ADE20K_CLASSES", "make_demo_ade20k"]
