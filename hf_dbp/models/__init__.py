"""Model integrations: what DBP needs to know about particular models, beyond the defaults of
`hf_dbp.target_modules`.

- `vit_mae_dbp`: the paper's model, a ViTMAE whose encoder is decorrelated, with Auto-class registrations, remote
  code and a UperNet backbone; its config carries a `DecorrelationConfig` like every other decorrelated model's.
- `card_profiles`: what a model card says about each kind of model.
"""
