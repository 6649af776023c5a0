"""ViTMAE-DBP: the model of "Decorrelation Speeds Up Vision Transformers" (configuration, models, UperNet backbone).

The configuration and modeling files are also what a saved checkpoint carries as remote code (see `remote_code`).
"""
