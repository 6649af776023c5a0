"""Any image Pillow opens, as the 8-bit RGB array a viewer would show, or a clear refusal.

A bare `image.convert("RGB")` is wrong for several modes Pillow opens: it clips 16-bit grayscale at 255 (a 16-bit
PNG of a gradient becomes almost all white), drops alpha (the colour under transparent pixels is arbitrary, often
black) and ignores the EXIF orientation of camera photographs. `to_rgb` handles these; the data checks of the scripts
(`drop_unreadable_images`, `check_segmentation_pairs`) call it too, so an image it refuses is dropped before training,
with a warning naming the file, instead of failing (or silently training on garbage) later.
"""

from __future__ import annotations

import numpy as np
from PIL import ExifTags, ImageOps
from PIL import Image as PILImage

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
"""16-bit unsigned grayscale; Pillow 10+ opens 16-bit grayscale PNGs (and such TIFFs) as `I;16` / `I;16B`."""

WHITE = (255, 255, 255, 255)


class UnconvertibleImageError(ValueError):
    """An image whose pixels have no faithful 8-bit RGB rendering (the message names the mode and why)."""


def _scale_16_bit(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255, value * 255 / 65535 rounded to nearest (integer arithmetic: exact, and fits in uint32)."""
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _gray_8_bit(image: PILImage.Image) -> np.ndarray:
    """The 8-bit values of a high-bit-depth grayscale image (mode I;16*, I or F); see `to_rgb` for the rules."""
    values = np.asarray(image)
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES:
        return _scale_16_bit(values)
    if values.size == 0:
        return np.zeros(values.shape, np.uint8)
    low, high = values.min(), values.max()
    if mode == "I":
        if low < 0 or high > 65535:
            raise UnconvertibleImageError(
                f"mode I (32-bit integer) image with values {low}..{high}: only values in 0..65535 (16-bit data, as "
                "older Pillow opened 16-bit PNGs) can be scaled to 8 bits without guessing the range"
            )
        return _scale_16_bit(values)
    # mode F
    if not np.isfinite(values).all():
        raise UnconvertibleImageError("mode F (32-bit float) image with NaN or infinite values")
    if low < 0 or high > 1:
        raise UnconvertibleImageError(
            f"mode F (32-bit float) image with values {low:g}..{high:g}: only values in [0, 1] are scaled to 8 bits "
            "(x 255); other ranges (depth maps, raw sensor data, ...) have no agreed 8-bit rendering"
        )
    return np.rint(values * 255).astype(np.uint8)


def _on_white(rgba: PILImage.Image) -> np.ndarray:
    # Composited onto white, as a viewer (and a browser) shows a transparent image: the colour stored under fully
    # transparent pixels is arbitrary (often black, sometimes left-over paint), so dropping alpha would train on it.
    background = PILImage.new("RGBA", rgba.size, WHITE)
    return np.asarray(PILImage.alpha_composite(background, rgba).convert("RGB"))


def _from_array(array: np.ndarray) -> PILImage.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    try:
        return PILImage.fromarray(np.ascontiguousarray(array))
    except (TypeError, ValueError) as error:
        raise UnconvertibleImageError(
            f"array of shape {array.shape} and dtype {array.dtype} is not an image Pillow reads ({error})"
        ) from error


def to_rgb(image: PILImage.Image | np.ndarray, apply_exif_orientation: bool = True) -> np.ndarray:
    """`image` as an (H, W, 3) uint8 RGB array, as an image viewer would show it.

    Args:
        image: a PIL image of any mode, or an array (H, W[, C]) that `PIL.Image.fromarray` reads (uint8 gray, RGB
            or RGBA; uint16 gray as I;16; int32 as I; float as F; bool as 1).
        apply_exif_orientation: rotate/flip by the EXIF orientation tag (`PIL.ImageOps.exif_transpose`), so a phone
            photograph stored sideways is not trained on sideways. A no-op for images without the tag, and for
            images that `datasets` decoded (it applies the orientation itself and the tag is then gone).

    What each mode becomes:
        - `RGB`, `L`, `1`, `P`, `CMYK`, `YCbCr`, `HSV`, `LAB`, `RGBX`: Pillow's own conversion (CMYK naively, without
          the embedded ICC profile; no mode's ICC profile is applied).
        - `I;16`, `I;16B`, `I;16L`, `I;16N` (16-bit grayscale PNGs and TIFFs): scaled by the bit depth,
          value * 255 / 65535 rounded, not clipped at 255 as `convert` does.
        - `I` (32-bit integer): scaled as 16-bit data when all values are in 0..65535; refused otherwise.
        - `F` (32-bit float): values in [0, 1] scaled by 255 and rounded; refused otherwise (or with NaN/inf).
        - With transparency (`RGBA`, `LA`, `PA`, premultiplied `RGBa`/`La`, and `P`, `L`, `RGB`, `1` or 16-bit gray
          with a `transparency` entry): composited onto a white background.

    Raises:
        UnconvertibleImageError (a `ValueError`): for the refusals above, or a mode Pillow cannot convert; the message
        names the mode.
    """
    if isinstance(image, np.ndarray):
        image = _from_array(image)
    elif not isinstance(image, PILImage.Image):
        raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    if apply_exif_orientation and image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in (*SIXTEEN_BIT_MODES, "I", "F"):
        gray = _gray_8_bit(image)
        transparency = image.info.get("transparency")
        if isinstance(transparency, int) and mode != "F":  # a 16-bit PNG's tRNS: one gray value is transparent
            alpha = np.where(np.asarray(image) == transparency, 0, 255).astype(np.uint8)
            return _on_white(PILImage.fromarray(np.stack([gray, gray, gray, alpha], axis=-1)))
        return np.repeat(gray[..., None], 3, axis=-1)
    try:
        if mode == "La":  # Pillow converts premultiplied gray+alpha to LA only
            image, mode = image.convert("LA"), "LA"
        palette_alpha = mode == "P" and image.palette is not None and image.palette.mode == "RGBA"
        if mode in ("RGBA", "RGBa", "LA", "PA") or "transparency" in image.info or palette_alpha:
            return _on_white(image.convert("RGBA"))
        return np.asarray(image if mode == "RGB" else image.convert("RGB"))
    except ValueError as error:  # Pillow's "conversion from ... not supported"
        raise UnconvertibleImageError(f"mode {mode} image cannot be converted to RGB ({error})") from error
