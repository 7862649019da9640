"""Choose a backend and quant type per component before any weight is read.

`QDS_QUANT_BACKEND=auto` and `qdserve plan` use this. Inputs: the model's component configs
(parameter counts come from instantiating each class on the `meta` device, so nothing is
allocated or read), the device (CPU, or CUDA with its capability and memory; real or
described), the backend registry (what the installed libraries can run there) and the measured
tables in `tables.py`. Output: one choice per denoiser / text encoder such that the weights
plus the measured activation peak at the default size fit the memory budget, ranked by
`QDS_PRIORITY` (quality, speed or memory), with the reason for every choice and for every
alternative left out. The rules are written out in docs/planning.md.

The modules, lowest first (each imports only those above it):

- `errors`: `PlanError`, the one error a plan fails with.
- `units`: sizes: `parse_bytes` (the size grammar of every `QDS_*` size setting) and `human`.
- `tables`: the measured numbers, each with its source.
- `model_spec`: a model folder without its weights: component classes and parameter counts.
- `devices`: the device (this machine or a described one) and the memory budget on it.
- `options`: every way to hold one component, with its measured size, quality and speed.
- `search`: the plan: the best combination of options that fits, and why each was chosen.
- `render`: a plan as text, as JSON, as a one-line summary, and the short card.
- `entry`: from settings and the command line: `qdserve plan`, the loader's auto step.

Import each name from the module that defines it; this package re-exports nothing.
"""
