"""The roofline's peer: what a PyTorch user runs for the same SFT step on a GPU.

A ``transformers`` model of the same shape (random init; only speed is compared), float32
params, bf16 autocast, SDPA attention, fused AdamW, eager. Run in its own process: JAX
reserves 75% of the GPU's memory at first use, so the two must never share one.

    python -m benchmarks.torch_peer '<ModelConfig as JSON>' BATCH SEQ [--warmup N] [--steps N]

prints one JSON line: ``{"tokens_per_s": ..., "step_s": [...], "device": ...}`` or
``{"skipped": why}`` (no torch, or no CUDA: the peer is a GPU measurement).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def measure(cfg_json: str, batch: int, seq: int, warmup: int, steps: int, device: str = "cuda") -> dict:
    try:
        import torch
    except ImportError:
        return {"skipped": "no torch"}
    if device == "cuda" and not torch.cuda.is_available():
        return {"skipped": "no CUDA torch"}
    import transformers

    from rlhf_jax.config.model import model_config_from_dict
    from rlhf_jax.models.hf_config import hf_config

    cfg = model_config_from_dict(json.loads(cfg_json), "torch_peer")
    hf = {k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "dtype")}
    hf_cfg = transformers.CONFIG_MAPPING[hf.pop("model_type")](**hf, attn_implementation="sdpa")
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device == "cuda")
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)

    def step() -> None:
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    median = sorted(times)[len(times) // 2]
    return {"tokens_per_s": batch * seq / median, "step_s": times, "device": device,
            "torch": torch.__version__, "transformers": transformers.__version__}


def run_in_process(cfg_json: str, batch: int, seq: int, warmup: int, steps: int, timeout_s: float) -> dict:
    """:func:`measure` in a fresh process (never in one where JAX holds the GPU)."""
    cmd = [sys.executable, "-m", "benchmarks.torch_peer", cfg_json, str(batch), str(seq),
           "--warmup", str(warmup), "--steps", str(steps)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout_s:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"skipped": f"failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("batch", type=int)
    parser.add_argument("seq", type=int)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke test)")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.config, args.batch, args.seq, args.warmup, args.steps, args.device)))


if __name__ == "__main__":
    main()
