"""Bounded-memory semantic-segmentation metrics (mean IoU & co.) for `transformers.Trainer`.

The evaluation keeps one (num_labels x num_labels) confusion matrix, never the predictions: per batch,
[`confusion_matrix`] counts (reference, predicted) pixel pairs with `torch.bincount`; at the end the summed
matrix goes through the local `evaluate` metric `hf_dbp/tasks/segmentation/segmentation_iou` (definitions of the Hub's
`evaluate-metric/mean_iou`).

Typical use with a segmentation model whose logits are (B, C, h, w) and labels (B, H, W) already reduced
(ADE20K: 0..149, 255 = ignored)::

    args = TrainingArguments(..., batch_eval_metrics=True)
    trainer = Trainer(
        model=model,
        args=args,
        compute_metrics=SegmentationEvaluator(150, id2label=ade20k_id2label()),
        preprocess_logits_for_metrics=logits_to_predictions,
        ...,
    )

Labels are NOT reduced here (they were reduced once in the data transform).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

SEGMENTATION_METRIC_PATH: Path = Path(__file__).resolve().parent / "segmentation_iou"
"""Folder of the local `evaluate` metric script (`segmentation_iou.py`)."""

TRAINER_PAD_INDEX: int = -100
"""Value the Trainer pads labels with when it gathers batches of different sizes across processes."""


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, (tuple, list)) and len(x) > 0 and isinstance(x[0], (torch.Tensor, np.ndarray)):
        raise TypeError(
            f"{name} is a {type(x).__name__} of arrays; pass a single tensor (for a model with several outputs, "
            "select the logits or class-id map first)"
        )
    tensor = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(
            f"{name} must hold integer class ids, got dtype {tensor.dtype}; for logits use logits_to_predictions "
            "(e.g. as Trainer(preprocess_logits_for_metrics=logits_to_predictions))"
        )
    return tensor


def confusion_matrix(
    predictions: torch.Tensor | np.ndarray,
    references: torch.Tensor | np.ndarray,
    num_labels: int,
    ignore_index: int | None = 255,
) -> torch.Tensor:
    """Count (reference class, predicted class) pixel pairs.

    Args:
        predictions: predicted class ids, integer tensor or array of any shape (e.g. (B, H, W)), values in
            [0, num_labels) wherever the reference is not ignored (predictions at ignored pixels are not looked at).
        references: reference class ids, same shape as `predictions`; values in [0, num_labels) or `ignore_index`.
            Labels must already be reduced (this function does not shift them).
        num_labels: number of classes.
        ignore_index: reference value of pixels to skip (255 for reduced ADE20K); `None` skips nothing.

    Returns:
        int64 tensor of shape (num_labels, num_labels) on the device of `references`: entry [r, p] is the number of
        non-ignored pixels with reference class r and predicted class p (rows = reference, columns = prediction).

    Raises:
        ValueError: if the shapes differ, or a non-ignored reference (or the prediction at a non-ignored pixel) lies
            outside [0, num_labels); the message names the offending value.
        TypeError: if `predictions` or `references` are floating point (logits rather than class ids).
    """
    if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
    num_labels = int(num_labels)
    predictions = _as_tensor(predictions, "predictions")
    references = _as_tensor(references, "references")
    if predictions.shape != references.shape:
        raise ValueError(
            f"predictions and references must have the same shape, got {tuple(predictions.shape)} and "
            f"{tuple(references.shape)}"
        )
    references = references.reshape(-1).long()
    predictions = predictions.to(references.device).reshape(-1).long()
    if ignore_index is not None:
        keep = references != ignore_index
        references = references[keep]
        predictions = predictions[keep]
    bad_reference = (references < 0) | (references >= num_labels)
    bad_prediction = (predictions < 0) | (predictions >= num_labels)
    if bool((bad_reference | bad_prediction).any()):  # one device sync per call
        if bool(bad_reference.any()):
            value = int(references[bad_reference][0])
            raise ValueError(
                f"reference label {value} is outside [0, {num_labels}) and is not ignore_index={ignore_index}; "
                "are the labels reduced exactly once (ADE20K: raw 0 -> 255, raw k -> k - 1)?"
            )
        value = int(predictions[bad_prediction][0])
        raise ValueError(f"predicted class {value} is outside [0, {num_labels}) at a non-ignored pixel")
    counts = torch.bincount(references * num_labels + predictions, minlength=num_labels * num_labels)
    return counts.reshape(num_labels, num_labels)


def load_segmentation_metric(**kwargs: Any):
    """Load this package's `segmentation_iou` evaluate metric from its own folder (offline; no Hub access).

    Args:
        **kwargs: passed to `evaluate.load` (e.g. `keep_in_memory=True`, `experiment_id=...`).

    Returns:
        The `evaluate.EvaluationModule`; call `compute(confusion=[flat_matrix, ...], num_labels=...)`.
    """
    import evaluate

    return evaluate.load(str(SEGMENTATION_METRIC_PATH), **kwargs)


def logits_to_predictions(
    logits: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor | tuple[torch.Tensor, ...] | None
) -> torch.Tensor:
    """Turn segmentation logits into per-pixel class ids at label resolution (for `preprocess_logits_for_metrics`).

    With this as `Trainer(preprocess_logits_for_metrics=...)` the Trainer only ever holds class-id maps, never
    (B, C, H, W) logits.

    Args:
        logits: (B, C, h, w) class scores, or the tuple of model outputs the Trainer passes when the model returns
            several (the first element is taken as the logits).
        labels: the batch's (B, H, W) labels (or a tuple whose first element they are); the logits are upsampled
            bilinearly (`align_corners=False`) to (H, W) before the argmax. If `None` the argmax is taken at the
            logits' own resolution.

    Returns:
        int64 tensor (B, H, W) of predicted class ids, on the logits' device.
    """
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if isinstance(labels, (tuple, list)):
        labels = labels[0]
    if logits.ndim != 4:
        raise ValueError(f"expected logits of shape (B, C, h, w), got {tuple(logits.shape)}")
    if labels is not None and tuple(logits.shape[-2:]) != tuple(labels.shape[-2:]):
        logits = F.interpolate(logits, size=tuple(labels.shape[-2:]), mode="bilinear", align_corners=False)
    return logits.argmax(dim=1)


class SegmentationEvaluator:
    """`compute_metrics` for `Trainer` with `TrainingArguments(batch_eval_metrics=True)`; bounded memory.

    The Trainer calls `evaluator(eval_pred, compute_result=...)` once per evaluation batch, with
    `eval_pred.predictions` the output of `preprocess_logits_for_metrics` (use [`logits_to_predictions`], so
    it is an int (B, H, W) class-id tensor) and `eval_pred.label_ids` the (B, H, W) labels, both torch tensors on
    the evaluation device (gathered across processes). Each call adds the batch's confusion matrix to a running
    total on that device and returns `{}`; the call with `compute_result=True` (last batch) adds its batch too,
    computes the metrics through the `segmentation_iou` evaluate module, resets the total and returns a flat dict
    of floats: `mean_iou`, `mean_accuracy`, `overall_accuracy` and `iou_<class>` per class (the Trainer
    prefixes them with `eval_`).

    Classes whose IoU is NaN (absent from both prediction and reference in the whole evaluation) are LEFT OUT of the
    per-class entries unless `keep_nan=True` (then they are `float("nan")`), so the logs stay valid JSON.

    Args:
        num_labels: number of classes (150 for ADE20K).
        ignore_index: reference value of ignored pixels (255).
        id2label: optional class index -> name; per-class keys are then `iou_<name>` (name stripped of surrounding
            whitespace, e.g. ADE20K's `"bed "` -> `iou_bed`), otherwise `iou_<index>`.
        keep_nan: keep NaN per-class IoUs as `float("nan")` instead of leaving them out.
        pad_index: label value the Trainer pads with when it gathers unequal batches across processes (-100);
            such pixels are ignored like `ignore_index`. `None` disables this.
    """

    def __init__(
        self,
        num_labels: int,
        ignore_index: int = 255,
        id2label: Mapping[int, str] | None = None,
        keep_nan: bool = False,
        pad_index: int | None = TRAINER_PAD_INDEX,
    ) -> None:
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
        if id2label is not None:
            id2label = {int(k): str(v) for k, v in id2label.items()}
            missing = [i for i in range(num_labels) if i not in id2label]
            if missing:
                raise ValueError(f"id2label has no name for class(es) {missing[:10]} (num_labels={num_labels})")
        self.num_labels = num_labels
        self.ignore_index = ignore_index
        self.id2label = id2label
        self.keep_nan = keep_nan
        self.pad_index = pad_index
        self.confusion: torch.Tensor | None = None
        # keep_in_memory: one small row per evaluation, no cache files (no clashes between processes or runs).
        self.metric = load_segmentation_metric(keep_in_memory=True)

    def reset(self) -> None:
        """Forget the batches accumulated so far (done automatically after each `compute_result=True` call)."""
        self.confusion = None

    def update(self, predictions: torch.Tensor | np.ndarray, references: torch.Tensor | np.ndarray) -> None:
        """Add one batch: `predictions` and `references` are same-shape integer class-id maps (e.g. (B, H, W))."""
        references = _as_tensor(references, "references")
        if self.pad_index is not None and self.pad_index != self.ignore_index:
            references = torch.where(references == self.pad_index, self.ignore_index, references)
        batch = confusion_matrix(predictions, references, self.num_labels, self.ignore_index)
        self.confusion = batch if self.confusion is None else self.confusion + batch

    def compute(self) -> dict[str, float]:
        """Metrics of everything added since the last reset, then reset. Raises if nothing was added."""
        if self.confusion is None:
            raise RuntimeError("SegmentationEvaluator.compute() called before any batch was added")
        flat = self.confusion.detach().cpu().numpy().reshape(-1)
        self.reset()
        results = self.metric.compute(confusion=[flat], num_labels=self.num_labels)
        metrics = {
            "mean_iou": float(results["mean_iou"]),
            "mean_accuracy": float(results["mean_accuracy"]),
            "overall_accuracy": float(results["overall_accuracy"]),
        }
        for index, iou in enumerate(results["per_category_iou"]):
            if math.isnan(iou) and not self.keep_nan:
                continue
            name = self.id2label[index].strip() if self.id2label is not None else str(index)
            metrics[f"iou_{name}"] = float(iou)
        return metrics

    def __call__(self, eval_pred: Any, compute_result: bool = True) -> dict[str, float]:
        """One evaluation batch from the Trainer.

        Args:
            eval_pred: `transformers.EvalPrediction` whose `predictions` are int class-id maps (B, H, W) and
                `label_ids` the (B, H, W) labels (tensors, possibly on GPU; numpy arrays also work).
            compute_result: `True` on the last batch: return the metrics of the whole evaluation and reset. With
                `batch_eval_metrics=True` the Trainer always passes it; it defaults to `True` so that a Trainer
                without `batch_eval_metrics` (one call with all predictions concatenated, as numpy arrays) still
                gets its metrics instead of `{}` -- correct, but then the Trainer keeps all predictions in memory.

        Returns:
            `{}` for intermediate batches; the metric dict when `compute_result` is `True`.
        """
        predictions, references = eval_pred.predictions, eval_pred.label_ids
        if isinstance(predictions, (tuple, list)) and len(predictions) == 1:
            predictions = predictions[0]
        self.update(predictions, references)
        if not compute_result:
            return {}
        return self.compute()
