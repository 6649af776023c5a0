"""Semantic segmentation on ADE20K with UperNet (`examples/run_segmentation.py`).

- `ade20k`: the 150 classes and loading an extracted ADEChallengeData2016 folder.
- `checks`: checks of image/annotation pairs before training (bad pairs are skipped with the file named).
- `transforms`: the mmsegmentation augmentation recipe, the evaluation transform and the padding collate.
- `demo`: a small ADE20K-layout set built offline from scikit-image's photographs.
- `image_processing`: the evaluation transform as an image processor saved with every checkpoint.
- `evaluation`, `metrics`, `segmentation_iou`: predictions at the annotations' size and the mIoU metric.
- `plotting`: the figure of validation images with their true and predicted masks.
"""
