"""The mmsegmentation ADE20K augmentation recipe with albumentations (rescale, crop, flip, photometric distortion),
the evaluation transform, and the collate function that pads a batch.

Label convention: ADE20K annotation PNGs hold raw ids, 0 = "other" and 1..150 = the classes of objectInfo150. With
`reduce_labels=True` (the ADE20K default) the transform maps 0 to 255 (ignored by the loss) and k to k - 1, exactly
once; nothing else changes label values.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

# albumentations asks PyPI for a newer version on import (2 s timeout). Runs are offline: don't, unless the user
# asked for it. Set here, in the one module that imports it, before the import below.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402 - needs the variable above
import cv2  # noqa: E402
import numpy as np  # noqa: E402
from albumentations.core.type_definitions import Targets  # noqa: E402
from PIL import ExifTags, ImageOps  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from ..image_data import IMAGENET_MEAN, IMAGENET_STD, SAMPLE_INDEX_COLUMN, EpochSeededAugmentation  # noqa: E402
from ..image_modes import to_rgb  # noqa: E402
from .image_processing import IGNORE_INDEX, REDUCE_LABELS, DBPSegmentationImageProcessor, rescaled_size  # noqa: E402


class _RescaleCrop(A.DualTransform):
    """Rescale keeping the aspect ratio, then (optionally) take a random crop: mmsegmentation's `Resize` with
    `ratio_range` followed by its `RandomCrop` with `cat_max_ratio`.

    The scale makes the short side `short_side * r` unless that makes the long side exceed `long_side * r` (then the
    long side is `long_side * r`), with r uniform in `ratio_range`. The crop is at most `crop_size` (smaller when the
    image is), and is re-drawn up to 10 times until no class covers `cat_max_ratio` or more of its labelled pixels.
    Images are resized bilinearly, masks with nearest neighbour. Defined at module level so that it pickles (DataLoader
    workers started with spawn/forkserver).
    """

    _targets = (Targets.IMAGE, Targets.MASK)

    def __init__(
        self,
        short_side: int,
        long_side: int,
        ratio_range: tuple[float, float] = (1.0, 1.0),
        crop_size: tuple[int, int] | None = None,
        cat_max_ratio: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.short_side = short_side
        self.long_side = long_side
        self.ratio_range = tuple(ratio_range)
        self.crop_size = crop_size
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index
        self.interpolation = cv2.INTER_LINEAR  # for images; masks always use nearest neighbour (apply_to_mask)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("short_side", "long_side", "ratio_range", "crop_size", "cat_max_ratio", "ignore_index")

    def _crop_is_varied(self, mask: np.ndarray, scale: tuple[float, float], box: tuple[int, int, int, int]) -> bool:
        # Judged on the window of the unresized mask that the crop covers: the class proportions are the same up to
        # resampling, and it spares resizing the mask once per try.
        top, left, height, width = box
        y0, x0 = int(top / scale[0]), int(left / scale[1])
        y1 = max(y0 + 1, min(mask.shape[0], int(np.ceil((top + height) / scale[0]))))
        x1 = max(x0 + 1, min(mask.shape[1], int(np.ceil((left + width) / scale[1]))))
        counts = np.bincount(mask[y0:y1, x0:x1].ravel(), minlength=self.ignore_index + 1)
        counts[self.ignore_index] = 0
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum()

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        ratio = self.py_random.uniform(*self.ratio_range)
        new_height, new_width = rescaled_size(height, width, self.short_side * ratio, self.long_side * ratio)
        box = (0, 0, new_height, new_width)
        if self.crop_size is not None:
            crop_height, crop_width = min(self.crop_size[0], new_height), min(self.crop_size[1], new_width)
            mask = data.get("mask")
            for _ in range(10):
                top = self.py_random.randint(0, new_height - crop_height)
                left = self.py_random.randint(0, new_width - crop_width)
                box = (top, left, crop_height, crop_width)
                if mask is None or self.cat_max_ratio >= 1.0:
                    break
                if self._crop_is_varied(mask, (new_height / height, new_width / width), box):
                    break
        return {"new_size": (new_height, new_width), "box": box}

    @staticmethod
    def _resize_crop(array: np.ndarray, new_size: tuple[int, int], box: tuple[int, int, int, int], interpolation: int):
        if array.shape[:2] != new_size:
            array = cv2.resize(array, (new_size[1], new_size[0]), interpolation=interpolation)
        top, left, height, width = box
        return array[top : top + height, left : left + width]

    def apply(self, img: np.ndarray, new_size: tuple[int, int], box: tuple[int, int, int, int], **params: Any):
        return self._resize_crop(img, new_size, box, self.interpolation)

    def apply_to_mask(
        self, mask: np.ndarray, new_size: tuple[int, int], box: tuple[int, int, int, int], **params: Any
    ):
        return self._resize_crop(mask, new_size, box, cv2.INTER_NEAREST)  # never anything else: labels are ids


def _as_label_map(annotation: Any) -> np.ndarray:
    if isinstance(annotation, PILImage.Image) and annotation.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        # The pair rule above: an annotation is oriented by its own tag only (a no-op after `datasets` decoded it).
        # Transposition moves pixels without interpolating: label values are unchanged.
        annotation = ImageOps.exif_transpose(annotation)
    array = np.asarray(annotation)  # a palette ("P") image gives its indices, which are the class ids
    if array.ndim != 2:
        mode = getattr(annotation, "mode", None)
        raise ValueError(
            f"the annotation must be a single-channel label map; got shape {array.shape}"
            + (f" (mode {mode})" if mode else "")
            + ": a colour-coded annotation? Map its colours to class ids (check_segmentation_pairs reports these)"
        )
    if array.dtype != np.uint8:
        if array.dtype.kind not in "biu" or (array.size and (array.min() < 0 or array.max() > 255)):
            raise ValueError(f"annotation values must be integers in 0..255; got dtype {array.dtype}")
        array = array.astype(np.uint8)
    return array


def _as_rgb(image: Any) -> np.ndarray:
    # Any mode, EXIF orientation applied (see `hf_dbp.tasks.image_modes.to_rgb`; the pair rule above).
    return to_rgb(image if isinstance(image, PILImage.Image) else np.asarray(image))


class SegmentationTransform(EpochSeededAugmentation):
    """The mmsegmentation ADE20K augmentation (as used by BEiT and MAE for UperNet fine-tuning), with albumentations.

    Args:
        crop_size: training crop size, an int or (height, width). Its short side is also the evaluation resolution.
        train: training augmentation (True) or evaluation preprocessing (False).
        reduce_labels: map raw ids 0 -> 255 (ignored), k -> k - 1 (255 stays 255). True for ADE20K annotations.
        mean: per-channel mean for normalisation, of pixel values scaled to [0, 1].
        std: per-channel standard deviation for normalisation.
        size_divisor: evaluation inputs are padded up to a multiple of this in height and width (the patch size);
            1 or None for no padding.
        image_processor: the evaluation transform, a `DBPSegmentationImageProcessor` (e.g. with sliding windows);
            by default one built from `crop_size`, `mean`, `std` and `size_divisor`, whole-image.
        cat_max_ratio: training crops are re-drawn (up to 10 times) while one class covers this fraction or more of
            the crop's labelled pixels; 1.0 disables it. 0.75 as in mmsegmentation.

        seed: with the epoch and the sample's index, seeds each sample's augmentation (see
            `hf_dbp.tasks.image_data.EpochSeededAugmentation`); without an index, torch's generator does.

    Training: rescale so that the short side is min(crop_size) x r, r uniform in [0.5, 2.0] (long side at most 4x
    that, as mmsegmentation's (2048, 512) scale), random crop of crop_size (one class at most `cat_max_ratio`), random
    horizontal flip, photometric distortion (each with probability 1/2: brightness +-32, contrast x[0.5, 1.5],
    saturation x[0.5, 1.5], hue +-18 of OpenCV's 180), normalisation, and padding of a crop smaller than crop_size at
    the bottom/right. Evaluation is the image processor's (the one saved with the checkpoint): rescale so that the short
    side is min(crop_size) (the same long-side cap), normalisation, padding at the bottom/right to a multiple of
    `size_divisor`, then the whole image or its sliding windows; the labels stay at the annotation's own resolution,
    where the predictions are scored (as mmsegmentation does).

    Padding is 0 in `pixel_values` (i.e. the mean colour, after normalisation, as in mmsegmentation and
    `segmentation_collate`) and 255 in `labels`. Labels are resized with nearest neighbour only, so no new values appear.

    Call it as `transform(image, annotation)` with PIL images (or arrays). Training returns `pixel_values`, a float32
    (3, H, W) array, and `labels`, an int64 (H, W) array of the same size. Evaluation returns `pixel_values` of shape
    (n, 3, H, W), the image's n model inputs (1 whole image, or its windows), `labels` at the annotation's size and
    `target_size`, that size. `transform.apply_to_batch` suits `Dataset.with_transform`.
    """

    def __init__(
        self,
        crop_size: int | tuple[int, int] = 512,
        train: bool = True,
        reduce_labels: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        size_divisor: int | None = 16,
        cat_max_ratio: float = 0.75,
        seed: int = 0,
        image_processor: DBPSegmentationImageProcessor | None = None,
    ) -> None:
        self.seed = seed
        crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        if len(crop) != 2 or min(crop) < 1:
            raise ValueError(f"crop_size must be a positive int or (height, width); got {crop_size!r}")
        self.crop_size: tuple[int, int] = (int(crop[0]), int(crop[1]))
        self.train = train
        self.reduce_labels = reduce_labels
        self.size_divisor = size_divisor
        short_side = min(self.crop_size)
        normalize = A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0)
        if train:
            steps = [
                _RescaleCrop(short_side, 4 * short_side, (0.5, 2.0), self.crop_size, cat_max_ratio),
                A.HorizontalFlip(p=0.5),
                # mmsegmentation's PhotoMetricDistortion, one step per distortion, each applied with probability 1/2.
                # RandomBrightnessContrast computes img * alpha + beta * 255 (no mean subtraction), as mmseg does.
                A.RandomBrightnessContrast(brightness_limit=32 / 255, contrast_limit=0.0, p=0.5),
                A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=0.5, p=0.5),
                A.ColorJitter(brightness=0.0, contrast=0.0, saturation=0.5, hue=0.0, p=0.5),
                A.HueSaturationValue(hue_shift_limit=18, sat_shift_limit=0, val_shift_limit=0, p=0.5),
                normalize,
                # After normalisation, so padding is 0 in pixel_values. "top_left" places the image there: the
                # padding goes to the bottom and right.
                A.PadIfNeeded(
                    min_height=self.crop_size[0],
                    min_width=self.crop_size[1],
                    position="top_left",
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=0,
                    fill_mask=IGNORE_INDEX,
                ),
            ]
            # mask_interpolation on Compose forces nearest neighbour on every step that resizes masks.
            self.transform = A.Compose(steps, mask_interpolation=cv2.INTER_NEAREST)
        else:
            self.image_processor = image_processor or DBPSegmentationImageProcessor(
                size={"shortest_edge": short_side, "longest_edge": 4 * short_side},
                size_divisor=size_divisor or 1,
                image_mean=list(mean),
                image_std=list(std),
            )

    def __call__(self, image: Any, annotation: Any, index: int | None = None) -> dict[str, np.ndarray]:
        """Transform one pair.

        Args:
            image: a PIL image of any mode (converted by `hf_dbp.tasks.image_modes.to_rgb`: EXIF orientation applied,
                16-bit gray scaled to 8 bits, transparency on white) or an (H, W[, C]) uint8 array.
            annotation: a single-channel PIL image (mode L or P, raw label ids; EXIF-oriented only by its own tag)
                or an (H, W) integer array.
            index: the pair's index in the dataset, for reproducible augmentation.

        Returns:
            Training: `pixel_values`, float32 (3, H, W), and `labels`, int64 (H, W), values in 0..num_labels-1 or 255.
            Evaluation: `pixel_values`, float32 (n, 3, H, W), the image's model inputs; `labels`, int64 at the
            annotation's own size; `target_size`, that (height, width).
        """
        pixels = _as_rgb(image)
        labels = _as_label_map(annotation)
        if labels.shape != pixels.shape[:2]:
            raise ValueError(
                f"annotation is {labels.shape[1]}x{labels.shape[0]} but its image is {pixels.shape[1]}x"
                f"{pixels.shape[0]} (width x height); check_segmentation_pairs drops such pairs"
            )
        if self.reduce_labels:
            labels = REDUCE_LABELS[labels]  # the one place labels are reduced (the processor's for segmentation_maps)
        if not self.train:
            inputs = self.image_processor(pixels, do_convert_rgb=False, return_tensors="np")["pixel_values"]
            return {
                "pixel_values": inputs.astype(np.float32, copy=False),
                "labels": labels.astype(np.int64),
                "target_size": np.asarray(labels.shape, dtype=np.int64),
            }
        self._seed(self.transform, index)
        out = self.transform(image=pixels, mask=labels)
        return {
            "pixel_values": np.ascontiguousarray(out["image"].transpose(2, 0, 1), dtype=np.float32),
            "labels": out["mask"].astype(np.int64),
        }

    def apply_to_batch(
        self, batch: dict[str, list], image_column: str = "image", label_column: str = "annotation"
    ) -> dict[str, list[np.ndarray]]:
        """Transform a batch of rows, as `Dataset.with_transform` passes them.

        Args:
            batch: a dict of lists holding at least `image_column` and `label_column`.
            image_column: the name of the image column.
            label_column: the name of the annotation column.

        Returns:
            `pixel_values` and `labels` (and `target_size` in evaluation): lists with one array per row.
        """
        indices = batch.get(SAMPLE_INDEX_COLUMN) or [None] * len(batch[image_column])
        outputs = [
            self(image, label, index)
            for image, label, index in zip(batch[image_column], batch[label_column], indices, strict=True)
        ]
        return (
            {key: [o[key] for o in outputs] for key in outputs[0]} if outputs else {"pixel_values": [], "labels": []}
        )


def segmentation_collate(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack examples into a batch, padding smaller ones at the bottom/right.

    Args:
        examples: training examples, dicts with `pixel_values` (3, H, W) and `labels` (H, W); or evaluation ones
            (`SegmentationTransform(train=False)`), with `pixel_values` (n, 3, H, W), `labels` at the annotation's
            size and `target_size`.

    Returns:
        `pixel_values`: float32 tensor (N, 3, H, W), every example's inputs in order (N = B in training); `labels`:
        int64 tensor (B, H', W'); in evaluation also `target_sizes`, int64 (B, 2). Heights and widths are the
        largest in the batch (whole-image evaluation gives images of different sizes); padding is 0 for pixels (the
        mean colour, after normalisation) and 255 (ignored) for labels.
    """
    import torch

    evaluation = "target_size" in examples[0]
    pixels = [torch.as_tensor(example["pixel_values"], dtype=torch.float32) for example in examples]
    labels = [torch.as_tensor(example["labels"], dtype=torch.int64) for example in examples]
    if not evaluation:
        for i, (p, label) in enumerate(zip(pixels, labels, strict=True)):
            if label.shape != p.shape[-2:]:
                raise ValueError(f"example {i}: labels are {tuple(label.shape)} but pixel_values are {tuple(p.shape)}")
        pixels = [p[None] for p in pixels]
    inputs = [q for p in pixels for q in p]  # evaluation: each image's inputs (the whole image, or its windows)
    height, width = max(p.shape[-2] for p in inputs), max(p.shape[-1] for p in inputs)
    pixel_batch = inputs[0].new_zeros((len(inputs), inputs[0].shape[0], height, width))
    for i, p in enumerate(inputs):
        pixel_batch[i, :, : p.shape[-2], : p.shape[-1]] = p
    label_height, label_width = max(label.shape[0] for label in labels), max(label.shape[1] for label in labels)
    label_batch = labels[0].new_full((len(labels), label_height, label_width), IGNORE_INDEX)
    for i, label in enumerate(labels):
        label_batch[i, : label.shape[0], : label.shape[1]] = label
    batch = {"pixel_values": pixel_batch, "labels": label_batch}
    if evaluation:
        batch["target_sizes"] = torch.stack(
            [torch.as_tensor(example["target_size"], dtype=torch.int64) for example in examples]
        )
    return batch


__all__ = ["SegmentationTransform", "segmentation_collate"]
