"""Data for semantic segmentation on ADE20K: folder loading, checks of image/annotation pairs, the mmsegmentation
ADE20K augmentation recipe (with albumentations), a padding collate function, and an embedded demo set.

Label convention: ADE20K annotation PNGs hold raw ids, 0 = "other" and 1..150 = the classes of objectInfo150. With
``reduce_labels=True`` (the ADE20K default) the transform maps 0 to 255 (ignored by the loss) and k to k - 1, exactly
once; nothing else in this module changes label values.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# albumentations asks PyPI for a newer version on import (2 s timeout). Runs are offline: don't, unless the user
# asked for it. Must be set before the import below.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402 - needs the variable above
import cv2  # noqa: E402
import numpy as np  # noqa: E402
from albumentations.core.type_definitions import Targets  # noqa: E402
from datasets import Dataset, DatasetDict, Features, Image  # noqa: E402
from PIL import ExifTags, ImageDraw, ImageOps  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from ..image_data import IMAGENET_MEAN, IMAGENET_STD, SAMPLE_INDEX_COLUMN, EpochSeededAugmentation, _photo  # noqa: E402
from ..image_modes import UnconvertibleImageError, to_rgb  # noqa: E402
from .image_processing import IGNORE_INDEX, REDUCE_LABELS, DBPSegmentationImageProcessor, rescaled_size  # noqa: E402

logger = logging.getLogger(__name__)


ADE20K_SPLITS = {"train": "training", "validation": "validation"}
"""Our split name -> the ADEChallengeData2016 sub-folder name."""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
ANNOTATION_SUFFIXES = (".png",)

# EXIF orientations that make `datasets` (which calls ImageOps.exif_transpose on decoding) swap width and height.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
# EXIF orientation rule for pairs: each file is oriented by its own tag, as `datasets` decodes it and as a viewer
# shows it: the image by its tag (camera photographs), the annotation only if it carries a tag itself (label PNGs
# rarely do). A pair whose sizes then disagree is dropped by `check_segmentation_pairs`, with a reason naming the
# image's orientation; a tag that rotates the image but keeps the size (3: 180 degrees) misaligns the pair unseen.


# --------------------------------------------------------------------------------------------------- folder loading


def _list_files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """stem -> path of the files in `folder` with one of `suffixes`; the second file of a stem is reported, skipped."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        # "._name.jpg" are macOS resource forks that zip files made on a Mac carry: not images.
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in suffixes:
            continue
        if path.stem in files:
            logger.warning("skipping %s: %s has the same name stem", path, files[path.stem])
            continue
        files[path.stem] = path
    return files


def _found_folders(root: Path) -> list[str]:
    """The folders under `root`, two levels deep, for an error message."""
    found = []
    for child in sorted(root.iterdir()):
        if child.is_dir():
            found.append(child.name + "/")
            found.extend(
                f"{child.name}/{grandchild.name}/" for grandchild in sorted(child.iterdir()) if grandchild.is_dir()
            )
    return found


def load_ade20k_folder(data_dir: str) -> DatasetDict:
    """Load an extracted ADEChallengeData2016 folder as a `DatasetDict` with splits `train` and `validation`.

    Args:
        data_dir: the ADEChallengeData2016 folder (holding `images/{training,validation}/*.jpg` and
            `annotations/{training,validation}/*.png`), or the folder it was extracted into.

    Returns:
        Splits `train` and `validation`, each with `datasets.Image()` columns `image` and `annotation` that hold the
        files' paths: images are decoded when a row is read, not here. Rows are sorted by file name.

    An image and an annotation are a pair when their file names have the same stem. A file without its partner is
    skipped with a warning naming it (and the count is logged). A folder without the expected sub-folders raises
    `FileNotFoundError` saying what was expected and what was found.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"ADE20K folder {str(root)!r} does not exist or is not a folder")
    if not (root / "images").is_dir() and (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"  # the folder the zip file was extracted into
    expected = [f"{kind}/{folder}" for kind in ("images", "annotations") for folder in ADE20K_SPLITS.values()]
    missing = [sub for sub in expected if not (root / sub).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{str(root)!r} is not an extracted ADEChallengeData2016 folder: expected the sub-folders "
            f"{', '.join(expected)}; missing {', '.join(missing)}; found {_found_folders(root) or 'no sub-folders'}"
        )

    features = Features({"image": Image(), "annotation": Image()})
    splits = {}
    for split, folder in ADE20K_SPLITS.items():
        images = _list_files(root / "images" / folder, IMAGE_SUFFIXES)
        annotations = _list_files(root / "annotations" / folder, ANNOTATION_SUFFIXES)
        for stem in sorted(images.keys() - annotations.keys()):
            logger.warning(
                "skipping image %s: it has no annotation %s.png", images[stem], root / "annotations" / folder / stem
            )
        for stem in sorted(annotations.keys() - images.keys()):
            logger.warning(
                "skipping annotation %s: it has no image %s.jpg", annotations[stem], root / "images" / folder / stem
            )
        unpaired = len(images.keys() ^ annotations.keys())
        if unpaired:
            logger.warning("%s: skipped %d file(s) without a partner", split, unpaired)
        stems = sorted(images.keys() & annotations.keys())
        if not stems:
            raise FileNotFoundError(
                f"no image/annotation pairs in {root / 'images' / folder} and {root / 'annotations' / folder} "
                f"({len(images)} image(s) with suffix {'/'.join(IMAGE_SUFFIXES)}, {len(annotations)} .png annotation(s))"
            )
        # Paths, not decoded images: `Image().encode_example(str)` stores {"path": ..., "bytes": None}.
        columns = {
            "image": [str(images[stem].resolve()) for stem in stems],
            "annotation": [str(annotations[stem].resolve()) for stem in stems],
        }
        splits[split] = Dataset.from_dict(columns, features=features)
        logger.info("%s: %d image/annotation pairs from %s", split, len(stems), root)
    return DatasetDict(splits)


# ------------------------------------------------------------------------------------------------------ pair checks


def _open(value: dict) -> PILImage.Image:
    """The image of a `datasets.Image(decode=False)` value, fully decoded (truncated files fail here)."""
    image = PILImage.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
    image.load()
    return image


def _decoded_size(image: PILImage.Image) -> tuple[tuple[int, int], int | None]:
    """(width, height) as `datasets` will decode the image (it applies EXIF orientation), and the orientation."""
    orientation = image.getexif().get(ExifTags.Base.Orientation)
    width, height = image.size
    return ((height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)), orientation


def _label_values(array: np.ndarray) -> np.ndarray:
    """The distinct values of an integer label map (bincount: much faster than np.unique on uint8 maps)."""
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.size and array.min() < 0:
        return np.unique(array)
    return np.flatnonzero(np.bincount(array.ravel()))


def _file_name(value: dict, column: str, index: int) -> str:
    """The file's path; for images stored as bytes without one (some Hub data sets), the column and row."""
    return value.get("path") or f"<{column} bytes of row {index}>"


def _pair_error(
    image_name: str, image_value: dict, label_name: str, label_value: dict, max_label: int
) -> tuple[str, str]:
    """("", "") for a good pair, else (why it is bad, the name of the file at fault)."""
    try:
        with _open(image_value) as image:
            _, orientation = _decoded_size(image)
            raw_image_size = image.size
            pixels = to_rgb(image)  # as the transform converts it (EXIF orientation applied): refusals fail here
            image_size = (pixels.shape[1], pixels.shape[0])
    except UnconvertibleImageError as error:
        return f"image cannot be converted to RGB ({error})", image_name
    except Exception as error:  # noqa: BLE001 - PIL raises many types for a bad file; we report and skip it
        return f"image cannot be decoded ({type(error).__name__}: {error})", image_name
    try:
        with _open(label_value) as annotation:
            bands = annotation.getbands()
            mode = annotation.mode
            label_size, _ = _decoded_size(annotation)
            array = np.asarray(annotation) if len(bands) == 1 else None  # a palette image gives its indices
    except Exception as error:  # noqa: BLE001
        return f"annotation cannot be decoded ({type(error).__name__}: {error})", label_name
    if array is None:
        return (
            f"annotation is a {len(bands)}-channel {mode} image, not a single-channel label map (mode L or P): "
            "a colour-coded annotation? Map its colours to class ids first",
            label_name,
        )
    if label_size != image_size:
        why = f"annotation is {label_size[0]}x{label_size[1]} but its image is {image_size[0]}x{image_size[1]} (width x height)"
        if orientation in _TRANSPOSING_ORIENTATIONS and raw_image_size == label_size:
            why += (
                f"; the image's EXIF orientation {orientation} rotates it on decoding, the annotation is not rotated"
            )
        return why, label_name
    if array.dtype.kind not in "biu":
        return f"annotation holds non-integer pixels (mode {mode})", label_name
    values = _label_values(array)
    bad = values[((values > max_label) & (values != IGNORE_INDEX)) | (values < 0)]
    if bad.size:
        shown = ", ".join(str(int(value)) for value in bad[:10]) + (", ..." if bad.size > 10 else "")
        return f"annotation holds label value(s) {shown}, outside 0..{max_label} and {IGNORE_INDEX}", label_name
    return "", ""


def _check_pairs_batch(
    images: list[dict], labels: list[dict], indices: list[int], columns: tuple[str, str], max_label: int
) -> dict[str, list[str]]:
    results = [
        _pair_error(_file_name(image, columns[0], i), image, _file_name(label, columns[1], i), label, max_label)
        for image, label, i in zip(images, labels, indices, strict=True)
    ]
    return {"_pair_error": [error for error, _ in results], "_pair_file": [name for _, name in results]}


def check_segmentation_pairs(
    dataset: Dataset,
    image_column: str = "image",
    label_column: str = "annotation",
    num_labels: int = 150,
    reduce_labels: bool = True,
    num_proc: int | None = None,
) -> tuple[Dataset, list[str]]:
    """Decode every image/annotation pair once, before training, and drop the bad ones.

    Args:
        dataset: a dataset with `datasets.Image()` columns for the images and their annotations.
        image_column: the name of the image column.
        label_column: the name of the annotation (label map) column.
        num_labels: the number of classes the model predicts (150 for ADE20K).
        reduce_labels: whether the annotations hold raw ids 0 = "other", 1..num_labels (as ADE20K's do, reduced by
            the transform), so that the largest valid value is `num_labels`; otherwise the largest is `num_labels - 1`.
            255 (ignore) is always valid.
        num_proc: processes for the check (`datasets.map`); worth it for the 20k pairs of ADE20K.

    Returns:
        The dataset without the bad pairs, and for each dropped pair the name of the file at fault (the image when it
        cannot be decoded, the annotation otherwise).

    A pair is dropped, with a warning naming both files and the reason (and a count at the end), when the image or
    the annotation cannot be decoded, the annotation is not single-channel (a colour-coded RGB/RGBA annotation),
    its size differs from the image's (as `datasets` decodes them, i.e. each after its own EXIF orientation), or it
    holds a label value above the classes other than 255 (the values are named). Images are converted as the
    transform converts them (`hf_dbp.tasks.image_modes.to_rgb`); one it refuses (a float image outside [0, 1], a
    32-bit integer image beyond 16-bit values) is dropped, naming the image and its mode.
    A missing column raises `ValueError` listing the dataset's columns.
    """
    for column in (image_column, label_column):
        if column not in dataset.column_names:
            raise ValueError(f"column {column!r} not found in the dataset; its columns are {dataset.column_names}")
        if not isinstance(dataset.features[column], Image):
            raise ValueError(f"column {column!r} holds {dataset.features[column]}, not images")
    max_label = num_labels if reduce_labels else num_labels - 1
    raw = dataset.cast_column(image_column, Image(decode=False)).cast_column(label_column, Image(decode=False))
    # Only the two small result columns are written: a Hub dataset's image bytes are not copied to a cache file.
    checked = raw.map(
        _check_pairs_batch,
        input_columns=[image_column, label_column],
        with_indices=True,
        fn_kwargs={"columns": (image_column, label_column), "max_label": max_label},
        batched=True,
        remove_columns=raw.column_names,
        num_proc=num_proc,
        desc="Checking image/annotation pairs",
    )
    errors, culprits = checked["_pair_error"], checked["_pair_file"]
    bad = [i for i, error in enumerate(errors) if error]
    for i in bad:
        row = raw[i]
        logger.warning(
            "skipping pair %s / %s: %s",
            _file_name(row[image_column], image_column, i),
            _file_name(row[label_column], label_column, i),
            errors[i],
        )
    if bad:
        logger.warning("skipped %d bad image/annotation pair(s) of %d", len(bad), len(dataset))
        dropped = set(bad)
        dataset = dataset.select([i for i in range(len(dataset)) if i not in dropped])
    else:
        logger.info("checked %d image/annotation pairs: all good", len(dataset))
    return dataset, [culprits[i] for i in bad]


# -------------------------------------------------------------------------------------------------------- transform


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
                A.PadIfNeeded(min_height=self.crop_size[0], min_width=self.crop_size[1], position="top_left",
                              border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=IGNORE_INDEX),
            ]  # fmt: skip
            # mask_interpolation on Compose forces nearest neighbour on every step that resizes masks.
            self.transform = A.Compose(steps, mask_interpolation=cv2.INTER_NEAREST)
        else:
            self.image_processor = image_processor or DBPSegmentationImageProcessor(
                size={"shortest_edge": short_side, "longest_edge": 4 * short_side}, size_divisor=size_divisor or 1,
                image_mean=list(mean), image_std=list(std),
            )  # fmt: skip

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
            return {"pixel_values": inputs.astype(np.float32, copy=False), "labels": labels.astype(np.int64),
                    "target_size": np.asarray(labels.shape, dtype=np.int64)}  # fmt: skip
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
        outputs = [self(image, label, index) for image, label, index in
                   zip(batch[image_column], batch[label_column], indices, strict=True)]  # fmt: skip
        return {key: [o[key] for o in outputs] for key in outputs[0]} if outputs else {"pixel_values": [], "labels": []}


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
        batch["target_sizes"] = torch.stack([torch.as_tensor(example["target_size"], dtype=torch.int64) for example in examples])
    return batch


# --------------------------------------------------------------------------------------------------------- demo set

# Raw ADE20K ids (objectInfo150 numbering, 0 = "other") of the demo's classes, and the scikit-image photograph whose
# texture stands for each (sky is a synthetic gradient). Grayscale textures get a tint, so that colour helps but
# texture is still needed (gravel vs moon rock, brick vs coffee). Textures are cut from the left 70% of each
# photograph for training and the right 30% for validation, so validation textures are unseen.
DEMO_ADE20K_CLASSES = {
    0: "other", 1: "wall", 3: "sky", 10: "grass", 13: "person", 14: "earth", 35: "rock", 121: "food", 127: "animal",
}  # fmt: skip
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
    settings = {"version": _DEMO_VERSION, "num_train": num_train, "num_validation": num_validation, "size": size,
                "seed": seed}  # fmt: skip
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


__all__ = [
    "DEMO_ADE20K_CLASSES",
    "IGNORE_INDEX",
    "SegmentationTransform",
    "check_segmentation_pairs",
    "load_ade20k_folder",
    "make_demo_ade20k",
    "segmentation_collate",
]
