"""Benchmarks, `python -m alexnet_jax.bench {step,loop,pipeline,e2e,layers}` (its --help describes them): step.py
(step, loop, e2e), pipeline.py (the host input pipeline), layers.py (per-operation times), common.py (machine and
device reports; MFU comes from alexnet_jax/utilization.py), torch_reference.py (the PyTorch step, `python -m alexnet_jax.bench.torch_reference`) and
table.py (launch/gpu_bench.sh's table, `python -m alexnet_jax.bench.table`)."""

# The MFU helpers stay where callers of the single-module bench found them (alexnet_jax.bench.mfu).
from alexnet_jax.utilization import PEAK_TFLOPS, mfu, peak_tflops, step_flops  # noqa: F401
