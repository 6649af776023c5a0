"""Segmentation metrics: confusion matrix, the local ``segmentation_iou`` evaluate metric, the Trainer evaluator,
and the ADE20K class list. Offline and CPU-only."""

import math
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.utils import ModelOutput

from hf_dbp.tasks.segmentation.ade20k import ADE20K_CLASSES, ade20k_id2label, ade20k_label2id
from hf_dbp.tasks.segmentation.metrics import (
    SEGMENTATION_METRIC_PATH,
    SegmentationEvaluator,
    confusion_matrix,
    load_segmentation_metric,
    logits_to_predictions,
)

# ---------------------------------------------------------------------------------------------------------------
# A hand-made example: 5 classes, two 2x3 "images", 255 = ignored.
#   class 3 is predicted once but never in the reference  -> IoU 0 (counts in mean_iou), accuracy NaN
#   class 4 occurs in neither                            -> IoU NaN and accuracy NaN (left out of both means)
# ---------------------------------------------------------------------------------------------------------------
REFERENCES = torch.tensor(
    [
        [[0, 0, 1], [1, 255, 2]],
        [[2, 2, 0], [255, 1, 0]],
    ]
)
PREDICTIONS = torch.tensor(
    [
        [[0, 1, 1], [1, 2, 2]],  # the 2 under the ignored pixel must not count
        [[2, 3, 0], [0, 1, 0]],  # the 0 under the ignored pixel must not count
    ]
)
NUM_LABELS = 5
# Counted by hand, pixel by pixel (rows = reference, columns = prediction):
#   ref 0: (0,0)->0, (0,1)->1 | img2 (0,2)->0, (1,2)->0         = 3 x pred 0, 1 x pred 1
#   ref 1: (0,2)->1, (1,0)->1 | img2 (1,1)->1                    = 3 x pred 1
#   ref 2: (1,2)->2 | img2 (0,0)->2, (0,1)->3                    = 2 x pred 2, 1 x pred 3
EXPECTED_CONFUSION = [
    [3, 1, 0, 0, 0],
    [0, 3, 0, 0, 0],
    [0, 0, 2, 1, 0],
    [0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0],
]
# intersection = [3, 3, 2, 0, 0]; reference area = [4, 3, 3, 0, 0]; predicted area = [3, 4, 2, 1, 0]
# union = ref + pred - inter = [4, 4, 3, 1, 0]
EXPECTED_IOU = [3 / 4, 3 / 4, 2 / 3, 0.0, math.nan]
EXPECTED_ACCURACY = [3 / 4, 3 / 3, 2 / 3, math.nan, math.nan]
EXPECTED_MEAN_IOU = (3 / 4 + 3 / 4 + 2 / 3 + 0.0) / 4  # = 13/24
EXPECTED_MEAN_ACCURACY = (3 / 4 + 1 + 2 / 3) / 3  # = 29/36
EXPECTED_OVERALL_ACCURACY = 8 / 10  # 8 correct of 10 labelled pixels


def assert_list_close(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        if math.isnan(e):
            assert math.isnan(a), (actual, expected)
        else:
            assert a == pytest.approx(e), (actual, expected)


def check_hand_example(results):
    assert results["mean_iou"] == pytest.approx(EXPECTED_MEAN_IOU)
    assert results["mean_iou"] == pytest.approx(13 / 24)
    assert results["mean_accuracy"] == pytest.approx(EXPECTED_MEAN_ACCURACY)
    assert results["mean_accuracy"] == pytest.approx(29 / 36)
    assert results["overall_accuracy"] == pytest.approx(EXPECTED_OVERALL_ACCURACY)
    assert_list_close(results["per_category_iou"], EXPECTED_IOU)
    assert_list_close(results["per_category_accuracy"], EXPECTED_ACCURACY)


@pytest.fixture(scope="module")
def metric():
    return load_segmentation_metric(keep_in_memory=True)


# --- confusion matrix ------------------------------------------------------------------------------------------


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(PREDICTIONS, REFERENCES, NUM_LABELS, ignore_index=255)
    assert cm.dtype == torch.int64
    assert cm.shape == (NUM_LABELS, NUM_LABELS)
    assert cm.tolist() == EXPECTED_CONFUSION
    # numpy inputs and other integer dtypes, any shape (here flattened)
    cm_np = confusion_matrix(PREDICTIONS.numpy().astype(np.uint8).ravel(), REFERENCES.numpy().ravel(), NUM_LABELS)
    assert cm_np.tolist() == EXPECTED_CONFUSION


def test_confusion_matrix_rejects_bad_labels():
    refs = REFERENCES.clone()
    refs[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"reference label 7 is outside \[0, 5\)"):
        confusion_matrix(PREDICTIONS, refs, NUM_LABELS)
    refs[0, 0, 0] = -1
    with pytest.raises(ValueError, match="reference label -1"):
        confusion_matrix(PREDICTIONS, refs, NUM_LABELS)
    # ADE20K: 150 classes are 0..149, so an unreduced label 150 is an error, 255 is fine.
    with pytest.raises(ValueError, match="reference label 150"):
        confusion_matrix(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 255], [150, 3]]]), 150)
    assert confusion_matrix(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[255, 149]]), 150).sum() == 1
    preds = PREDICTIONS.clone()
    preds[0, 0, 0] = 9
    with pytest.raises(ValueError, match="predicted class 9"):
        confusion_matrix(preds, REFERENCES, NUM_LABELS)
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(PREDICTIONS[:1], REFERENCES, NUM_LABELS)
    with pytest.raises(TypeError, match="integer class ids"):
        confusion_matrix(torch.randn(2, 5, 2, 3), REFERENCES, NUM_LABELS)


# --- the evaluate metric ----------------------------------------------------------------------------------------


def test_metric_by_hand(metric):
    flat = [c for row in EXPECTED_CONFUSION for c in row]
    check_hand_example(metric.compute(confusion=[flat], num_labels=NUM_LABELS))


def test_metric_nan_to_num(metric):
    flat = [c for row in EXPECTED_CONFUSION for c in row]
    results = metric.compute(confusion=[flat], num_labels=NUM_LABELS, nan_to_num=0.0)
    assert results["per_category_iou"] == pytest.approx([3 / 4, 3 / 4, 2 / 3, 0.0, 0.0])
    assert results["mean_iou"] == pytest.approx(13 / 24)  # the mean is still taken over non-NaN classes


def test_metric_batching_equals_single(metric):
    # one add per image (the two images' matrices sum to the hand-counted one) ...
    for preds, refs in zip(PREDICTIONS, REFERENCES, strict=True):
        metric.add(confusion=confusion_matrix(preds, refs, NUM_LABELS).reshape(-1).numpy())
    check_hand_example(metric.compute(num_labels=NUM_LABELS))
    # ... or add_batch with several rows, or rows handed to compute directly
    rows = [
        confusion_matrix(p, r, NUM_LABELS).reshape(-1).tolist() for p, r in zip(PREDICTIONS, REFERENCES, strict=True)
    ]
    metric.add_batch(confusion=rows[:1])
    metric.add_batch(confusion=rows[1:])
    check_hand_example(metric.compute(num_labels=NUM_LABELS))
    check_hand_example(metric.compute(confusion=rows, num_labels=NUM_LABELS))


def test_metric_rejects_wrong_size(metric):
    with pytest.raises(ValueError, match="num_labels \\*\\* 2 = 25"):
        metric.compute(confusion=[[1, 2, 3, 4]], num_labels=NUM_LABELS)


def test_metric_loads_offline_by_path():
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1")
    code = (
        "import evaluate, sys\n"
        f"m = evaluate.load({str(SEGMENTATION_METRIC_PATH)!r})\n"
        "r = m.compute(confusion=[[3, 1, 0, 2]], num_labels=2)\n"
        "assert abs(r['mean_iou'] - (3 / 4 + 2 / 3) / 2) < 1e-12, r\n"
        "assert 'confusion matri' in m.description and 'MMSegmentation' in m.citation\n"
        "print('ok', m.name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok segmentation_iou" in out.stdout


# --- the Trainer-side evaluator --------------------------------------------------------------------------------


@dataclass
class _EvalPred:
    predictions: torch.Tensor
    label_ids: torch.Tensor


def test_evaluator_batches_equal_single():
    id2label = {i: f"c{i}" for i in range(NUM_LABELS)}
    single = SegmentationEvaluator(NUM_LABELS, id2label=id2label)
    one = single(_EvalPred(PREDICTIONS, REFERENCES), compute_result=True)
    batched = SegmentationEvaluator(NUM_LABELS, id2label=id2label)
    assert batched(_EvalPred(PREDICTIONS[:1], REFERENCES[:1]), compute_result=False) == {}
    many = batched(_EvalPred(PREDICTIONS[1:], REFERENCES[1:]), compute_result=True)
    assert one == many
    assert one["mean_iou"] == pytest.approx(13 / 24)
    assert one["mean_accuracy"] == pytest.approx(29 / 36)
    assert one["overall_accuracy"] == pytest.approx(0.8)
    # class 4 (absent from both) is left out; class 3 (only predicted) is there with IoU 0
    assert set(one) == {"mean_iou", "mean_accuracy", "overall_accuracy", "iou_c0", "iou_c1", "iou_c2", "iou_c3"}
    assert one["iou_c2"] == pytest.approx(2 / 3) and one["iou_c3"] == 0.0
    assert all(isinstance(v, float) for v in one.values())
    # after compute_result=True it has reset: the same batch alone gives the single-batch result again
    again = batched(_EvalPred(PREDICTIONS, REFERENCES), compute_result=True)
    assert again == one
    # without compute_result (a Trainer without batch_eval_metrics: one call, numpy arrays) it computes at once
    assert batched(_EvalPred(PREDICTIONS.numpy(), REFERENCES.numpy())) == one
    # keep_nan and index keys; Trainer's -100 padding counts as ignored
    keep = SegmentationEvaluator(NUM_LABELS, keep_nan=True)
    refs = torch.cat([REFERENCES, torch.full((2, 2, 1), -100)], dim=2)
    preds = torch.cat([PREDICTIONS, torch.zeros(2, 2, 1, dtype=torch.long)], dim=2)
    kept = keep(_EvalPred(preds, refs), compute_result=True)
    assert math.isnan(kept["iou_4"]) and kept["iou_0"] == pytest.approx(3 / 4)
    assert kept["mean_iou"] == pytest.approx(13 / 24)


def test_logits_to_predictions():
    logits = torch.zeros(2, 3, 2, 2)
    logits[:, 1] = 1.0  # class 1 everywhere ...
    logits[0, 2, 0, 0] = 5.0  # ... except the top-left quarter of image 0
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    preds = logits_to_predictions(logits, labels)
    assert preds.dtype == torch.int64 and preds.shape == (2, 4, 4)
    assert preds[0, 0, 0] == 2 and preds[0, 3, 3] == 1 and (preds[1] == 1).all()
    assert logits_to_predictions((logits,), None).shape == (2, 2, 2)


def test_ade20k_classes():
    id2label = ade20k_id2label()
    assert len(ADE20K_CLASSES) == 150 and len(id2label) == 150 and len(set(ADE20K_CLASSES)) == 150
    assert list(id2label) == list(range(150))
    assert id2label[0] == "wall" and id2label[1] == "building" and id2label[2] == "sky"
    assert id2label[3] == "floor" and id2label[4] == "tree" and id2label[149] == "flag"
    assert id2label[8] == "windowpane" and id2label[44] == "chest of drawers" and id2label[12] == "person"
    label2id = ade20k_label2id()
    assert all(label2id[name] == index for index, name in id2label.items())


# --- end to end under a real Trainer.evaluate() -----------------------------------------------------------------


class TinySegmenter(nn.Module):
    """1x1 conv at half resolution: logits (B, C, H/2, W/2), loss on logits upsampled to the labels."""

    def __init__(self, num_labels: int):
        super().__init__()
        self.pool = nn.AvgPool2d(2)
        self.classifier = nn.Conv2d(3, num_labels, kernel_size=1)

    def forward(self, pixel_values, labels=None):
        logits = self.classifier(self.pool(pixel_values))
        loss = None
        if labels is not None:
            upsampled = nn.functional.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
            loss = nn.functional.cross_entropy(upsampled, labels, ignore_index=255)
        return ModelOutput(loss=loss, logits=logits)


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _reference_metrics(preds: np.ndarray, refs: np.ndarray, num_labels: int, ignore_index: int = 255) -> dict:
    """Independent check in the style of the Hub mean_iou: histograms of all pixels at once, no confusion matrix."""
    keep = refs != ignore_index
    p, r = preds[keep], refs[keep]
    area_inter = np.bincount(p[p == r], minlength=num_labels).astype(float)
    area_pred = np.bincount(p, minlength=num_labels).astype(float)
    area_ref = np.bincount(r, minlength=num_labels).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = area_inter / (area_pred + area_ref - area_inter)
        acc = area_inter / area_ref
    return {
        "mean_iou": np.nanmean(iou),
        "mean_accuracy": np.nanmean(acc),
        "overall_accuracy": area_inter.sum() / area_ref.sum(),
        "iou": iou,
    }


def test_trainer_evaluate_batch_eval_metrics(tmp_path):
    num_labels, size = 6, 8
    torch.manual_seed(0)
    model = TinySegmenter(num_labels)
    items = []
    for _ in range(5):  # 5 examples, batch size 2: three batches, the last one short
        labels = torch.randint(0, num_labels - 1, (size, size))  # class 5 never in the reference
        labels[torch.rand(size, size) < 0.2] = 255
        items.append({"pixel_values": torch.randn(3, size, size), "labels": labels})
    dataset = _ListDataset(items)

    evaluator = SegmentationEvaluator(num_labels, id2label={i: f"class {i}" for i in range(num_labels)})
    calls = []

    def compute_metrics(eval_pred, compute_result: bool):
        calls.append((type(eval_pred.predictions), eval_pred.predictions.dtype, tuple(eval_pred.predictions.shape)))
        return evaluator(eval_pred, compute_result=compute_result)

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_eval_batch_size=2,
        batch_eval_metrics=True,
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        eval_dataset=dataset,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=logits_to_predictions,
    )
    metrics = trainer.evaluate()
    # once per batch, with int64 (B, H, W) tensors (never logits)
    assert calls == [(torch.Tensor, torch.int64, (2, size, size))] * 2 + [(torch.Tensor, torch.int64, (1, size, size))]

    with torch.no_grad():
        pixel_values = torch.stack([item["pixel_values"] for item in items])
        labels = torch.stack([item["labels"] for item in items])
        preds = logits_to_predictions(model(pixel_values).logits, labels)
    expected = _reference_metrics(preds.numpy(), labels.numpy(), num_labels)
    assert metrics["eval_mean_iou"] == pytest.approx(expected["mean_iou"])
    assert metrics["eval_mean_accuracy"] == pytest.approx(expected["mean_accuracy"])
    assert metrics["eval_overall_accuracy"] == pytest.approx(expected["overall_accuracy"])
    for index, iou in enumerate(expected["iou"]):
        key = f"eval_iou_class {index}"
        if np.isnan(iou):
            assert key not in metrics
        else:
            assert metrics[key] == pytest.approx(iou)
    assert "eval_loss" in metrics

    # a second evaluation starts from scratch (the evaluator reset itself after the last batch)
    assert trainer.evaluate()["eval_mean_iou"] == pytest.approx(metrics["eval_mean_iou"])

    # the same evaluator also works (unbounded memory, same numbers) in a Trainer without batch_eval_metrics
    args_all_at_once = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to="none", use_cpu=True
    )
    trainer_all_at_once = Trainer(
        model=model,
        args=args_all_at_once,
        eval_dataset=dataset,
        compute_metrics=evaluator,
        preprocess_logits_for_metrics=logits_to_predictions,
    )
    assert trainer_all_at_once.evaluate()["eval_mean_iou"] == pytest.approx(metrics["eval_mean_iou"])


def test_the_predictions_legend_names_the_ignored_black_label(tmp_path):
    import numpy as np

    from hf_dbp.tasks.segmentation.plotting import (
        IGNORED_LABEL_NAME,
        _label_colors,
        legend_entries,
        plot_segmentation_examples,
    )

    labels = np.array([[[0, 1], [255, 255]]])
    predictions = np.array([[[0, 2], [1, 1]]])
    id2label = {0: "wall", 1: "floor", 2: "tree"}
    entries = legend_entries(labels, predictions, id2label, _label_colors(3), 3)
    assert [name for name, _ in entries] == ["wall", "floor", "tree", IGNORED_LABEL_NAME]
    assert entries[-1][1] == (0.0, 0.0, 0.0)
    assert IGNORED_LABEL_NAME not in [
        n for n, _ in legend_entries(predictions, predictions, id2label, _label_colors(3), 3)
    ]
    path = plot_segmentation_examples(
        np.zeros((1, 3, 2, 2), dtype=np.float32),
        labels,
        predictions,
        str(tmp_path / "p.png"),
        num_labels=3,
        id2label=id2label,
    )
    assert (tmp_path / "p.png").stat().st_size > 1000 and path
