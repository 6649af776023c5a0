"""Model integrations: what DBP needs to know about particular architectures.

- `mapping`: the default target and excluded layers per transformers `model_type` (PEFT's target-module mappings).
- `vit_mae_dbp`: the paper's model, a ViTMAE whose encoder is decorrelated, with its own config fields, Auto-class
  registrations, remote code and a UperNet backbone; built on the core like every other family.
"""
