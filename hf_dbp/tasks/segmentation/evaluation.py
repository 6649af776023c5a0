"""Segmentation evaluation at the annotation's own resolution, through the checkpoint's image processor.

The script's evaluation and `pipeline("image-segmentation", model=checkpoint)` run the same steps: the image
processor's inputs (the whole rescaled image, or its sliding windows), the model, and the processor's
`post_process_semantic_segmentation` back to the original size. `predict_batch` is the script's side of it, for a
batch of `segmentation_collate` (evaluation examples carry `target_sizes`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .image_processing import IGNORE_INDEX, DBPSegmentationImageProcessor


@torch.no_grad()
def predict_batch(
    model: torch.nn.Module,
    image_processor: DBPSegmentationImageProcessor,
    pixel_values: torch.Tensor,
    target_sizes: torch.Tensor,
    labels: torch.Tensor | None = None,
    max_inputs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class-id maps of a batch at its annotations' resolution, and the decode head's cross-entropy there.

    Args:
        model: a semantic-segmentation model returning `.logits` of shape (N, C, h, w).
        image_processor: the processor that made `pixel_values` (it knows the rescaling and the windows).
        pixel_values: (N, 3, H, W), each image's inputs in order (one, or its windows).
        target_sizes: (B, 2), each image's original (height, width).
        labels: (B, height, width) at those sizes, padded with 255 to the largest; for the loss.
        max_inputs: run the model on at most this many inputs at once (None: all of them).

    Returns:
        `predictions`, int64 (B, max height, max width), padded with 255 like the labels; and the mean cross-entropy
        over the labelled pixels (`None` without labels, or when none is labelled).
    """
    sizes = [tuple(int(v) for v in size) for size in target_sizes.tolist()]
    counts = [image_processor.num_inputs(*size) for size in sizes]
    if sum(counts) != len(pixel_values):
        raise ValueError(f"{len(pixel_values)} model inputs for {len(sizes)} images that make {sum(counts)}")
    # Each input is run at its own size, without the padding the batch added to reach its largest: padded tokens would
    # take part in the encoder's attention and change the prediction. So the masks are those of one image at a time
    # (as pipeline() and mmsegmentation's evaluation, batch size 1, give), while inputs of equal size still share a
    # forward (all windows do).
    shapes = [
        image_processor.input_shape(*size) for size, count in zip(sizes, counts, strict=True) for _ in range(count)
    ]
    logits: list[torch.Tensor | None] = [None] * len(shapes)
    for shape in dict.fromkeys(shapes):
        same = [j for j, s in enumerate(shapes) if s == shape]
        for chunk in [same] if not max_inputs else [same[k : k + max_inputs] for k in range(0, len(same), max_inputs)]:
            out = model(pixel_values=pixel_values[chunk, :, : shape[0], : shape[1]]).logits
            for j, one in zip(chunk, out, strict=True):
                logits[j] = one
    height, width = labels.shape[-2:] if labels is not None else (max(h for h, _ in sizes), max(w for _, w in sizes))
    predictions = torch.full((len(sizes), height, width), IGNORE_INDEX, dtype=torch.int64, device=pixel_values.device)
    # Summed on the device: one read of the pixel count per batch, not one per image.
    loss_sum = pixel_values.new_zeros((), dtype=torch.float32)
    labelled = torch.zeros((), dtype=torch.int64, device=pixel_values.device)
    start = 0
    for i, (size, count) in enumerate(zip(sizes, counts, strict=True)):
        scores = image_processor.image_scores(torch.stack(logits[start : start + count]), size)  # (C, h, w), float32
        start += count
        predictions[i, : size[0], : size[1]] = scores.argmax(dim=0)
        if labels is not None:
            target = labels[i, : size[0], : size[1]].to(scores.device)
            loss_sum += F.cross_entropy(scores[None], target[None], ignore_index=IGNORE_INDEX, reduction="sum")
            labelled += (target != IGNORE_INDEX).sum()
    loss = loss_sum / labelled if labels is not None and int(labelled) else None
    return predictions, loss


__all__ = ["predict_batch"]
