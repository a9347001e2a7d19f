"""Probe: how much faster is int8 dynamic quantization than float32 for a bart-base-sized forward on this CPU?

The question behind it (BENCHMARKS.md, rephrase): could a TMaRCo engine reach 10x on CPU at bart-base size with less
arithmetic per masked variant? A bart-base-sized BART (random weights) runs its encoder and decoder on 64 variants x 40
tokens, in float32 and with every Linear quantized to int8 (``torch.ao.quantization.quantize_dynamic``); four
alternating timed runs each after a warm-up, medians; and the largest hidden-state difference.

Run: ``.venv/bin/python benchmarks/int8_probe.py`` (about a minute).
"""

from __future__ import annotations

import statistics
import time


def main() -> None:
    """Print both timings, the speedup and the largest difference of the hidden states."""
    import torch
    from rephrase import BART_BASE_SHAPE  # benchmarks/rephrase.py, beside this file
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(vocab_size=50265, **BART_BASE_SHAPE)
    fp32 = BartForConditionalGeneration(config).eval()
    int8 = torch.ao.quantization.quantize_dynamic(fp32, {torch.nn.Linear}, dtype=torch.qint8)
    ids = torch.randint(5, 50000, (64, 40))

    def forward(model):
        with torch.inference_mode():  # encoder over the variants, decoder up to position 20, no LM head
            return model.model(input_ids=ids, decoder_input_ids=ids[:, :20]).last_hidden_state

    for model in (fp32, int8):
        forward(model)
    runs: dict[str, list[float]] = {"fp32": [], "int8": []}
    for _ in range(4):
        for name, model in (("fp32", fp32), ("int8", int8)):
            start = time.perf_counter()
            forward(model)
            runs[name].append(time.perf_counter() - start)
    exact, approx = forward(fp32), forward(int8)
    print({name: [round(t, 3) for t in times] for name, times in runs.items()})
    print(f"int8 speedup: {statistics.median(runs['fp32']) / statistics.median(runs['int8']):.2f}x")
    print(
        f"largest hidden-state difference {float((exact - approx).abs().max()):.3f} on values up to "
        f"{float(exact.abs().max()):.2f}"
    )


if __name__ == "__main__":
    main()
