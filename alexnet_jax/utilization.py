"""How much of the accelerator a step uses: its FLOPs (XLA's cost analysis) against the chip's peak (MFU).

Shared by the trainer (the `mfu` of each train row, where the peak is known) and the benchmarks.
"""


# Dense (no sparsity) bfloat16 peak of one chip, TFLOP/s, from the vendors' spec sheets: NVIDIA H100/H200
# datasheets (SXM 989, PCIe 756), NVIDIA A100 datasheet (312), Google Cloud TPU system architecture pages
# (v4 275, v5e 197, v5p 459, v6e 918). First matching substring of jax's device_kind wins, so the more specific
# names come first. MFU is always against this bf16 peak: an fp32 step reads as the fraction of what the chip
# could do in bf16.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("A100", 312.0),
    ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v5", 459.0),
    ("TPU v6 lite", 918.0), ("TPU v6e", 918.0),
)


def peak_tflops(device_kind: str) -> float | None:
    for name, tflops in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return tflops
    return None


def step_flops(compiled) -> float | None:
    """FLOPs of one step of the compiled program on one device (XLA's cost analysis of the partitioned program);
    None where the backend gives none."""
    try:
        analysis = compiled.cost_analysis()
    except NotImplementedError:
        return None
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0] if analysis else None
    flops = float((analysis or {}).get("flops", 0.0))
    return flops if flops > 0 else None


def mfu(flops: float | None, seconds_per_step: float, device_kind: str) -> float | str:
    """Model FLOP utilisation of one device: its share of the step's FLOPs per second over its peak."""
    peak = peak_tflops(device_kind)
    if flops is None or peak is None:
        return "unknown"
    return round(flops / seconds_per_step / (peak * 1e12), 4)
