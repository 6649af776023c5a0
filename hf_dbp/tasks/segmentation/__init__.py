"""Semantic segmentation: ADE20K-layout data (`data`, `ade20k`), the mIoU metric (`metrics`, `segmentation_iou`) and
the figure of predictions (`plotting`)."""
