"""The `segmentation_iou` evaluate metric; `evaluate.load` reads `segmentation_iou.py` from this folder.

This file only makes the folder a package, so that wheels (`packages = find:`) ship the script.
"""
