"""DBPSegmentationImageProcessor, the evaluation transform saved with every UperNet checkpoint: its geometry against
mmsegmentation's rules, the way back to the original size, and what it refuses."""

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from transformers import AutoImageProcessor

import hf_dbp  # noqa: F401 - registers the processor with AutoImageProcessor
from hf_dbp import DBPSegmentationImageProcessor
from hf_dbp.tasks.image_data import IMAGENET_MEAN, IMAGENET_STD
from hf_dbp.tasks.segmentation.image_processing import rescaled_size, window_boxes


def processor(**kwargs) -> DBPSegmentationImageProcessor:
    return DBPSegmentationImageProcessor(
        **{"size": {"shortest_edge": 32, "longest_edge": 128}, "size_divisor": 8, **kwargs}
    )


def test_rescaling_is_mmsegmentations_keep_ratio_resize():
    assert rescaled_size(375, 500, 512, 2048) == (512, 683)  # an ADE20K image
    assert rescaled_size(500, 375, 512, 2048) == (683, 512)
    assert rescaled_size(100, 1000, 512, 2048) == (205, 2048)  # long side capped: the short one ends below 512
    assert rescaled_size(512, 683, 512, 2048) == (512, 683)  # already there


def test_windows_cover_the_image_on_mmsegmentations_grid():
    boxes = window_boxes(512, 683, 512, 341)
    assert boxes == [(0, 0), (0, 171)]  # the last column moved back to end at the border
    assert window_boxes(512, 512, 512, 341) == [(0, 0)]
    boxes = window_boxes(1100, 700, 512, 341)
    assert {top for top, _ in boxes} == {0, 341, 588} and {left for _, left in boxes} == {0, 188}
    covered = np.zeros((1100, 700), bool)
    for top, left in boxes:
        covered[top : top + 512, left : left + 512] = True
    assert covered.all()


def test_whole_image_inputs_are_rescaled_normalised_and_padded_at_the_bottom_right():
    image = PILImage.new("RGB", (70, 50), (128, 128, 128))  # 50 x 70 -> 32 x 45 -> padded to 32 x 48
    pixels = processor()(image, return_tensors="np")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 48)
    expected = (128 / 255 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    np.testing.assert_allclose(pixels[0, :, 0, 0], expected, rtol=1e-5)
    assert (pixels[..., 45:] == 0).all() and (pixels[..., :45] != 0).all()
    assert processor().input_shape(50, 70) == (32, 48) and processor().num_inputs(50, 70) == 1


def test_post_processing_gives_each_image_its_own_size_and_ignores_the_padding():
    """Logits that put class 1 on the image's left half and class 2 on its right come back as that map at the
    original size; a class placed only in the padding never appears."""
    p = processor()
    sizes = [(50, 70), (40, 40)]
    logits = torch.zeros(2, 3, 32, 48)
    for i, (height, width) in enumerate(sizes):
        h, w = p.input_size(height, width)
        logits[i, 1, :h, : w // 2] = 5
        logits[i, 2, :h, w // 2 : w] = 5
        logits[i, 0, :, w:] = 50  # the padding
    maps = p.post_process_semantic_segmentation(logits, target_sizes=sizes)
    for (height, width), segmentation in zip(sizes, maps, strict=True):
        assert segmentation.shape == (height, width)
        assert set(segmentation.unique().tolist()) == {1, 2}
        assert (segmentation[:, : width // 2 - 1] == 1).all() and (segmentation[:, width // 2 + 1 :] == 2).all()


def test_sliding_windows_are_averaged_back_into_one_map():
    p = processor(window_size=32, window_stride=16)
    image = PILImage.new("RGB", (100, 40), (10, 200, 30))  # 40 x 100 -> 32 x 80: windows at 0, 16, 32, 48
    pixels = p(image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (4, 3, 32, 32) and p.num_inputs(40, 100) == 4
    logits = torch.zeros(4, 2, 32, 32)
    logits[:, 1] = torch.tensor([1.0, 3.0, -1.0, -5.0])[:, None, None]  # class 1 wins where the mean of windows > 0
    scores = p.post_process_semantic_segmentation(logits, [(40, 100)], return_segmentation_scores=True)[0]
    assert scores["segmentation"].shape == (40, 100)
    column_means = scores["segmentation_scores"][1, 0]
    # Column 0 is under window 0 alone (1.0); column 20 of the 80 under windows 0 and 1 (2.0), in original pixels.
    assert column_means[0].item() == pytest.approx(1.0) and column_means[25].item() == pytest.approx(2.0)
    assert scores["segmentation"][:, -1].eq(0).all()  # the last columns: windows 2 and 3 only, mean -3


def test_sixteen_bit_inputs_are_scaled_as_the_training_data_is():
    gradient = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))
    pixels = processor()(PILImage.fromarray(gradient), return_tensors="np")["pixel_values"][0, 0]
    raw = pixels * IMAGENET_STD[0] + IMAGENET_MEAN[0]  # back to [0, 1]
    assert raw.min() == pytest.approx(0.0, abs=1e-3) and raw.max() == pytest.approx(1.0, abs=1e-3)
    assert (np.diff(raw[0]) >= -1e-6).all() and np.mean(raw > 0.99) < 0.05  # a gradient, not all white


def test_saved_processor_loads_back_with_auto_image_processor(tmp_path):
    processor(window_size=32).save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is DBPSegmentationImageProcessor
    assert (loaded.window_size, loaded.window_stride, loaded.size_divisor) == (32, 21, 8)


def test_bad_settings_and_mismatched_outputs_are_refused():
    with pytest.raises(ValueError, match="multiple of size_divisor"):
        processor(window_size=30)
    with pytest.raises(ValueError, match="window_stride"):
        processor(window_size=32, window_stride=40)
    with pytest.raises(ValueError, match="target_sizes is required"):
        processor().post_process_semantic_segmentation(torch.zeros(1, 2, 32, 32))
    with pytest.raises(ValueError, match="3 logits for 1 images that make 4 inputs"):
        processor(window_size=32, window_stride=16).post_process_semantic_segmentation(
            torch.zeros(3, 2, 32, 32), [(40, 100)]
        )


def test_low_resolution_logits_of_a_mixed_size_batch_map_each_image_onto_its_own_part():
    """Logits at a quarter of the input size for a batch of a wide and a square image (padded to the wide one):
    each image's map comes from its own top-left part of the batch's canvas, not from the canvas squeezed."""
    p = processor()
    sizes = [(40, 100), (40, 40)]  # inputs 32 x 80 and 32 x 32, batched to 32 x 80
    logits = torch.zeros(2, 2, 8, 20)
    logits[:, 1, :, :4] = 5  # class 1 on the first 16 input columns of each, everything else class 0
    maps = p.post_process_semantic_segmentation(logits, target_sizes=sizes)
    # The square image's 32 input columns: class 1 on about half of them (16 of 32, give or take the bilinear edge),
    # not on a fifth (16 of the canvas' 80 squeezed into its 32).
    assert maps[1].eq(1).float().mean().item() == pytest.approx(0.5, abs=0.1)
    assert maps[0].eq(1).float().mean().item() == pytest.approx(0.2, abs=0.05)


def test_the_geometry_cannot_change_per_call():
    with pytest.raises(ValueError, match="size: the geometry is set on the processor"):
        processor()(PILImage.new("RGB", (40, 40)), size={"shortest_edge": 64, "longest_edge": 256})
    with pytest.raises(ValueError, match="window_size"):
        processor()(PILImage.new("RGB", (40, 40)), window_size=16)


def test_windows_stay_on_the_image_grid_not_the_divisor_padded_one():
    """An ADE20K image rescaled to 512 x 683 slides two windows at columns 0 and 171, as mmsegmentation does: the
    last one ends at the image's border, with no padding in it."""
    p = DBPSegmentationImageProcessor(size={"shortest_edge": 512, "longest_edge": 2048}, window_size=512)
    pixels = p(PILImage.new("RGB", (683, 512), (255, 255, 255)), return_tensors="np")["pixel_values"]
    assert pixels.shape == (2, 3, 512, 512) and p.window_stride == 341
    white = (1.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    np.testing.assert_allclose(pixels[1, :, :, -1], np.broadcast_to(white[:, None], (3, 512)), rtol=1e-5)
