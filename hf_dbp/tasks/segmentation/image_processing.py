"""The image processor of UperNet checkpoints fine-tuned here: the evaluation transform, saved with every checkpoint.

`examples/run_segmentation.py` evaluates the way mmsegmentation's ADE20K recipe (BEiT, MAE) does: the image is
rescaled so that its short side is the crop size (the long side at most 4 times that, mmsegmentation's (2048, 512)
scale), normalised, and either run whole (padded at the bottom/right to a multiple of the patch) or cut into
overlapping windows (512 px, stride 341 in the recipe) whose logits are averaged; the logits are then resized to the
annotation's own resolution, where they are scored. transformers has no image processor that does this (its
segmentation processors resize to a fixed height x width and resize the padding along with the image), so this one is
written here, on transformers' PIL backend, and the script's evaluation goes through it: `pipeline("image-segmentation",
model=checkpoint)` gives the masks the script scored, whole image or sliding window alike.

`preprocess` maps each image to its model input, `post_process_semantic_segmentation` maps the model's logits back to
class-id maps of the original size; both work out the rescaled size and the windows from the original (height, width)
alone, so nothing but the target sizes passes between them (which is all the pipeline passes).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import ChannelDimension, ImageInput, PILImageResampling
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType

from ..image_data import IMAGENET_MEAN, IMAGENET_STD
from ..image_modes import to_rgb

IGNORE_INDEX = 255
"""Label value the loss and the metrics ignore: padding, and raw 0 ("other") after label reduction."""

REDUCE_LABELS = np.arange(256, dtype=np.uint8) - np.uint8(1)
"""Raw ADE20K id -> training label, as a lookup table: 0 ("other") -> 255 (ignored), k -> k - 1, 255 stays 255."""
REDUCE_LABELS[IGNORE_INDEX] = IGNORE_INDEX


def _cv2():
    # Rescaled with OpenCV, as the training transform (albumentations) does, so evaluation inputs look like training
    # ones; imported here so that `import hf_dbp` needs no OpenCV (it comes with the `examples` extra).
    try:
        import cv2
    except ImportError as error:
        raise ImportError(
            "DBPSegmentationImageProcessor resizes with OpenCV: pip install opencv-python-headless (or hf-dbp[examples])"
        ) from error
    return cv2


def rescaled_size(height: int, width: int, short_side: float, long_side: float) -> tuple[int, int]:
    """The (height, width) that mmsegmentation's keep-ratio `Resize` gives: the short side becomes `short_side`
    unless that makes the long side exceed `long_side` (then the long side becomes `long_side`), rounded."""
    factor = min(short_side / min(height, width), long_side / max(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def window_boxes(height: int, width: int, window: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of mmsegmentation's sliding windows over a (height, width) image at least `window` on each
    side: a grid of `stride` steps whose last row and column are moved back to end at the border."""
    rows = max(height - window + stride - 1, 0) // stride + 1
    cols = max(width - window + stride - 1, 0) // stride + 1
    return [
        (min(r * stride, height - window), min(c * stride, width - window)) for r in range(rows) for c in range(cols)
    ]


GEOMETRY_KEYS = ("size", "do_resize", "size_divisor", "window_size", "window_stride")
"""Settings that `preprocess` takes from the processor only: post-processing recomputes the geometry from them."""


class DBPSegmentationImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    do_reduce_labels (`bool`, *optional*, defaults to `self.do_reduce_labels`):
        ADE20K annotations: label 0 ("other") becomes 255 (ignored) and k becomes k - 1.
    size_divisor (`int`, *optional*, defaults to `self.size_divisor`):
        Inputs are padded at the bottom/right to a multiple of this (the encoder's patch size).
    window_size (`int`, *optional*, defaults to `self.window_size`):
        Sliding-window inference with square windows of this size; `None` runs the whole (rescaled) image.
    window_stride (`int`, *optional*, defaults to `self.window_stride`):
        Step between windows (default: two thirds of `window_size`, 341 for 512, as in mmsegmentation).
    """

    do_reduce_labels: bool
    size_divisor: int
    window_size: int | None
    window_stride: int | None


class DBPSegmentationImageProcessor(PilBackend):
    r"""
    The evaluation transform of `examples/run_segmentation.py` as a transformers image processor.

    Args:
        size (`dict[str, int]`, *optional*, defaults to `{"shortest_edge": 512, "longest_edge": 2048}`):
            The short side after rescaling, and the most the long side may be.
        size_divisor (`int`, *optional*, defaults to 16):
            Whole-image inputs are padded at the bottom/right to a multiple of this (the encoder's patch size).
        window_size (`int`, *optional*):
            Sliding-window inference with square windows of this size (a multiple of `size_divisor`); an image smaller
            than a window is padded to it. `None` (the default) runs the whole image.
        window_stride (`int`, *optional*):
            Step between windows; default two thirds of `window_size`, rounded (341 for 512).
        image_mean, image_std (`list[float]`, *optional*, default ImageNet's):
            Normalisation of pixel values scaled to [0, 1].
        do_reduce_labels (`bool`, *optional*, defaults to `False`):
            Reduce ADE20K annotations passed as `segmentation_maps` (0 -> 255, k -> k - 1).

    Padding is 0 after normalisation (the mean colour), 255 (ignored) in labels. Images are rescaled bilinearly with
    OpenCV, as in training (`SegmentationTransform`); labels with nearest neighbour. `preprocess(images)` returns
    `pixel_values` of shape (N, 3, H, W): one input per image (whole image, padded to the largest of the batch) or, with
    `window_size`, all windows of all images in order. Pass the images' original (height, width) as `target_sizes` to
    `post_process_semantic_segmentation` to get class-id maps of that size.
    """

    valid_kwargs = DBPSegmentationImageProcessorKwargs
    model_input_names = ["pixel_values"]
    image_mean = IMAGENET_MEAN
    image_std = IMAGENET_STD
    size = {"shortest_edge": 512, "longest_edge": 2048}
    default_to_square = False
    do_resize = True
    resample = PILImageResampling.BILINEAR  # what the resizing is; it is done with OpenCV, as in training
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    do_reduce_labels = False
    size_divisor = 16
    window_size = None
    window_stride = None

    def __init__(self, **kwargs: Unpack[DBPSegmentationImageProcessorKwargs]) -> None:
        super().__init__(**kwargs)
        if self.window_size is not None:
            if self.window_size % (self.size_divisor or 1):
                raise ValueError(
                    f"window_size {self.window_size} must be a multiple of size_divisor {self.size_divisor}"
                )
            if self.window_stride is None:
                self.window_stride = int(self.window_size * 2 / 3)  # 341 for 512, as in mmsegmentation's configs
            if not 0 < self.window_stride <= self.window_size:
                raise ValueError(
                    f"window_stride must be in 1..window_size ({self.window_size}); got {self.window_stride}"
                )

    def preprocess(
        self,
        images: ImageInput,
        segmentation_maps: ImageInput | None = None,
        **kwargs: Unpack[DBPSegmentationImageProcessorKwargs],
    ) -> BatchFeature:
        r"""
        segmentation_maps (`ImageInput`, *optional*):
            Annotations to transform with the images, for training-style inputs: rescaled the same way (nearest
            neighbour) and padded with 255; they are returned as `labels`. (The script's evaluation keeps labels at
            their own resolution instead: see `post_process_semantic_segmentation`.)

        The geometry (`size`, `do_resize`, `size_divisor`, `window_size`, `window_stride`) is the processor's own:
        post-processing works it out again from the original sizes, so it cannot differ per call (make another
        processor instead).
        """
        if overridden := sorted(k for k in GEOMETRY_KEYS if k in kwargs):
            raise ValueError(
                f"{', '.join(overridden)}: the geometry is set on the processor, not per call (post-"
                "processing must know it); build a DBPSegmentationImageProcessor with these values"
            )
        return super().preprocess(images, segmentation_maps, **kwargs)

    def convert_to_rgb(self, image: Any, input_data_format: Any = None) -> Any:
        """A PIL image as the scripts' data path converts it (`hf_dbp.tasks.image_modes.to_rgb`: EXIF orientation,
        16-bit grayscale scaled, transparency on white), when the processor is called on it; other inputs as
        transformers converts them. (pipeline() converts its inputs to RGB with Pillow before the processor sees
        them: give it `to_rgb(image)` as a PIL image for 16-bit or transparent files.)"""
        if isinstance(image, PILImage.Image):
            return to_rgb(image)
        return super().convert_to_rgb(image, input_data_format=input_data_format)

    # ---------------------------------------------------------------------------------------------- the geometry
    def _short_long(self) -> tuple[int, int]:
        size = self.size  # a SizeDict once set, a dict as a class default
        short = size["shortest_edge"] if isinstance(size, dict) else size.shortest_edge
        long = (size.get("longest_edge") if isinstance(size, dict) else size.longest_edge) or 4 * short
        return short, long

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of the given original size is rescaled to (before any padding)."""
        if not self.do_resize:
            return height, width
        return rescaled_size(height, width, *self._short_long())

    def _padded_size(
        self, height: int, width: int, window_size: int | None, size_divisor: int | None
    ) -> tuple[int, int]:
        if window_size is not None:  # windows (multiples of the divisor) on the image itself, as mmsegmentation's grid
            return max(height, window_size), max(width, window_size)
        divisor = size_divisor or 1
        return math.ceil(height / divisor) * divisor, math.ceil(width / divisor) * divisor

    def input_shape(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) of each model input for an image of this original size, before a batch pads it to its
        largest: the rescaled image padded to the divisor, or a window."""
        if self.window_size is not None:
            return self.window_size, self.window_size
        return self._padded_size(*self.input_size(height, width), None, self.size_divisor)

    def num_inputs(self, height: int, width: int) -> int:
        """How many model inputs (windows, or 1 for the whole image) an image of this original size becomes."""
        if self.window_size is None:
            return 1
        padded = self._padded_size(*self.input_size(height, width), self.window_size, self.size_divisor)
        return len(window_boxes(*padded, self.window_size, self.window_stride))

    # -------------------------------------------------------------------------------------------- preprocessing
    def _preprocess_image_like_inputs(
        self,
        images: ImageInput,
        segmentation_maps: ImageInput | None,
        do_convert_rgb: bool,
        input_data_format: ChannelDimension,
        return_tensors: str | TensorType | None,
        **kwargs: Any,
    ) -> BatchFeature:
        # The geometry is the processor's own (`preprocess` refuses it per call): the same methods place the inputs
        # here and map the logits back in `image_scores`.
        if segmentation_maps is not None and self.window_size is not None:
            raise ValueError("segmentation_maps go with whole-image inputs; set window_size=None for them")
        images = self._prepare_image_like_inputs(
            images=images, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format
        )
        window = self.window_size
        cv2 = _cv2()
        inputs = []
        for image in images:
            array = np.moveaxis(image, 0, -1)  # channels-first from the backend; OpenCV works on (H, W, C)
            new_height, new_width = self.input_size(*array.shape[:2])
            if (new_height, new_width) != array.shape[:2]:
                array = cv2.resize(array, (new_width, new_height), interpolation=cv2.INTER_LINEAR)
            array = array.astype(np.float32)
            if kwargs["do_rescale"]:
                array = array * np.float32(kwargs["rescale_factor"])
            if kwargs["do_normalize"]:
                mean = np.asarray(kwargs["image_mean"], dtype=np.float32)
                std = np.asarray(kwargs["image_std"], dtype=np.float32)
                array = (array - mean) / std
            array = np.moveaxis(array, -1, 0)
            padded = self._padded_size(*array.shape[1:], window, self.size_divisor)
            array = np.pad(array, ((0, 0), (0, padded[0] - array.shape[1]), (0, padded[1] - array.shape[2])))
            if window is None:
                inputs.append(array)
            else:
                inputs.extend(
                    array[:, top : top + window, left : left + window]
                    for top, left in window_boxes(*padded, window, self.window_stride)
                )
        # One batch: pad every input to the largest at the bottom/right (windows are all the same size already).
        height, width = max(a.shape[1] for a in inputs), max(a.shape[2] for a in inputs)
        pixel_values = [np.pad(a, ((0, 0), (0, height - a.shape[1]), (0, width - a.shape[2]))) for a in inputs]
        data = {"pixel_values": np.stack(pixel_values) if return_tensors else pixel_values}
        if segmentation_maps is not None:
            maps = self._prepare_image_like_inputs(
                images=segmentation_maps,
                expected_ndims=2,
                do_convert_rgb=False,
                input_data_format=ChannelDimension.FIRST,
            )
            labels = []
            for label_map, array in zip(maps, pixel_values, strict=True):
                label_map = label_map[0].astype(np.uint8)
                if kwargs.get("do_reduce_labels"):
                    label_map = REDUCE_LABELS[label_map]
                new_height, new_width = self.input_size(*label_map.shape)
                if (new_height, new_width) != label_map.shape:
                    label_map = cv2.resize(label_map, (new_width, new_height), interpolation=cv2.INTER_NEAREST)
                out = np.full(array.shape[1:], IGNORE_INDEX, dtype=np.int64)
                out[: label_map.shape[0], : label_map.shape[1]] = label_map
                labels.append(out)
            data["labels"] = np.stack(labels) if return_tensors else labels
        return BatchFeature(data=data, tensor_type=return_tensors)

    # ------------------------------------------------------------------------------------------ post-processing
    def post_process_semantic_segmentation(
        self,
        outputs: Any,
        target_sizes: list[tuple[int, int]] | torch.Tensor | None = None,
        return_segmentation_scores: bool = False,
    ) -> list[torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Class-id maps at each image's original size from the model's outputs on `preprocess`'s inputs.

        Args:
            outputs: the model's output (with `.logits`, (N, C, h, w)) or the logits themselves.
            target_sizes: each image's original (height, width), in the order given to `preprocess`. Required: the
                rescaled size, the padding and the windows are worked out from it.
            return_segmentation_scores: also return the (C, height, width) scores (the averaged, resized logits).

        Returns:
            One int64 (height, width) map per image, or dicts with `segmentation` and `segmentation_scores`.
        """
        logits = (
            outputs.logits
            if hasattr(outputs, "logits")
            else outputs["logits"]
            if isinstance(outputs, dict)
            else outputs
        )
        if target_sizes is None:
            raise ValueError(
                "target_sizes is required: the original (height, width) of each image, as given to preprocess"
            )
        if isinstance(target_sizes, torch.Tensor):
            target_sizes = target_sizes.tolist()
        counts = [self.num_inputs(int(h), int(w)) for h, w in target_sizes]
        if sum(counts) != len(logits):
            raise ValueError(
                f"{len(logits)} logits for {len(target_sizes)} images that make {sum(counts)} inputs"
                + (f" (windows of {self.window_size}, stride {self.window_stride})" if self.window_size else "")
            )
        # The batch's inputs were padded to its largest: logits below the input resolution are brought to that canvas.
        canvas = None
        if self.window_size is None:
            own = [self.input_shape(int(h), int(w)) for h, w in target_sizes]
            canvas = (max(h for h, _ in own), max(w for _, w in own))
        results, start = [], 0
        for (height, width), count in zip(target_sizes, counts, strict=True):
            scores = self.image_scores(logits[start : start + count], (int(height), int(width)), canvas)
            start += count
            segmentation = scores.argmax(dim=0)
            results.append(
                {"segmentation": segmentation, "segmentation_scores": scores}
                if return_segmentation_scores
                else segmentation
            )
        return results

    def image_scores(
        self, logits: torch.Tensor, target_size: tuple[int, int], canvas: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """One image's (C, height, width) class scores at its original size, from the logits of its inputs (one
        whole-image input, or all its windows: averaged where they overlap). `canvas`: the (height, width) its
        whole-image input was padded to in its batch (default: its own padded size, as for a batch of one); only
        needed for logits below the input resolution."""
        height, width = target_size
        new_height, new_width = self.input_size(height, width)
        logits = logits.float()
        if self.window_size is None:
            # Inputs of a batch are padded to its largest; padding is at the bottom/right, so this image's part is the
            # top-left corner, whatever the batch. Logits below the input's resolution are first brought to the
            # input's size: the batch's canvas, or this image's own padded size (a batch of one, as the pipeline runs).
            full = logits[0]
            own = self._padded_size(new_height, new_width, None, self.size_divisor)
            at_input = full.shape[-2] >= own[0] and full.shape[-1] >= own[1]
            padded = tuple(full.shape[-2:]) if at_input else (canvas or own)
        else:
            window, padded = (
                self.window_size,
                self._padded_size(new_height, new_width, self.window_size, self.size_divisor),
            )
            boxes = window_boxes(*padded, window, self.window_stride)
            full = logits.new_zeros((logits.shape[1], *padded))
            count = logits.new_zeros((1, *padded))
            for (top, left), window_logits in zip(boxes, logits, strict=True):
                if window_logits.shape[-2:] != (window, window):
                    window_logits = F.interpolate(
                        window_logits[None], size=(window, window), mode="bilinear", align_corners=False
                    )[0]
                full[:, top : top + window, left : left + window] += window_logits
                count[:, top : top + window, left : left + window] += 1
            full = full / count
        if full.shape[-2:] != tuple(padded):  # logits at a lower resolution than the input: bring them to it first
            full = F.interpolate(full[None], size=tuple(padded), mode="bilinear", align_corners=False)[0]
        full = full[:, :new_height, :new_width]  # drop the padding before resizing, so it never shifts the map
        if (new_height, new_width) != (height, width):
            full = F.interpolate(full[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        return full


__all__ = ["DBPSegmentationImageProcessor", "rescaled_size", "window_boxes"]
