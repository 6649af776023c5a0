"""The tasks of the example scripts: their data and metrics.

- `image_data`: image folders and the embedded image sets of MAE pre-training (`examples/run_mae_dbp.py`).
- `text_data`: the embedded text sets of causal language modelling (`examples/run_clm_dbp.py`).
- `segmentation`: ADE20K-style semantic segmentation data and mIoU (`examples/run_segmentation.py`).
- `scripts`: argument parsing and logging shared by the example scripts.
"""
