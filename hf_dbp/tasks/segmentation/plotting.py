"""The segmentation run's figure: validation images, their true and their predicted masks, side by side."""

from __future__ import annotations

import numpy as np

from ..image_data import IMAGENET_MEAN, IMAGENET_STD


def _label_colors(num_labels: int) -> np.ndarray:
    """A fixed colour per class (255, ignored, is black), the same in every figure."""
    colors = np.random.default_rng(0).integers(40, 256, size=(256, 3)).astype(np.uint8)
    colors[255] = 0
    return colors


IGNORED_LABEL_NAME = "ignored (not scored)"


def legend_entries(
    labels, predictions, id2label: dict, colors: np.ndarray, num_labels: int
) -> list[tuple[str, tuple]]:
    """(name, RGB in [0, 1]) of every class drawn in `labels` or `predictions`, and the black of the ignored label 255
    (padding, ADE20K's "other") where the labels hold it."""
    # One array per image, of any size (evaluation scores each image at its annotation's resolution).
    labels = np.concatenate([np.asarray(a).ravel() for a in labels]) if len(labels) else np.zeros(0, np.int64)
    predictions = np.concatenate([np.asarray(a).ravel() for a in predictions]) if len(predictions) else labels
    shown = sorted(
        {int(c) for c in np.unique(labels) if c != 255} | {int(c) for c in np.unique(predictions) if c < num_labels}
    )
    entries = [(id2label.get(c, str(c)).strip(), tuple(colors[c] / 255)) for c in shown]
    if (labels == 255).any():
        entries.append((IGNORED_LABEL_NAME, (0.0, 0.0, 0.0)))
    return entries


def plot_segmentation_examples(
    pixel_values, labels, predictions, path: str, num_labels: int, id2label=None, mean=None, std=None
) -> str:
    """Write a PNG with one row per image: the image, its true mask and the predicted mask, side by side.

    Args:
        pixel_values: the images: normalised (3, H, W) arrays (a batch), or (H, W, 3) uint8 RGB ones; of any sizes.
        labels, predictions: class ids, (H, W) per image, the sizes of the images; 255 in `labels` (ignored) is
            drawn black.
        path: where to write the PNG.
        num_labels: number of classes.
        id2label: class names, for a legend of the classes shown.
        mean, std: the normalisation to undo (default: ImageNet's).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = np.asarray(mean or IMAGENET_MEAN)[:, None, None]
    std = np.asarray(std or IMAGENET_STD)[:, None, None]
    colors = _label_colors(num_labels)
    rows = len(pixel_values)
    fig, axes = plt.subplots(rows, 3, figsize=(9, 3 * rows), squeeze=False)
    for row in range(rows):
        image = np.asarray(pixel_values[row])
        if image.dtype == np.uint8:
            image = image.astype(np.float32) / 255
        else:
            image = np.clip(image.astype(np.float32) * std + mean, 0, 1).transpose(1, 2, 0)
        label = np.asarray(labels[row]).astype(np.int64)
        prediction = np.asarray(predictions[row]).astype(np.int64)
        prediction = np.where(label == 255, 255, prediction)  # padding and "other" are not judged: show them black
        for ax, picture, title in zip(
            axes[row],
            (image, colors[label], colors[prediction]),
            ("image", "true mask", "predicted mask"),
            strict=True,
        ):
            ax.imshow(picture)
            ax.set_title(title)
            ax.axis("off")
    if id2label:
        from matplotlib.patches import Patch

        entries = legend_entries(labels, predictions, id2label, colors, num_labels)
        handles = [Patch(facecolor=rgb, edgecolor="gray", label=name) for name, rgb in entries]
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), frameon=False)
        fig.tight_layout(rect=(0, 0.04 + 0.02 * (len(handles) // 6), 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
