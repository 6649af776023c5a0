"""Image modes beyond 8-bit RGB, on real files, through the code the scripts run: 16-bit grayscale, CMYK, LA and P
with transparency, EXIF-rotated photographs, and modes without a faithful 8-bit rendering (dropped by name)."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, Features, Image, load_dataset
from PIL import ExifTags
from PIL import Image as PILImage

from hf_dbp.tasks.image_data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAEImageTransform,
    check_image_folder,
    drop_unreadable_images,
)
from hf_dbp.tasks.image_modes import UnconvertibleImageError, to_rgb
from hf_dbp.tasks.segmentation.ade20k import load_ade20k_folder
from hf_dbp.tasks.segmentation.checks import check_segmentation_pairs
from hf_dbp.tasks.segmentation.transforms import SegmentationTransform

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def gradient_16_bit(height: int, width: int) -> np.ndarray:
    return np.tile(np.linspace(0, 65535, width).round().astype(np.uint16), (height, 1))


def expected_8_bit(values: np.ndarray) -> np.ndarray:
    return np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)


def la_image(height: int, width: int) -> PILImage.Image:
    """Left half transparent over black, right half opaque gray 100, pixel (0, 0) half transparent black."""
    gray = np.zeros((height, width), np.uint8)
    alpha = np.zeros((height, width), np.uint8)
    gray[:, width // 2 :], alpha[:, width // 2 :] = 100, 255
    alpha[0, 0] = 128
    return PILImage.fromarray(np.stack([gray, alpha], axis=-1), mode="LA")


def p_image(height: int, width: int) -> PILImage.Image:
    """Palette black (index 0, the transparent one) on the left, red (index 1) on the right."""
    indices = np.zeros((height, width), np.uint8)
    indices[:, width // 2 :] = 1
    image = PILImage.fromarray(indices, mode="P")
    image.putpalette([0, 0, 0, *RED])
    return image


def cmyk_image(height: int, width: int) -> PILImage.Image:
    """Cyan ink on the left, no ink (white paper) on the right."""
    ink = np.zeros((height, width, 4), np.uint8)
    ink[:, : width // 2, 0] = 255
    return PILImage.fromarray(ink, mode="CMYK")


def corner_photo(height: int, width: int) -> PILImage.Image:
    """Blue, with a red 8x8 block in the stored top-left corner (8x8: whole JPEG blocks, no colour bleeding)."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[...] = BLUE
    pixels[:8, :8] = RED
    return PILImage.fromarray(pixels)


def save_with_orientation(image: PILImage.Image, path: Path, orientation: int = 6) -> None:
    exif = PILImage.Exif()
    exif[ExifTags.Base.Orientation] = orientation  # 6: the camera was turned; view it rotated 90 degrees clockwise
    if path.suffix == ".jpg":
        image.save(path, exif=exif, quality=95, subsampling=0)
    else:
        image.save(path, exif=exif)


def is_red(pixel: np.ndarray) -> bool:
    return bool(pixel[0] > 200 and pixel[1] < 60 and pixel[2] < 60)


def is_blue(pixel: np.ndarray) -> bool:
    return bool(pixel[0] < 60 and pixel[1] < 60 and pixel[2] > 200)


def unnormalise(pixel_values: np.ndarray) -> np.ndarray:
    """(3, H, W) normalised float (or the first of (n, 3, H, W): an evaluation's inputs) -> (H, W, 3), 0..255."""
    if pixel_values.ndim == 4:
        pixel_values = pixel_values[0]
    return (pixel_values.transpose(1, 2, 0) * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)) * 255


# ------------------------------------------------------------------------------------------------- the rules, in memory


def test_sixteen_bit_modes_scale_by_bit_depth_and_reproduce_the_bug_report():
    values = gradient_16_bit(2, 64)
    for mode, dtype in (("I;16", "<u2"), ("I;16L", "<u2"), ("I;16B", ">u2"), ("I;16N", "=u2")):
        image = PILImage.frombytes(mode, (64, 2), values.astype(dtype).tobytes())
        assert (to_rgb(image) == expected_8_bit(values)[..., None]).all(), mode
    image = PILImage.fromarray(values)
    assert image.mode == "I;16"
    assert (np.asarray(image.convert("RGB")) == 255).mean() > 0.95  # the bug: Pillow's convert clips at 255
    assert (to_rgb(image) == 255).mean() == pytest.approx(1 / 64)  # only the last column is full white
    # 32-bit integer images within the 16-bit range (older Pillow opened 16-bit PNGs as I) scale the same way.
    assert (to_rgb(PILImage.fromarray(values.astype(np.int32))) == expected_8_bit(values)[..., None]).all()
    assert (to_rgb(values) == expected_8_bit(values)[..., None]).all()  # an array: as PIL.Image.fromarray reads it


def test_float_and_wide_integer_rules():
    unit = np.linspace(0, 1, 11, dtype=np.float32)[None]
    assert (to_rgb(PILImage.fromarray(unit))[..., 0] == np.rint(unit * 255)).all()
    for values, words in (
        (np.array([[0.0, 3.5]], np.float32), "mode F (32-bit float) image with values 0..3.5"),
        (np.array([[0.0, np.nan]], np.float32), "NaN"),
        (np.array([[0, 70000]], np.int32), "mode I (32-bit integer) image with values 0..70000"),
        (np.array([[-1, 5]], np.int32), "mode I"),
    ):
        with pytest.raises(UnconvertibleImageError, match=words.replace("(", r"\(").replace(")", r"\)")):
            to_rgb(PILImage.fromarray(values))
    with pytest.raises(ValueError, match="dtype int64"):
        to_rgb(np.zeros((2, 2), np.int64))


def test_premultiplied_alpha_and_palette_alpha_land_on_white():
    assert to_rgb(PILImage.new("RGBa", (1, 1), (0, 0, 0, 0)))[0, 0].tolist() == [255, 255, 255]
    assert to_rgb(PILImage.new("La", (1, 1), (50, 255)))[0, 0].tolist() == [50, 50, 50]
    palette = PILImage.new("P", (2, 1))
    palette.putpalette([9, 9, 9, 0, *RED, 255], "RGBA")  # alpha in the palette itself, no transparency entry
    palette.putpixel((1, 0), 1)
    assert to_rgb(palette).tolist() == [[list(WHITE), list(RED)]]
    assert to_rgb(np.zeros((1, 1, 4), np.uint8))[0, 0].tolist() == [255, 255, 255]  # an RGBA array
    sixteen = PILImage.fromarray(np.array([[0, 30000, 40000]], np.uint16))
    sixteen.info["transparency"] = 30000  # a 16-bit PNG's tRNS chunk: one gray value is transparent
    assert to_rgb(sixteen)[0, :, 0].tolist() == [0, 255, 156]


# ------------------------------------------------------------------------------------ pre-training: an image folder


@pytest.fixture(scope="module")
def mae_folder(tmp_path_factory):
    """--train_dir as a user would have it, loaded and checked by the calls of examples/run_mae_dbp.py."""
    root = tmp_path_factory.mktemp("modes")
    folder = root / "train"
    folder.mkdir()
    files = {
        "gray16": folder / "gray16.png",
        "cmyk": folder / "cmyk.jpg",
        "la": folder / "la.png",
        "p": folder / "p.png",
        "exif": folder / "exif.jpg",
        "unit_float": folder / "unit_float.tif",
        "depth": folder / "depth.tif",
        "wide_int": folder / "wide_int.tif",
        "truncated": folder / "truncated.png",
    }
    PILImage.fromarray(gradient_16_bit(8, 64)).save(files["gray16"])
    cmyk_image(8, 16).save(files["cmyk"], quality=95)
    la_image(8, 16).save(files["la"])
    p_image(8, 16).save(files["p"], transparency=0)
    save_with_orientation(corner_photo(16, 32), files["exif"])
    PILImage.fromarray(np.tile(np.linspace(0, 1, 16, dtype=np.float32), (8, 1))).save(files["unit_float"])
    PILImage.fromarray(np.tile(np.linspace(0, 1000, 16, dtype=np.float32), (8, 1))).save(files["depth"])
    PILImage.fromarray(np.full((8, 16), 70000, np.int32)).save(files["wide_int"])
    png = io.BytesIO()
    PILImage.new("RGB", (64, 64), BLUE).save(png, format="PNG", compress_level=0)
    files["truncated"].write_bytes(png.getvalue()[: len(png.getvalue()) // 2])

    check_image_folder(str(folder), "--train_dir")
    dataset = load_dataset(
        "imagefolder", data_files={"train": os.path.join(folder, "**")}, cache_dir=str(root / "cache")
    )["train"]
    logger = logging.getLogger("hf_dbp.tasks.image_data")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        clean, dropped = drop_unreadable_images(dataset, "image")
    finally:
        logger.removeHandler(handler)
    raw = clean.cast_column("image", Image(decode=False))
    rows = {Path(value["path"]).stem: i for i, value in enumerate(raw["image"])}
    return files, dataset, clean, dropped, "\n".join(r.getMessage() for r in records), rows


def test_folder_check_drops_unconvertible_and_unreadable_images_by_name(mae_folder):
    files, dataset, clean, dropped, warnings, rows = mae_folder
    refused = {"depth": "mode F (32-bit float) image with values 0..1000", "wide_int": "mode I (32-bit integer)"}
    assert sorted(dropped) == sorted(str(files[name]) for name in (*refused, "truncated"))
    for name, reason in refused.items():
        assert f"skipping image {files[name]}: {reason}" in warnings, warnings
    assert f"skipping unreadable image {files['truncated']}" in warnings, warnings
    assert f"skipped 1 unreadable image(s) of {dataset.num_rows}" in warnings
    assert f"skipped 2 image(s) of {dataset.num_rows} that cannot be converted to RGB" in warnings
    assert sorted(rows) == ["cmyk", "exif", "gray16", "la", "p", "unit_float"]


def test_datasets_keeps_the_modes_and_applies_exif_itself(mae_folder):
    files, _, clean, _, _, rows = mae_folder
    modes = {name: clean[rows[name]]["image"].mode for name in rows}
    assert modes == {"gray16": "I;16", "cmyk": "CMYK", "la": "LA", "p": "P", "exif": "RGB", "unit_float": "F"}
    assert clean[rows["p"]]["image"].info.get("transparency") == 0
    decoded = clean[rows["exif"]]["image"]
    assert PILImage.open(files["exif"]).size == (32, 16) and decoded.size == (16, 32)  # rotated by datasets
    assert decoded.getexif().get(ExifTags.Base.Orientation) is None  # so to_rgb does not rotate it again


def test_sixteen_bit_png_follows_the_gradient(mae_folder):
    _, _, clean, _, _, rows = mae_folder
    pixels = to_rgb(clean[rows["gray16"]]["image"])
    assert pixels.shape == (8, 64, 3)
    assert (pixels == expected_8_bit(gradient_16_bit(8, 64))[..., None]).all()
    assert (np.diff(pixels[0, :, 0].astype(int)) > 0).all() and (pixels == 255).mean() == pytest.approx(1 / 64)
    # The transform the script applies: evaluation keeps this 8-high image's scale and crops the middle 8 columns.
    transformed = MAEImageTransform(8, train=False)(clean[rows["gray16"]]["image"])
    assert transformed.shape == (3, 8, 8)
    assert np.abs(unnormalise(transformed) - pixels[:, 28:36]).max() < 1.0


def test_cmyk_la_and_transparent_palette_images(mae_folder):
    _, _, clean, _, _, rows = mae_folder
    cmyk = to_rgb(clean[rows["cmyk"]]["image"]).astype(int)
    assert np.abs(cmyk[4, 2] - (0, 255, 255)).max() <= 12 and np.abs(cmyk[4, 13] - WHITE).max() <= 12
    la = to_rgb(clean[rows["la"]]["image"])
    assert (la[1:, :8] == 255).all() and (la[:, 8:] == 100).all()  # transparent (over black) -> white; opaque kept
    assert np.abs(la[0, 0].astype(int) - 127).max() <= 1  # half transparent black over white
    p = to_rgb(clean[rows["p"]]["image"])
    assert (p[:, :8] == WHITE).all() and (p[:, 8:] == RED).all()
    unit = to_rgb(clean[rows["unit_float"]]["image"])
    assert (unit[0, :, 0] == np.rint(np.linspace(0, 1, 16, dtype=np.float32) * 255)).all()


def test_exif_rotated_photo_trains_the_way_a_viewer_shows_it(mae_folder):
    files, _, clean, _, _, rows = mae_folder
    for pixels in (to_rgb(clean[rows["exif"]]["image"]), to_rgb(PILImage.open(files["exif"]))):
        assert pixels.shape == (32, 16, 3)  # stored 32 wide x 16 high; orientation 6 shows it 16 wide x 32 high
        assert is_red(pixels[3, 12]) and is_blue(pixels[3, 3]) and is_blue(pixels[28, 12]) and is_blue(pixels[28, 3])
    assert to_rgb(PILImage.open(files["exif"]), apply_exif_orientation=False).shape == (16, 32, 3)
    transform = MAEImageTransform(8, train=True, seed=0)
    for name, row in rows.items():
        out = transform(clean[row]["image"], index=row)
        assert out.shape == (3, 8, 8) and np.isfinite(out).all(), name


# --------------------------------------------------------------------------------------------------- segmentation


def write(image: PILImage.Image, path: Path, orientation: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if orientation is None:
        image.save(path, **({"quality": 95, "subsampling": 0} if path.suffix == ".jpg" else {}))
    else:
        save_with_orientation(image, path, orientation)
    return path


def corner_labels(height: int, width: int, right: bool = False) -> PILImage.Image:
    """Label 1 under corner_photo's red block (stored top-left; with `right`, top-right, where a viewer shows it
    after orientation 6), 2 elsewhere."""
    labels = np.full((height, width), 2, np.uint8)
    if right:
        labels[:8, -8:] = 1
    else:
        labels[:8, :8] = 1
    return PILImage.fromarray(labels)


@pytest.fixture(scope="module")
def segmentation_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade")
    images, annotations = root / "images" / "training", root / "annotations" / "training"
    write(PILImage.fromarray(gradient_16_bit(16, 32)), images / "gray16.png")
    write(la_image(16, 32), images / "la.png")
    p_image(16, 32).save(images / "p.png", transparency=0)
    write(cmyk_image(16, 32), images / "cmyk.jpg")
    for name in ("gray16", "la", "p", "cmyk"):
        write(corner_labels(16, 32), annotations / f"{name}.png")
    # Image and annotation both carry orientation 6: both are rotated, they stay aligned.
    write(corner_photo(16, 32), images / "both_tagged.jpg", orientation=6)
    write(corner_labels(16, 32), annotations / "both_tagged.png", orientation=6)
    # Annotation drawn on the photograph as a viewer shows it (32 high), saved without a tag: aligned.
    write(corner_photo(16, 32), images / "viewer.jpg", orientation=6)
    write(corner_labels(32, 16, right=True), annotations / "viewer.png")
    # Annotation drawn on the stored pixels (16 high), without a tag: misaligned once the image is rotated; dropped.
    write(corner_photo(16, 32), images / "stored.jpg", orientation=6)
    write(corner_labels(16, 32), annotations / "stored.png")
    write(corner_photo(16, 32), root / "images" / "validation" / "val.jpg")
    write(corner_labels(16, 32), root / "annotations" / "validation" / "val.png")
    return root, load_ade20k_folder(str(root))["train"]


def test_segmentation_check_orients_each_file_by_its_own_tag(segmentation_folder, caplog):
    root, dataset = segmentation_folder
    with caplog.at_level(logging.WARNING, logger="hf_dbp.tasks.segmentation"):
        clean, dropped = check_segmentation_pairs(dataset, num_labels=3, reduce_labels=False)
    assert dropped == [str((root / "annotations" / "training" / "stored.png").resolve())]
    assert "the image's EXIF orientation 6 rotates it on decoding, the annotation is not rotated" in caplog.text
    kept = [Path(v["path"]).stem for v in clean.cast_column("image", Image(decode=False))["image"]]
    assert kept == ["both_tagged", "cmyk", "gray16", "la", "p", "viewer"]


def test_segmentation_transform_converts_modes_and_keeps_pairs_aligned(segmentation_folder):
    _, dataset = segmentation_folder
    clean, _ = check_segmentation_pairs(dataset, num_labels=3, reduce_labels=False)
    transform = SegmentationTransform(crop_size=16, train=False, reduce_labels=False, size_divisor=None)
    stems = [Path(v["path"]).stem for v in clean.cast_column("image", Image(decode=False))["image"]]
    out = {stem: transform(row["image"], row["annotation"]) for stem, row in zip(stems, clean, strict=True)}
    for stem in ("both_tagged", "viewer"):
        pixels, labels = unnormalise(out[stem]["pixel_values"]), out[stem]["labels"]
        assert labels.shape == pixels.shape[:2] == (32, 16)
        red = (pixels[..., 0] > 200) & (pixels[..., 2] < 60)
        assert red[:8, 8:].all() and (labels[:8, 8:] == 1).all() and (labels == 1).sum() == 64, stem
        assert not red[labels == 2].any(), stem  # every red pixel is labelled as the red block
    gray = unnormalise(out["gray16"]["pixel_values"])
    assert np.abs(gray[..., 0] - expected_8_bit(gradient_16_bit(16, 32))).max() < 1.0
    assert np.abs(unnormalise(out["la"]["pixel_values"])[1:, :16] - 255).max() < 1.0
    assert np.abs(unnormalise(out["p"]["pixel_values"])[:, :16] - 255).max() < 1.0
    for stem, result in out.items():
        assert set(np.unique(result["labels"]).tolist()) <= {1, 2}, stem  # labels never interpolated or converted


def test_segmentation_transform_on_raw_files_follows_the_same_rule(segmentation_folder):
    root, _ = segmentation_folder
    images, annotations = root / "images" / "training", root / "annotations" / "training"
    transform = SegmentationTransform(crop_size=16, train=False, reduce_labels=False, size_divisor=None)
    both = transform(PILImage.open(images / "both_tagged.jpg"), PILImage.open(annotations / "both_tagged.png"))
    assert both["labels"].shape == (32, 16) and (both["labels"][:8, 8:] == 1).all()
    with pytest.raises(ValueError, match="check_segmentation_pairs drops such pairs"):
        transform(PILImage.open(images / "stored.jpg"), PILImage.open(annotations / "stored.png"))


def test_segmentation_check_drops_an_unconvertible_image_by_name(tmp_path, caplog):
    depth, good = tmp_path / "depth.tif", tmp_path / "good.png"
    PILImage.fromarray(np.full((16, 32), 1000, np.float32)).save(depth)
    PILImage.fromarray(gradient_16_bit(16, 32)).save(good)
    label = write(corner_labels(16, 32), tmp_path / "label.png")
    dataset = Dataset.from_dict(
        {"image": [str(depth), str(good)], "annotation": [str(label)] * 2},
        features=Features({"image": Image(), "annotation": Image()}),
    )
    with caplog.at_level(logging.WARNING, logger="hf_dbp.tasks.segmentation"):
        clean, dropped = check_segmentation_pairs(dataset, num_labels=3, reduce_labels=False)
    assert dropped == [str(depth)] and clean.num_rows == 1
    assert f"skipping pair {depth} / {label}: image cannot be converted to RGB (mode F (32-bit float)" in caplog.text
