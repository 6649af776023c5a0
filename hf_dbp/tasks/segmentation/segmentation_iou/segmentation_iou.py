# Copyright 2025 The hf-dbp authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Segmentation IoU: mean IoU / accuracy for semantic segmentation, computed from summed confusion matrices.

This is an `evaluate` metric script. `evaluate.load("<path>/segmentation_iou")` loads it from this local folder
(no network); it depends only on `datasets`, `evaluate` and `numpy`.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Mean Intersection-over-Union (mIoU), mean per-class accuracy and overall pixel accuracy for semantic segmentation,
computed from CONFUSION MATRICES instead of stored segmentation maps, so that the memory an evaluation needs does not
grow with the evaluation set: each added row is one flattened (num_labels x num_labels) confusion matrix (for example
of one batch or of a whole evaluation run), and the rows are summed before the metrics are computed.

The definitions are those of the Hub metric `evaluate-metric/mean_iou` (after MMSegmentation): with C the summed
confusion matrix (rows = reference class, columns = predicted class, ignored pixels not counted),
intersection = diag(C), reference area = row sums, predicted area = column sums,
union = reference area + predicted area - intersection;
IoU per class = intersection / union (NaN where the class is absent from both prediction and reference);
accuracy per class = intersection / reference area (NaN where the class is absent from the reference);
mean_iou and mean_accuracy are the NaN-ignoring means over classes; overall_accuracy = sum(intersection) / sum(C).
A class that is predicted but never in the reference has IoU 0 (it counts in mean_iou) and accuracy NaN (it does not
count in mean_accuracy).

Unlike `mean_iou`, this metric never reduces labels and knows nothing of an ignore index: build the confusion matrices
from already-reduced labels and skip ignored pixels when you build them (see `hf_dbp.tasks.segmentation.metrics`).
"""

_KWARGS_DESCRIPTION = """
Args:
    confusion (`List[List[int]]`):
        One flattened confusion matrix per row, each of length num_labels * num_labels, in row-major order:
        entry [r * num_labels + p] counts the pixels whose reference class is r and whose predicted class is p.
        Pixels to be ignored (e.g. label 255) must not be counted. All counts must be non-negative.
    num_labels (`int`):
        Number of classes (categories); each row must have num_labels ** 2 entries.
    nan_to_num (`float`, *optional*):
        If given, NaN values in the results (classes absent from prediction and reference) are replaced by it.

Returns:
    `Dict[str, float | List[float]]`:
    - *mean_iou* (`float`): mean IoU over the classes whose union is non-empty.
    - *mean_accuracy* (`float`): mean per-class accuracy over the classes present in the reference.
    - *overall_accuracy* (`float`): correctly classified pixels / all counted (non-ignored) pixels.
    - *per_category_iou* (`List[float]`, length num_labels): IoU per class, NaN where the union is empty.
    - *per_category_accuracy* (`List[float]`, length num_labels): accuracy per class, NaN where the reference area
      is empty.

Examples:

    >>> metric = evaluate.load("hf_dbp/tasks/segmentation/segmentation_iou")
    >>> # 3 classes; class 2 never occurs: rows = reference, columns = prediction
    >>> confusion = [[3, 1, 0],
    ...              [0, 2, 0],
    ...              [0, 0, 0]]
    >>> results = metric.compute(confusion=[sum(confusion, [])], num_labels=3)
    >>> print(results["mean_iou"], results["overall_accuracy"])  # (3/4 + 2/3) / 2, 5/6
    0.7083333333333333 0.8333333333333334
    >>> results["per_category_iou"]
    [0.75, 0.6666666666666666, nan]
"""

_CITATION = """\
@software{MMSegmentation_Contributors_OpenMMLab_Semantic_Segmentation_2020,
author = {{MMSegmentation Contributors}},
license = {Apache-2.0},
month = {7},
title = {{OpenMMLab Semantic Segmentation Toolbox and Benchmark}},
url = {https://github.com/open-mmlab/mmsegmentation},
year = {2020}
}"""


def metrics_from_confusion(confusion: np.ndarray, nan_to_num: float | None = None) -> dict:
    """Mean IoU, mean accuracy, overall accuracy and per-class IoU/accuracy of one (summed) confusion matrix.

    Args:
        confusion: square array (num_labels, num_labels) of pixel counts; rows = reference class, columns = predicted.
        nan_to_num: if given, replaces NaN results (classes absent from both / from the reference) by this value.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    intersection = np.diag(confusion)
    area_reference = confusion.sum(axis=1)
    area_prediction = confusion.sum(axis=0)
    union = area_reference + area_prediction - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersection / union
        accuracy = intersection / area_reference
        total = confusion.sum()
        overall_accuracy = intersection.sum() / total if total > 0 else float("nan")
    # np.nanmean of an all-NaN vector warns and returns NaN; keep the NaN without the warning.
    mean_iou = float(np.nanmean(iou)) if not np.all(np.isnan(iou)) else float("nan")
    mean_accuracy = float(np.nanmean(accuracy)) if not np.all(np.isnan(accuracy)) else float("nan")
    if nan_to_num is not None:
        iou = np.nan_to_num(iou, nan=nan_to_num)
        accuracy = np.nan_to_num(accuracy, nan=nan_to_num)
        mean_iou, mean_accuracy, overall_accuracy = (
            float(np.nan_to_num(value, nan=nan_to_num)) for value in (mean_iou, mean_accuracy, overall_accuracy)
        )
    return {
        "mean_iou": mean_iou,
        "mean_accuracy": mean_accuracy,
        "overall_accuracy": float(overall_accuracy),
        "per_category_iou": iou.tolist(),
        "per_category_accuracy": accuracy.tolist(),
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SegmentationIou(evaluate.Metric):
    """Mean IoU for semantic segmentation from summed confusion matrices (bounded memory)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"confusion": datasets.Sequence(datasets.Value("int64"))}),
            reference_urls=[
                "https://huggingface.co/spaces/evaluate-metric/mean_iou",
                "https://github.com/open-mmlab/mmsegmentation/blob/71c201b1813267d78764f306a297ca717827c4bf/mmseg/core/evaluation/metrics.py",
            ],
        )

    def _compute(self, confusion: list, num_labels: int, nan_to_num: float | None = None) -> dict:
        if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
        num_labels = int(num_labels)
        size = num_labels * num_labels
        total = np.zeros(size, dtype=np.int64)
        for index, row in enumerate(confusion):
            row = np.asarray(row, dtype=np.int64)
            if row.shape != (size,):
                raise ValueError(
                    f"confusion row {index} has {row.size} entries; expected num_labels ** 2 = {size} "
                    f"(num_labels={num_labels})"
                )
            if (row < 0).any():
                raise ValueError(f"confusion row {index} has a negative count ({int(row.min())})")
            total += row
        return metrics_from_confusion(total.reshape(num_labels, num_labels), nan_to_num=nan_to_num)
