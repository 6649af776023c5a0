"""The embedded image sets: each installs offline with the package's extras, and validates on other images than it
trains on; the held-out sets share no image with the sets that settings were tuned on."""

import numpy as np
import pytest

from hf_dbp.tasks.image_data import DEMO_SETS, HELDOUT_SETS, _images, demo_image_dataset


def pixels(dataset) -> set[bytes]:
    return {np.asarray(image).tobytes() for image in dataset["image"]}


@pytest.mark.parametrize("name", list(DEMO_SETS))
def test_every_set_loads_offline_with_rgb_crops_of_other_images_for_validation(name):
    data = demo_image_dataset(num_train=40, num_validation=12, seed=0, photos=name)
    assert len(data["train"]) == 40 and len(data["validation"]) == 12
    for image in list(data["train"]["image"]) + list(data["validation"]["image"]):
        assert image.mode == "RGB" and image.width == image.height and image.width >= 16
    train, validation = DEMO_SETS[name]
    train_images = [i.tobytes() for source in train for i in _images(source)]
    assert not {i.tobytes() for source in validation for i in _images(source)} & set(train_images)
    if name == "heldout_faces":  # 25 px images are taken whole, not cropped
        assert {image.width for image in data["train"]["image"]} == {25}


def test_held_out_sets_share_no_source_with_the_tuned_on_sets():
    tuned = {source for name in ("default", "alternate") for split in DEMO_SETS[name] for source in split}
    for name in HELDOUT_SETS:
        assert not tuned & {source for split in DEMO_SETS[name] for source in split}, name


def test_faces_split_keeps_faces_and_other_patches_on_both_sides():
    train, validation = _images("lfw:train"), _images("lfw:validation")
    assert len(train) == 160 and len(validation) == 40
    assert all(image.shape == (25, 25, 3) and image.dtype == np.uint8 for image in train + validation)


def test_terrain_is_scaled_to_the_full_8_bit_range():
    (image,) = _images("dem:jacksboro_fault_dem.npz")
    assert image.dtype == np.uint8 and image.min() == 0 and image.max() == 255 and image.ndim == 3


def test_crop_folders_cuts_a_users_photographs_as_the_embedded_sets_are_cut(tmp_path, monkeypatch):
    """examples/crop_folders.py: the crops of the embedded sets' generator, training crops from the training images
    only; an image named on both sides or a missing file is refused before anything is written."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    from hf_dbp.tasks.image_data import random_crops

    script = Path(__file__).resolve().parents[1] / "examples" / "crop_folders.py"
    rng = np.random.default_rng(1)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    common = ["--output_dir", str(tmp_path / "out"), "--num_train", "5", "--num_validation", "2"]
    run = subprocess.run(
        [
            sys.executable,
            script,
            "--train_images",
            tmp_path / "a.png",
            tmp_path / "b.png",
            "--validation_images",
            tmp_path / "c.png",
            *common,
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    written = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "out" / "train").iterdir())]
    images = [np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("a", "b")]
    expected = [np.asarray(c) for c in random_crops(images, 5, np.random.default_rng(0), 48, 160)]
    assert len(written) == 5 and all(np.array_equal(w, e) for w, e in zip(written, expected, strict=True))
    assert len(list((tmp_path / "out" / "validation").iterdir())) == 2
    refused = subprocess.run(
        [
            sys.executable,
            script,
            "--train_images",
            tmp_path / "a.png",
            "--validation_images",
            tmp_path / "a.png",
            *common[:2],
            str(tmp_path / "bad"),
        ],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 1 and "in both" in refused.stderr and not (tmp_path / "bad").exists(), refused.stderr
    spec = importlib.util.spec_from_file_location("crop_folders", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses resolve the module's annotations through it
    spec.loader.exec_module(module)
    with pytest.raises(ValueError, match="no such image file, nor an embedded source: .*nowhere.png"):
        module.CropArguments([str(tmp_path / "nowhere.png")], [str(tmp_path / "c.png")], str(tmp_path / "bad"))
