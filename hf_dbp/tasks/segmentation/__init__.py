"""Semantic segmentation: ADE20K-layout data (`data`, `ade20k`) and the mIoU metric (`metrics`, `segmentation_iou`)."""
