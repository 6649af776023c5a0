"""The model-independent core of DBP: nothing here names an architecture (their defaults are data, in
`hf_dbp.target_modules`).

- `config`: `DecorrelationConfig`, the settings and the plan of a decorrelated model.
- `sampling`: the generator that draws the rows of R's statistics.
- `decorrelation`: one R (`Decorrelation`), its statistics and its update rule.
- `layers`: the decorrelated twins of `nn.Linear`, a patchifying `nn.Conv2d` and transformers' `Conv1D`, and their
  folded weights.
- `inject`: putting R into a model, measuring a plain one, folding R out, keeping R out of optimizers.
- `collectives`, `step`: the decorrelation step over many R, with the statistics of all processes combined.
- `plan`: which layers to decorrelate and which share one R (one traced forward).
- `model`: `decorrelate`, `decorrelation_step`, `load_decorrelated`, `merge_decorrelation` for any model.
- `optimizer_hook`: the step after every real `optimizer.step()`, in any training loop.
- `engines`: R kept whole under FSDP and DeepSpeed ZeRO.
"""
