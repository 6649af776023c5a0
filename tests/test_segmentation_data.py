"""ADE20K-style segmentation data: folder loading, pair checks, the transform's labels and shapes, collate, demo set."""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image
from PIL import Image as PILImage

from hf_dbp.tasks.image_data import IMAGENET_MEAN, IMAGENET_STD
from hf_dbp.tasks.segmentation.ade20k import load_ade20k_folder
from hf_dbp.tasks.segmentation.checks import check_segmentation_pairs
from hf_dbp.tasks.segmentation.demo import DEMO_ADE20K_CLASSES, make_demo_ade20k
from hf_dbp.tasks.segmentation.transforms import SegmentationTransform, segmentation_collate

LOGGER = "hf_dbp.tasks.segmentation"


def rgb(height, width, seed=0, mode="RGB"):
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PILImage.fromarray(array).convert(mode)


def label_map(height, width, values=(0, 1, 150), seed=0):
    """A label map of square blocks with the given raw values: blocks survive resizing, so each value stays present."""
    block = 8
    while block > 1 and -(-height // block) * -(-width // block) < len(values):
        block //= 2  # smaller blocks, so that every value fits into the image
    rng = np.random.default_rng(seed)
    blocks = rng.choice(np.asarray(values, dtype=np.uint8), size=(-(-height // block), -(-width // block)))
    blocks.flat[: len(values)] = values  # every value at least once
    labels = np.kron(blocks, np.ones((block, block), np.uint8))[:height, :width]
    assert set(np.unique(labels).tolist()) == set(values)
    return PILImage.fromarray(labels)


def write_pair(folder: Path, split: str, stem: str, image=None, annotation=None):
    paths = []
    if image is not None:
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        paths.append(folder / "images" / split / f"{stem}.jpg")
        image.save(paths[-1])
    if annotation is not None:
        (folder / "annotations" / split).mkdir(parents=True, exist_ok=True)
        paths.append(folder / "annotations" / split / f"{stem}.png")
        annotation.save(paths[-1])
    return paths


def pairs_dataset(pairs):
    features = Features({"image": Image(), "annotation": Image()})
    return Dataset.from_dict(
        {"image": [str(i) for i, _ in pairs], "annotation": [str(a) for _, a in pairs]}, features=features
    )


def warnings_text(caplog):
    return "\n".join(
        r.getMessage() for r in caplog.records if r.name.startswith(LOGGER) and r.levelno >= logging.WARNING
    )


# ------------------------------------------------------------------------------------------------------- folders


def test_folder_loads_pairs_lazily_and_reports_files_without_partner(tmp_path, caplog):
    for i in (3, 1, 2):
        write_pair(tmp_path, "training", f"ADE_train_{i:08d}", rgb(20, 30, i), label_map(20, 30))
    write_pair(tmp_path, "training", "ADE_train_00000009", image=rgb(20, 30))  # no annotation
    write_pair(tmp_path, "training", "ADE_train_00000010", annotation=label_map(20, 30))  # no image
    write_pair(tmp_path, "validation", "ADE_val_00000001", rgb(20, 30), label_map(20, 30))
    (tmp_path / "images" / "training" / "._ADE_train_00000001.jpg").write_bytes(b"macOS resource fork")

    with caplog.at_level(logging.INFO, logger=LOGGER):
        dataset = load_ade20k_folder(str(tmp_path))

    assert set(dataset) == {"train", "validation"}
    assert dataset["train"].column_names == ["image", "annotation"]
    assert isinstance(dataset["train"].features["image"], Image)
    assert isinstance(dataset["train"].features["annotation"], Image)
    assert (dataset["train"].num_rows, dataset["validation"].num_rows) == (3, 1)
    raw = dataset["train"].cast_column("image", Image(decode=False)).cast_column("annotation", Image(decode=False))
    stored = raw[:]
    # Paths only (nothing decoded into memory), sorted, and each image with its own annotation.
    assert all(value["bytes"] is None for value in stored["image"] + stored["annotation"])
    assert [Path(v["path"]).stem for v in stored["image"]] == [f"ADE_train_{i:08d}" for i in (1, 2, 3)]
    assert [Path(v["path"]).stem for v in stored["annotation"]] == [Path(v["path"]).stem for v in stored["image"]]
    row = dataset["train"][0]
    assert row["image"].size == (30, 20) and row["annotation"].mode == "L"

    warnings = warnings_text(caplog)
    assert "ADE_train_00000009.jpg" in warnings and "no annotation" in warnings
    assert "ADE_train_00000010.png" in warnings and "no image" in warnings
    assert "skipped 2 file(s)" in warnings
    assert "._ADE" not in warnings


def test_folder_without_expected_subfolders_says_what_it_expected_and_found(tmp_path):
    write_pair(tmp_path, "training", "a", rgb(8, 8), label_map(8, 8))
    (tmp_path / "images" / "val").mkdir()
    with pytest.raises(FileNotFoundError) as error:
        load_ade20k_folder(str(tmp_path))
    message = str(error.value)
    assert "images/validation" in message and "annotations/validation" in message  # expected, missing
    assert "images/val/" in message  # found


def test_folder_accepts_the_folder_the_zip_was_extracted_into(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        write_pair(root, split, "a", rgb(8, 8), label_map(8, 8))
    assert load_ade20k_folder(str(tmp_path))["validation"].num_rows == 1


# --------------------------------------------------------------------------------------------------- pair checks


def test_check_drops_each_kind_of_bad_pair_and_names_its_file(tmp_path, caplog):
    good, bad = [], {}
    # Good pairs: any image mode the transform converts to RGB; annotations in L or P mode; 255 (ignore) allowed.
    for i, mode in enumerate(("RGB", "L", "RGBA", "P", "CMYK")):
        image_path = tmp_path / f"good_{mode}.{'png' if mode in ('RGBA', 'P') else 'jpg'}"
        rgb(16, 24, i, mode).save(image_path)
        annotation = label_map(16, 24, (0, 1, 150, 255))
        if mode == "P":
            annotation = annotation.convert("P")  # keeps the values as palette indices
        annotation_path = tmp_path / f"good_{mode}_label.png"
        annotation.save(annotation_path)
        good.append((image_path, annotation_path))

    def pair(name, image, annotation):
        image_path, annotation_path = tmp_path / f"{name}.jpg", tmp_path / f"{name}_label.png"
        for path, content in ((image_path, image), (annotation_path, annotation)):
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                content.save(path)
        return image_path, annotation_path

    jpeg = io.BytesIO()
    rgb(64, 64).save(jpeg, format="JPEG")
    image_path, annotation_path = pair("truncated", jpeg.getvalue()[: len(jpeg.getvalue()) // 2], label_map(64, 64))
    bad["truncated"] = (image_path, annotation_path, image_path, "image cannot be decoded")
    image_path, annotation_path = pair("garbage", rgb(16, 24), b"not a png at all")
    bad["garbage"] = (image_path, annotation_path, annotation_path, "annotation cannot be decoded")
    image_path, annotation_path = pair("small", rgb(16, 24), label_map(16, 20))
    bad["small"] = (image_path, annotation_path, annotation_path, "annotation is 20x16 but its image is 24x16")
    image_path, annotation_path = pair("range", rgb(16, 24), label_map(16, 24, (0, 3, 151, 255)))
    bad["range"] = (image_path, annotation_path, annotation_path, "label value(s) 151")
    image_path, annotation_path = pair("colour", rgb(16, 24), rgb(16, 24))
    bad["colour"] = (image_path, annotation_path, annotation_path, "3-channel RGB image")
    image_path, annotation_path = pair("rgba", rgb(16, 24), rgb(16, 24, mode="RGBA"))
    bad["rgba"] = (image_path, annotation_path, annotation_path, "4-channel RGBA image")
    # Raw pixels match, but the EXIF orientation makes `datasets` rotate the image (not the annotation) on decoding.
    image_path, annotation_path = pair("exif", rgb(16, 24), label_map(16, 24))
    exif = PILImage.open(image_path).getexif()
    exif[0x0112] = 6  # Orientation: rotate 90
    rgb(16, 24).save(image_path, exif=exif)
    bad["exif"] = (image_path, annotation_path, annotation_path, "EXIF orientation 6")

    dataset = pairs_dataset(good[:3] + [(i, a) for i, a, _, _ in bad.values()] + good[3:])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        clean, dropped = check_segmentation_pairs(dataset)

    assert sorted(dropped) == sorted(str(culprit) for _, _, culprit, _ in bad.values())
    kept = clean.cast_column("image", Image(decode=False))["image"]
    assert [v["path"] for v in kept] == [str(i) for i, _ in good]
    lines = warnings_text(caplog).splitlines()
    for image_path, annotation_path, _, reason in bad.values():
        line = next(line for line in lines if str(image_path) in line)
        assert str(annotation_path) in line and reason in line, line
    assert f"skipped {len(bad)} bad image/annotation pair(s) of {len(dataset)}" in lines
    assert not any(str(i) in line for i, _ in good for line in lines)


def test_check_bounds_follow_reduce_labels(tmp_path, caplog):
    pairs = []
    for name, values in (("top", (1, 150, 255)), ("zero", (0, 149))):
        image_path, annotation_path = tmp_path / f"{name}.jpg", tmp_path / f"{name}.png"
        rgb(16, 16).save(image_path)
        label_map(16, 16, values).save(annotation_path)
        pairs.append((image_path, annotation_path))
    dataset = pairs_dataset(pairs)
    # Raw ADE20K ids (reduced later): 150 is the last class.
    assert check_segmentation_pairs(dataset, num_labels=150, reduce_labels=True)[1] == []
    # Already 0-based labels: 150 classes end at 149.
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        clean, dropped = check_segmentation_pairs(dataset, num_labels=150, reduce_labels=False)
    assert dropped == [str(pairs[0][1])] and clean.num_rows == 1
    assert "label value(s) 150, outside 0..149 and 255" in warnings_text(caplog)


def test_check_names_rows_of_images_stored_as_bytes(caplog):
    # Hub data sets may embed the files' bytes without a path: the row names the pair (global rows with num_proc).
    labels = [label_map(8, 8, (1, 2))] * 6
    labels[4] = label_map(8, 8, (1, 200))
    dataset = Dataset.from_dict({"image": [rgb(8, 8, i) for i in range(6)], "label": labels})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        clean, dropped = check_segmentation_pairs(dataset, label_column="label", num_proc=2)
    assert dropped == ["<label bytes of row 4>"] and clean.num_rows == 5
    assert "<image bytes of row 4> / <label bytes of row 4>: annotation holds label value(s) 200" in warnings_text(
        caplog
    )


def test_check_names_the_columns_when_one_is_missing(tmp_path):
    dataset = pairs_dataset([]).rename_column("annotation", "label")  # no rows needed
    with pytest.raises(ValueError, match=r"'annotation' not found.*\['image', 'label'\]"):
        check_segmentation_pairs(dataset)


# ----------------------------------------------------------------------------------------------------- transform


@pytest.mark.parametrize("train", [True, False])
def test_labels_are_reduced_exactly_once(train):
    transform = SegmentationTransform(crop_size=16, train=train)
    image = rgb(32, 48)
    for raw, expected in ((0, 255), (1, 0), (7, 6), (150, 149), (255, 255)):
        annotation = PILImage.fromarray(np.full((32, 48), raw, np.uint8))
        for _ in range(3):
            values = set(np.unique(transform(image, annotation)["labels"]).tolist())
            # Padding adds 255; anything else than the reduced value means no reduction or a second one.
            assert values <= {expected, 255} and expected in values, (raw, values)
    # Element by element, where the eval transform doesn't resize (short side already 16, width a multiple of 16).
    annotation = label_map(16, 32, (0, 1, 2, 149, 150, 255))
    labels = SegmentationTransform(crop_size=16, train=False)(rgb(16, 32), annotation)["labels"]
    raw = np.asarray(annotation).astype(np.int64)
    np.testing.assert_array_equal(labels, np.where((raw == 0) | (raw == 255), 255, raw - 1))
    unreduced = SegmentationTransform(crop_size=16, train=False, reduce_labels=False)(rgb(16, 32), annotation)
    np.testing.assert_array_equal(unreduced["labels"], raw)


@pytest.mark.parametrize("size", [(10, 12), (40, 30), (64, 200), (300, 40)])
def test_train_output_has_exactly_the_crop_size(size):
    crop = (24, 32)
    transform = SegmentationTransform(crop_size=crop, train=True)
    image, annotation = rgb(*size, mode="L"), label_map(*size, (0, 5, 150))  # grayscale input: converted to RGB
    for _ in range(5):
        out = transform(image, annotation)
        assert out["pixel_values"].shape == (3, *crop) and out["pixel_values"].dtype == np.float32
        assert out["labels"].shape == crop and out["labels"].dtype == np.int64
        assert set(np.unique(out["labels"]).tolist()) <= {4, 149, 255}
    # A very wide image: its long side is capped at 4x the short-side target, so it stays lower than the crop at any
    # scale and is padded at the bottom (0 in pixel_values, 255 in labels); a very tall one at the right.
    for size, pad_rows in (((4, 40), np.s_[-1, :]), ((40, 4), np.s_[:, -1])):
        for _ in range(5):
            out = transform(rgb(*size), label_map(*size, (3,)))
            assert out["labels"].shape == crop and out["labels"][0, 0] == 2
            assert (out["labels"][pad_rows] == 255).all() and (
                out["pixel_values"][(slice(None), *pad_rows)] == 0
            ).all()


def test_train_augmentation_is_random_and_evaluation_is_not():
    image, annotation = rgb(48, 64, mode="P"), label_map(48, 64, (1, 2, 3))
    train, evaluation = SegmentationTransform(32, train=True), SegmentationTransform(32, train=False)
    outputs = [train(image, annotation)["pixel_values"] for _ in range(6)]
    assert len({o.tobytes() for o in outputs}) == 6
    # Photometric distortion: crops, flips and rescaling leave a uniform grey image grey at 128, but brightness and
    # contrast move it. Only image pixels count (labels 0..2), not the padding.
    grey = PILImage.new("RGB", (64, 48), (128, 128, 128))
    means = []
    for _ in range(20):
        out = train(grey, annotation)
        means.append(out["pixel_values"][:, out["labels"] != 255].mean())
    assert np.ptp(means) > 0.3
    evaluated = [evaluation(image, annotation)["pixel_values"] for _ in range(3)]
    assert all(np.array_equal(evaluated[0], e) for e in evaluated)
    # Evaluation is resize + normalisation only: a uniform grey image stays exactly its normalised colour.
    pixels = evaluation(grey, annotation)["pixel_values"]
    expected = (128 / 255 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    np.testing.assert_allclose(pixels[0, :, 0, 0], expected, rtol=1e-5)


def test_evaluation_keeps_the_aspect_ratio_pads_to_the_divisor_and_labels_at_their_own_size():
    transform = SegmentationTransform(crop_size=(48, 32), train=False, size_divisor=16)  # short side 32
    image, annotation = rgb(50, 70), label_map(50, 70, (4,))
    out = transform(image, annotation)
    # 50x70 (h x w) -> short side 32: 32 x 44.8 -> 32 x 45, padded to 32 x 48. No crop. The labels are not resized:
    # predictions are scored at the annotation's resolution.
    assert out["pixel_values"].shape == (1, 3, 32, 48) and out["labels"].shape == (50, 70)
    assert (out["labels"] == 3).all() and tuple(out["target_size"]) == (50, 70)
    assert (out["pixel_values"][..., 45:] == 0).all() and (out["pixel_values"][..., :45] != 0).any()
    # Portrait: 90x40 -> 72x32, already multiples of 8.
    out = SegmentationTransform(crop_size=32, train=False, size_divisor=8)(rgb(90, 40), label_map(90, 40, (4,)))
    assert out["pixel_values"].shape == (1, 3, 72, 32) and out["labels"].shape == (90, 40)


def test_training_labels_are_resized_with_nearest_neighbour_and_evaluation_labels_not_at_all():
    values = (1, 40, 90, 150)  # bilinear or cubic resizing would create values between these
    rng = np.random.default_rng(0)
    annotation = PILImage.fromarray(rng.choice(np.asarray(values, np.uint8), size=(57, 83)))  # noisy: every edge mixes
    train = SegmentationTransform(crop_size=40, train=True)
    seen = set()
    for _ in range(10):
        seen |= set(np.unique(train(rgb(57, 83), annotation)["labels"]).tolist())
    assert seen <= {0, 39, 89, 149, 255}
    assert {0, 39, 89, 149} <= seen
    # Evaluation scores at the annotation's own resolution: its labels are the annotation, reduced, pixel for pixel.
    evaluated = SegmentationTransform(crop_size=40, train=False)(rgb(57, 83), annotation)
    np.testing.assert_array_equal(evaluated["labels"], np.asarray(annotation).astype(np.int64) - 1)
    assert evaluated["pixel_values"].shape[-2:] == (48, 64)  # the image alone: 57 x 83 -> 40 x 58, padded to 16s


def test_train_crops_avoid_a_single_class_when_they_can():
    # Class 2 covers 80% of the image, a 20%-wide band of class 3 the rest: crops of mostly class 2 are re-drawn.
    array = np.full((64, 64), 2, np.uint8)
    array[:, 51:] = 3
    image, annotation = rgb(64, 64), PILImage.fromarray(array)

    def single_class_fraction(cat_max_ratio):
        transform = SegmentationTransform(crop_size=32, train=True, cat_max_ratio=cat_max_ratio)
        crops = [transform(image, annotation)["labels"] for _ in range(100)]
        return np.mean([len(set(np.unique(c).tolist()) - {255}) == 1 for c in crops])

    assert single_class_fraction(0.75) < 0.5 * single_class_fraction(1.0)


def test_transform_rejects_colour_annotations_and_size_mismatches():
    transform = SegmentationTransform(crop_size=16, train=False)
    with pytest.raises(ValueError, match="single-channel"):
        transform(rgb(16, 16), rgb(16, 16))
    with pytest.raises(ValueError, match="annotation is 12x16 but its image is 16x16"):
        transform(rgb(16, 16), label_map(16, 12))


def test_dataloader_workers_draw_different_augmentations():
    dataset = Dataset.from_dict({"image": [rgb(40, 40)] * 8, "annotation": [label_map(40, 40)] * 8})
    dataset = dataset.with_transform(SegmentationTransform(crop_size=24, train=True).apply_to_batch)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=1, num_workers=2, collate_fn=segmentation_collate, multiprocessing_context="fork"
    )
    batches = [batch["pixel_values"] for batch in loader]  # worker 0 gives batches 0, 2, ..., worker 1 1, 3, ...
    # Same image everywhere: without re-seeding, both workers would draw the same crops, flips and colours.
    assert not all(torch.equal(batches[i], batches[i + 1]) for i in range(0, 8, 2))


# ------------------------------------------------------------------------------------------------------- collate


def test_collate_pads_to_the_largest_size():
    small = {"pixel_values": np.ones((3, 2, 3), np.float32), "labels": np.full((2, 3), 7, np.int64)}
    large = {"pixel_values": torch.full((3, 4, 2), 2.0), "labels": torch.full((4, 2), 5)}
    batch = segmentation_collate([small, large])
    assert batch["pixel_values"].shape == (2, 3, 4, 3) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].shape == (2, 4, 3) and batch["labels"].dtype == torch.int64
    assert (batch["pixel_values"][0, :, :2, :3] == 1).all() and (batch["pixel_values"][0, :, 2:] == 0).all()
    assert (batch["labels"][0, :2, :3] == 7).all() and (batch["labels"][0, 2:] == 255).all()
    assert (batch["pixel_values"][1, :, :, :2] == 2).all() and (batch["pixel_values"][1, :, :, 2] == 0).all()
    assert (batch["labels"][1, :, :2] == 5).all() and (batch["labels"][1, :, 2] == 255).all()
    same = segmentation_collate([large, large])
    assert torch.equal(same["pixel_values"][0], large["pixel_values"])


# ------------------------------------------------------------------------------------------------------ demo set


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_demo_set_is_reproducible_and_passes_the_checks(tmp_path, caplog):
    first, second = tmp_path / "a", tmp_path / "b"
    assert make_demo_ade20k(str(first), num_train=12, num_validation=4, size=32) == str(first)
    make_demo_ade20k(str(second), num_train=12, num_validation=4, size=32)
    digest = tree_digest(first)
    assert digest == tree_digest(second)
    assert (
        "images/training/ADE_train_00000012.jpg" in digest and "annotations/validation/ADE_val_00000004.png" in digest
    )

    mtime = (first / "images/training/ADE_train_00000001.jpg").stat().st_mtime_ns
    make_demo_ade20k(str(first), num_train=12, num_validation=4, size=32)  # recorded in the marker: skipped
    assert (first / "images/training/ADE_train_00000001.jpg").stat().st_mtime_ns == mtime
    make_demo_ade20k(str(second), num_train=6, num_validation=4, size=32)  # other arguments: rewritten, no leftovers
    assert len(list((second / "images/training").iterdir())) == 6
    assert (
        tree_digest(second)["images/validation/ADE_val_00000001.jpg"]
        == digest["images/validation/ADE_val_00000001.jpg"]
    )
    third = tmp_path / "c"
    make_demo_ade20k(str(third), num_train=12, num_validation=4, size=32, seed=1)
    assert (
        tree_digest(third)["images/training/ADE_train_00000001.jpg"]
        != digest["images/training/ADE_train_00000001.jpg"]
    )

    dataset = load_ade20k_folder(str(first))
    assert (dataset["train"].num_rows, dataset["validation"].num_rows) == (12, 4)
    values = set()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for split in ("train", "validation"):
            clean, dropped = check_segmentation_pairs(dataset[split], num_labels=150, reduce_labels=True)
            assert dropped == [] and clean.num_rows == dataset[split].num_rows
            for row in clean:
                assert row["annotation"].mode == "L" and row["image"].mode == "RGB"
                assert row["annotation"].size == row["image"].size and min(row["image"].size) == 32
                values |= set(np.unique(np.asarray(row["annotation"])).tolist())
    assert warnings_text(caplog) == ""
    assert values <= set(DEMO_ADE20K_CLASSES) and {0, 3} <= values and len(values) >= 6


def test_demo_default_set_is_checked_in_parallel(tmp_path):
    root = make_demo_ade20k(str(tmp_path / "demo"))  # the defaults: 96 + 24 pairs of 64 px
    dataset = load_ade20k_folder(root)
    clean, dropped = check_segmentation_pairs(dataset["train"], num_proc=2)
    assert dropped == [] and clean.num_rows == 96
    batch = segmentation_collate(
        [SegmentationTransform(64, train=False)(r["image"], r["annotation"]) for r in dataset["validation"]]
    )
    # Whole images of 64 x 64, 64 x 85 or 85 x 64, padded to multiples of 16 and then to the batch's largest.
    assert batch["pixel_values"].shape[0] == 24 and set(batch["pixel_values"].shape[-2:]) <= {64, 96}
    assert max(batch["pixel_values"].shape[-2:]) == 96


def test_demo_refuses_a_folder_that_holds_other_files(tmp_path):
    write_pair(tmp_path, "training", "ADE_train_00000001", rgb(8, 8), label_map(8, 8))
    with pytest.raises(FileExistsError, match="no demo marker"):
        make_demo_ade20k(str(tmp_path), num_train=2, num_validation=1, size=16)
    assert (tmp_path / "images/training/ADE_train_00000001.jpg").is_file()
