"""The model-independent core of DBP.

- `decorrelation`: the matrices R, their update rule, and the decorrelated twins of `nn.Linear`, `nn.Conv2d` and
  transformers' `Conv1D` (inject, fold); nothing here knows a model architecture.
- `config`: `DecorrelationConfig`, the settings and the plan a decorrelated model carries in its config.
- `plan`: which layers of a model to decorrelate and which of them share one R (one traced forward).
- `model`: `decorrelate`, `decorrelation_step`, `load_decorrelated`, `merge_decorrelation` on any transformers model.
"""
