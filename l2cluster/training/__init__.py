"""The training core: trains one stack of jobs (K ≥ 1 models as one) on MNIST tensors, in any process.

Plain PyTorch, never Ray: the same code runs in `l2cluster train`, in a gang's rank and in a plugin author's
tests. `data` loads and splits MNIST, `model` is the stacked MLP, `trainer` the loop and the step, with the plugin
calls in `hooks`, non-finite blame in `nonfinite`, CUDA graphs in `graphs` and skipped steps in `skipping`;
`runner` trains one pack with checkpoints (`checkpoint`) and per-member results; `process` sets a training
process up at its start.
"""
