"""Full fine-tuning vs LoRA vs QLoRA on an opt-350m-shaped model: peak memory and samples/s, side by side.

The model has facebook/opt-350m's configuration (written out below: the hub is unreachable here) and random weights,
saved once in float16 like the published checkpoint. Each method runs in a fresh subprocess so that peaks do not mix;
all see the same batch (fixed token ids) and run the same number of optimizer steps (AdamW). LoRA and QLoRA use the
project's own mappers (``detox_sft.training.get_peft_config`` / ``get_quantization_config``) with the tutorial
recipe's LoRA settings (r=16 on q/k/v/out_proj, fc1, fc2).

Memory: on CUDA ``torch.cuda.max_memory_allocated`` after the model is loaded and the peak statistics reset (weights,
gradients, optimizer state and activations of the steps); on CPU the peak RSS of the process during the steps (the
high-water mark is reset after loading, so the load's transient copies do not count; the model stays resident and
counts). The RSS after imports (torch, transformers, ...) is reported too: it is in every CPU figure.

Usage::

    .venv/bin/python benchmarks/training.py [--steps 3] [--batch-size 4] [--seq-len 64] [--device auto]

Writes ``benchmarks/results/training.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import provenance

from detox_sft_dev.zoo.rehearsal import OPT_350M  # facebook/opt-350m's exact configuration (one owner)

METHODS = ("full", "lora", "qlora")
RESULTS = Path(__file__).resolve().parent / "results" / "training.json"


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def build_model(path: Path) -> None:
    """Save an opt-350m-shaped OPT with random weights (float16, like the published checkpoint)."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(**OPT_350M)).to(torch.float16)
    model.save_pretrained(path)


def worker(method: str, model_path: str, steps: int, batch_size: int, seq_len: int, device: str) -> dict:
    """Load the model for ``method``, run ``steps`` + 1 warm-up optimizer steps on a fixed batch, measure."""
    import torch
    from transformers import AutoModelForCausalLM

    from detox_sft.compat import keep_bnb_4bit_trainable_on_cpu
    from detox_sft.config import load_recipe
    from detox_sft.training import get_peft_config, get_quantization_config

    rss_imports = _rss()
    cfg = load_recipe("tutorial").training  # the tutorial's LoRA settings (r=16, six OPT modules)
    gpu = device == "cuda"
    half = torch.bfloat16 if gpu and torch.cuda.is_bf16_supported() else torch.float16
    if method == "full":
        # full fine-tuning keeps fp32 master weights (Trainer's bf16=True is autocast over fp32 weights)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    elif method == "lora":
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=half if gpu else torch.float32).to(device)
    else:
        cfg.load_in_4bit = True
        model = AutoModelForCausalLM.from_pretrained(
            model_path,
            quantization_config=get_quantization_config(cfg, device),
            dtype=half if gpu else torch.float32,
            device_map={"": 0 if gpu else "cpu"},
        )
    if method != "full":
        from peft import get_peft_model

        model = get_peft_model(model, get_peft_config(cfg, model))
        keep_bnb_4bit_trainable_on_cpu(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(3, OPT_350M["vocab_size"], (batch_size, seq_len), generator=gen).to(device)
    autocast = torch.autocast("cuda", dtype=half) if gpu else torch.autocast("cpu", enabled=False)

    def step() -> float:
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        # Loading leaves freed fp16/fp32 copies in glibc's heap (RSS that no tensor uses): hand it back to the OS,
        # then reset the RSS high-water mark so that the figure counts what training holds.
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    rss_loaded = _rss()
    losses = [step()]  # warm-up (allocates gradients and optimizer state; counts for memory, not for speed)
    if gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    losses += [step() for _ in range(steps)]
    if gpu:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {
        "method": method,
        "device": device,
        "trainable_parameters": trainable,
        "weights_bytes": weights,
        "rss_after_imports_bytes": rss_imports,
        "rss_after_load_bytes": rss_loaded,
        "peak_bytes": int(torch.cuda.max_memory_allocated()) if gpu else _vm_hwm(),
        "peak_kind": "cuda_max_memory_allocated" if gpu else "cpu_peak_rss_during_steps",
        "samples_per_s": steps * batch_size / elapsed,
        "s_per_step": elapsed / steps,
        "losses": losses,
    }


def machine() -> str:
    """CPU model and cores (and the GPU when there is one)."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores"
    try:
        import torch

        if torch.cuda.is_available():
            desc += f"; GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return desc


def print_table(report: dict) -> None:
    """The markdown table of a report (as written to ``benchmarks/results/training.json``)."""
    rows, device = report["results"], report["device"]
    mem = "CUDA max allocated" if device == "cuda" else "peak RSS during steps"
    load = report.get("load_average_1min", [float("nan")] * 2)
    print(
        f"Machine: {report['machine']}; device {device}; batch {report['batch_size']} x {report['seq_len']} tokens, "
        f"{report['steps']} timed steps (+1 warm-up), AdamW; 1-min load average {load[0]:.1f} -> {load[1]:.1f}\n"
    )
    print(f"| method | trainable params | weights (MiB) | {mem} (MiB) | vs full FT | samples/s | s/step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['method']} | {r['trainable_parameters'] / 1e6:.2f} M | {r['weights_bytes'] / 2**20:.0f} | "
            f"{r['peak_bytes'] / 2**20:.0f} | {r.get('peak_vs_full', float('nan')):.0%} | {r['samples_per_s']:.3f} | "
            f"{r['s_per_step']:.1f} |"
        )
    if device == "cpu":
        base = min(r["rss_after_imports_bytes"] for r in rows)
        print(f"\nRSS after imports alone (in every CPU figure): {base / 2**20:.0f} MiB")
    if "gpu_target_qlora_peak_le_40pct_of_full" in report:
        print(f"GPU target (QLoRA peak <= 40% of full FT): {report['gpu_target_qlora_peak_le_40pct_of_full']}")


def main(argv: list[str] | None = None) -> int:
    """Run every method in its own subprocess, write the JSON, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per method (after 1 warm-up)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--table", action="store_true", help="only print the table of the last results JSON")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    args = provenance.parse_args(parser, argv)

    if args.worker:
        res = worker(args.worker, args.model_path, args.steps, args.batch_size, args.seq_len, args.device)
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    if args.table:
        print_table(json.loads(RESULTS.read_text()))
        return 0

    prov = provenance.start(parser, args, RESULTS, __file__)
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "opt-350m-random"
        build_model(model_path)
        for method in args.methods.split(","):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                method,
                "--model-path",
                str(model_path),
                "--steps",
                str(args.steps),
                "--batch-size",
                str(args.batch_size),
                "--seq-len",
                str(args.seq_len),
                "--device",
                device,
            ]
            print(f"[bench] {method} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"benchmark worker {method} failed (rc {proc.returncode})")
            rows.append(json.loads(line[len("RESULT ") :]))
    full = next((r for r in rows if r["method"] == "full"), None)
    report = {
        "provenance": prov,
        "machine": machine(),
        "device": device,
        "model": "opt-350m config, random weights",
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "steps": args.steps,
        # other work on the machine slows the samples/s figures (not the memory ones)
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "results": rows,
    }
    if full:
        for r in rows:
            r["peak_vs_full"] = r["peak_bytes"] / full["peak_bytes"]
    if device == "cuda" and full:
        qlora = next((r for r in rows if r["method"] == "qlora"), None)
        report["gpu_target_qlora_peak_le_40pct_of_full"] = bool(qlora and qlora["peak_vs_full"] <= 0.40)
    provenance.write(RESULTS, report)
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
