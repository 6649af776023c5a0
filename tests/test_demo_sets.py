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
