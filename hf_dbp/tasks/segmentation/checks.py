"""Checks of ADE20K-style image/annotation pairs before training: unreadable files, sizes that disagree, labels out of
range, colour annotations; each bad pair is skipped with the file named."""

from __future__ import annotations

import io
import logging

import numpy as np
from datasets import Dataset, Image
from PIL import ExifTags
from PIL import Image as PILImage

from ..image_modes import UnconvertibleImageError, to_rgb
from .image_processing import IGNORE_INDEX

logger = logging.getLogger(__name__)

# EXIF orientations that make `datasets` (which calls ImageOps.exif_transpose on decoding) swap width and height.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
# EXIF orientation rule for pairs: each file is oriented by its own tag, as `datasets` decodes it and as a viewer
# shows it: the image by its tag (camera photographs), the annotation only if it carries a tag itself (label PNGs
# rarely do). A pair whose sizes then disagree is dropped by `check_segmentation_pairs`, with a reason naming the
# image's orientation; a tag that rotates the image but keeps the size (3: 180 degrees) misaligns the pair unseen.


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


__all__ = ["check_segmentation_pairs"]
