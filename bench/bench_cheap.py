"""End-to-end step time of the SAM family relative to an AdamW step, on this CPU (issue #17).

What users of SAM pay for is the second forward/backward pass, not the optimizer: this times
whole training steps (forward, backward, optimizer) with ``fastsam.sam_step`` for SAM and the
cheaper variants, and a plain AdamW step (``zero_grad, forward, backward, step``) in the same
process, interleaved round by round so that a drift of the machine's speed hits all alike.
Models where the passes dominate the step: the demo's TinyViT at a batch of 256 digits-sized
images, a ViT-S-shaped transformer block stack (width 384, 6 heads, 4 blocks, 16 tokens) and a
wide MLP.

Reported per (model, variant): median ms per step over the rounds, the ratio to AdamW, forward
passes per step and (interval SAM / LookSAM / AE-SAM) the fraction of steps that perturbed.
``python -m bench.bench_cheap [--steps N] [--rounds R] [--out DIR]`` writes ``cheap_cpu.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fastsam
from bench._env import write_result

LR = 1e-3
RHO = 0.05


def models() -> dict[str, Callable[[], tuple[nn.Module, torch.Tensor, torch.Tensor]]]:
    from fastsam.models import TinyViT

    def tinyvit():
        torch.manual_seed(0)
        return TinyViT(), torch.randn(256, 64), torch.randint(0, 10, (256,))

    def vit_s_blocks():
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(384, 6, 1536, dropout=0.0, batch_first=True, norm_first=True)
        body = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        head = nn.Linear(384, 10)

        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.body, self.head = body, head

            def forward(self, x):
                return self.head(self.body(x).mean(1))

        return M(), torch.randn(32, 16, 384), torch.randint(0, 10, (32,))

    def wide_mlp():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 2048), nn.GELU(), nn.Linear(2048, 10))
        return m, torch.randn(256, 512), torch.randint(0, 10, (256,))

    return {"tinyvit": tinyvit, "vit_s_blocks": vit_s_blocks, "wide_mlp": wide_mlp}


def variants(total_steps: int) -> dict[str, Callable[[Any], Any]]:
    adamw = torch.optim.AdamW
    return {
        "AdamW": lambda ps: adamw(ps, lr=LR),
        "SAM": lambda ps: fastsam.SAM(ps, adamw, RHO, lr=LR),
        "LookSAM k=5": lambda ps: fastsam.LookSAM(ps, adamw, RHO, k=5, lr=LR),
        "interval k=5": lambda ps: fastsam.SAM(ps, adamw, RHO, sam_every=5, lr=LR),
        "AE-SAM": lambda ps: fastsam.AESAM(ps, adamw, RHO, total_steps=total_steps, lr=LR),
        "MSAM": lambda ps: fastsam.MSAM(ps, adamw, 0.3, lr=LR),
        "WSAM": lambda ps: fastsam.WSAM(ps, adamw, RHO, lr=LR),
    }


class Runner:
    """One (model, variant): its own model copy and optimizer, stepped ``steps`` at a time."""

    def __init__(self, make_model: Callable, make_opt: Callable) -> None:
        self.model, x, y = make_model()
        # a pool of batches, cycled: AE-SAM decides from |g|^2, which one fixed batch would only
        # drive down (shuffled copies of one batch: the same cost per step)
        g = torch.Generator().manual_seed(1)
        self.batches = [(x, y)] + [(x[idx], y[idx]) for idx in (torch.randperm(len(y), generator=g) for _ in range(7))]
        self.batches = [(xb + 0.1 * k * torch.randn(xb.shape, generator=g), yb) for k, (xb, yb) in
                        enumerate(self.batches)]
        self.x, self.y = self.batches[0]
        self.opt = make_opt(self.model.parameters())
        self.passes = 0
        self.steps = 0
        self.model.register_forward_hook(lambda *a: setattr(self, "passes", self.passes + 1))

    def step(self) -> None:
        self.x, self.y = self.batches[self.steps % len(self.batches)]
        if isinstance(self.opt, fastsam.SAM):
            fastsam.sam_step(self.model, self.opt, self.x, self.y, F.cross_entropy, keep_outputs=False)
        else:
            self.opt.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(self.x), self.y).backward()
            self.opt.step()
        self.steps += 1

    def timed(self, n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            self.step()
        return (time.perf_counter() - t) / n


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=16, help="steps per variant per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--models", default="tinyvit,vit_s_blocks,wide_mlp")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # one core: the other is left to the machine (timings steadier)
    total = args.steps * (args.rounds + 1)
    rows = []
    for mname in args.models.split(","):
        make_model = models()[mname]
        runners = {v: Runner(make_model, mk) for v, mk in variants(total).items()}
        for r in runners.values():  # warm-up: state, caches, the extension's first call
            r.timed(args.steps)
        start = {v: (r.passes, r.steps, getattr(r.opt, "perturbing_steps", 0)) for v, r in runners.items()}
        times: dict[str, list[float]] = {v: [] for v in runners}
        for _ in range(args.rounds):
            for v, r in runners.items():
                times[v].append(r.timed(args.steps))
        base = statistics.median(times["AdamW"])
        for v, r in runners.items():
            ms = statistics.median(times[v])
            p0, s0, k0 = start[v]  # counted over the timed steps only (AE-SAM's fraction drifts over training)
            row = {"model": mname, "variant": v, "ms_per_step": 1e3 * ms, "x_adamw": ms / base,
                   "passes_per_step": (r.passes - p0) / (r.steps - s0),
                   "params": sum(p.numel() for p in r.model.parameters())}
            if isinstance(r.opt, fastsam.SAM):
                row["perturbing_fraction"] = (r.opt.perturbing_steps - k0) / (r.steps - s0)
                row["backend"] = fastsam.functional.resolve_backend(r.opt.backend, next(r.model.parameters()).device)
            rows.append(row)
            print(f"{mname:13s} {v:13s} {1e3 * ms:8.2f} ms  {ms / base:5.2f}x AdamW  "
                  f"{row['passes_per_step']:.2f} passes/step"
                  + (f"  SAM steps {row['perturbing_fraction']:.0%}" if "perturbing_fraction" in row else ""),
                  flush=True)
    out = {"steps_per_round": args.steps, "rounds": args.rounds, "torch_threads": 1, "rows": rows}
    write_result("cheap_cpu", out, args.out)
    return out


if __name__ == "__main__":
    main()
