#!/usr/bin/env python
"""Training and validation folders of square crops from your own photographs, cut the way the embedded demo sets are
(`hf_dbp.tasks.image_data`): 2,048 training and 256 validation crops of 48-160 px, training crops from the training
images only, validation crops from the others. The result feeds `compare_bp_dbp.py --train_dir --validation_dir`.

    python examples/crop_folders.py --train_images wallpapers/{a,b,c}.jpg --validation_images wallpapers/d.jpg \\
        --output_dir crops/wallpapers
    python examples/compare_bp_dbp.py --train_dir crops/wallpapers/train --validation_dir crops/wallpapers/validation

Images that ship with packages can be named as the embedded sets name them (`hf_dbp.tasks.image_data`): the
photographs of scikit-image by name (`astronaut`), others as `package:file` (`pywt:aero`, `panda3d:envir-rock2.jpg`).

How docs/results.md made its held-out splits of Debian's `mate-backgrounds` nature photographs (twelve close-ups of
flowers, grass, water and wood): `apt-get download mate-backgrounds && dpkg -x mate-backgrounds_*.deb mate`, then
this script with fold k's validation images the ones at positions k, k + 4 and k + 8 of the twelve in name order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from hf_dbp.tasks.image_data import is_source, random_crops, source_images
from hf_dbp.tasks.image_modes import to_rgb
from hf_dbp.tasks.scripts import parse_script_arguments, run_main


@dataclass
class CropArguments:
    train_images: list[str] = field(
        metadata={
            "help": "Image files the training crops are cut from, or sources of the embedded sets (astronaut, pywt:aero, panda3d:envir-rock2.jpg, ...: hf_dbp.tasks.image_data)."
        }
    )
    validation_images: list[str] = field(
        metadata={"help": "Other images, for the validation crops (files or sources)."}
    )
    output_dir: str = field(metadata={"help": "Where train/ and validation/ are written (PNG files)."})
    num_train: int = field(default=2048, metadata={"help": "Training crops."})
    num_validation: int = field(default=256, metadata={"help": "Validation crops."})
    min_size: int = field(
        default=48, metadata={"help": "Smallest crop side in pixels (smaller images are taken whole)."}
    )
    max_size: int = field(default=160, metadata={"help": "Largest crop side in pixels."})
    seed: int = field(default=0, metadata={"help": "Seed of the crop positions and sizes."})

    def __post_init__(self) -> None:
        missing = [
            path
            for path in self.train_images + self.validation_images
            if not (os.path.isfile(path) or is_source(path))
        ]
        if missing:
            raise ValueError(f"no such image file, nor an embedded source: {', '.join(missing)}")
        shared = set(map(os.path.abspath, self.train_images)) & set(map(os.path.abspath, self.validation_images))
        if shared:
            raise ValueError(f"an image is in both --train_images and --validation_images: {sorted(shared)}")


def main() -> None:
    (args,) = parse_script_arguments([CropArguments], {})
    rng = np.random.default_rng(args.seed)
    for split, paths, count in (
        ("train", args.train_images, args.num_train),
        ("validation", args.validation_images, args.num_validation),
    ):
        images = []
        for path in paths:
            if os.path.isfile(path):
                with Image.open(path) as file:
                    images.append(np.asarray(to_rgb(file)))
            else:
                images += source_images(path)
        folder = os.path.join(args.output_dir, split)
        os.makedirs(folder, exist_ok=True)
        for i, crop in enumerate(random_crops(images, count, rng, args.min_size, args.max_size)):
            crop.save(os.path.join(folder, f"{i:05d}.png"))
        print(f"{count} {split} crops of {len(paths)} image(s) in {folder}")


if __name__ == "__main__":
    run_main(main)
