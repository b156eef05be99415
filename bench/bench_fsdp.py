"""FSDP2 + fastsam: collectives and bytes per SAM first step vs a per-parameter SAM loop (#15).

ViT-B/16 parameter shapes (86.6M parameters, 152 tensors: patch embedding, 12 blocks of
qkv/proj/fc1/fc2 with biases and two LayerNorms, final norm, 1000-class head), each block
``fully_shard``-ed and the root too, 2 ranks, gloo on loopback. The gradients are random
DTensors (no forward pass: the SAM step is what is measured).

- ``fastsam cpp`` / ``fastsam foreach``: ``SAM.first_step`` with that backend (local shards, one
  all_gather of the norm statistics);
- ``per-parameter loop``: the usual SAM first step written on the DTensor parameters
  (``norm = stack([p.grad.norm() for p in params]).norm()``, then ``p += rho * g / norm``
  per parameter), as a SAM implementation that is unaware of sharding runs under FSDP2.

Counted per step and per rank: collectives (every call into ``torch.distributed`` collectives
and every functional collective DTensor issues, through ``CommDebugMode``) and the bytes each
rank contributes. Timed: wall time of the first step (median of 5, after 1 warm-up).

Run: ``python bench/bench_fsdp.py [--small]`` (``--small``: 1 block, for a quick check).
Results: bench/results/fsdp_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORLD = 2
RHO = 0.05
REPS = 5
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
                "all_to_all_single", "reduce", "gather", "scatter")


def vit_b_shapes(blocks: int = 12) -> list[tuple[str, tuple[int, ...]]]:
    d, mlp, patch = 768, 3072, 3 * 16 * 16
    shapes = [("patch.w", (d, patch)), ("patch.b", (d,)), ("cls", (1, 1, d)), ("pos", (1, 197, d))]
    for i in range(blocks):
        shapes += [(f"b{i}.ln1.w", (d,)), (f"b{i}.ln1.b", (d,)), (f"b{i}.qkv.w", (3 * d, d)), (f"b{i}.qkv.b", (3 * d,)),
                   (f"b{i}.proj.w", (d, d)), (f"b{i}.proj.b", (d,)), (f"b{i}.ln2.w", (d,)), (f"b{i}.ln2.b", (d,)),
                   (f"b{i}.fc1.w", (mlp, d)), (f"b{i}.fc1.b", (mlp,)), (f"b{i}.fc2.w", (d, mlp)), (f"b{i}.fc2.b", (d,))]
    shapes += [("norm.w", (d,)), ("norm.b", (d,)), ("head.w", (1000, d)), ("head.b", (1000,))]
    return shapes


class _Holder(torch.nn.Module):
    def __init__(self, shapes: list[tuple[str, tuple[int, ...]]]) -> None:
        super().__init__()
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s) * 0.02) for _, s in shapes])


def _build(blocks: int) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    shapes = vit_b_shapes(blocks)
    head, rest = shapes[:4], shapes[4:]
    model = torch.nn.Module()
    model.stem = _Holder(head)
    model.blocks = torch.nn.ModuleList([_Holder(rest[12 * i:12 * (i + 1)]) for i in range(blocks)])
    model.tail = _Holder(rest[12 * blocks:])
    for b in model.blocks:
        fully_shard(b)
    fully_shard(model)
    return model


def _set_grads(model: torch.nn.Module) -> None:
    torch.manual_seed(1 + dist.get_rank())
    for p in model.parameters():
        g = torch.zeros_like(p)
        g.to_local().normal_()
        p.grad = g


class _Counter:
    """Calls into torch.distributed collectives (and bytes this rank sends), plus CommDebugMode's
    count of the functional collectives DTensor issues."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.bytes = 0
        self.saved = {n: getattr(dist, n) for n in _COLLECTIVES}

    def __enter__(self) -> _Counter:
        from torch.distributed.tensor.debug import CommDebugMode

        for n in _COLLECTIVES:
            f = self.saved[n]

            def g(*a, _f=f, _n=n, **k):
                self.calls.append(_n)
                t = a[1] if _n in ("all_gather_into_tensor", "reduce_scatter_tensor") else a[0]
                if isinstance(t, torch.Tensor):
                    self.bytes += t.numel() * t.element_size()
                return _f(*a, **k)
            setattr(dist, n, g)
        self.mode = CommDebugMode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.mode.__exit__(*exc)
        for n, f in self.saved.items():
            setattr(dist, n, f)

    def funcol(self) -> int:
        return int(self.mode.get_total_counts())


def _per_param_first_step(params: list[torch.Tensor], old: dict) -> None:
    """The SAM first step as written without sharding in mind (the davda54/sam loop: w kept for
    the restore, the norm of the stacked per-parameter norms, e added per parameter), on DTensor
    parameters: DTensor's own ops make it global."""
    with torch.no_grad():
        norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in params]), p=2)
        scale = RHO / (norm + 1e-12)
        for p in params:
            old[p] = p.data.clone()
            p.add_(p.grad * scale)


def _worker(rank: int, init: str, blocks: int, out: str) -> None:
    import fastsam

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    res: dict = {}
    try:
        model = _build(blocks)
        params = list(model.parameters())
        res["tensors"] = len(params)
        res["parameters"] = sum(p.numel() for p in params)
        opts = {b: fastsam.SAM(params, torch.optim.SGD, lr=0.1, rho=RHO, backend=b)
                for b in ("cpp", "foreach") if b in fastsam.functional.available_backends("cpu")}
        _set_grads(model)
        runs = [(f"fastsam {b}", o.first_step, o.restore) for b, o in opts.items()]
        runs.append(("per-parameter loop", functools.partial(_per_param_first_step, params, {}), None))
        for name, run, undo in runs:
            w0 = [p.detach().to_local().clone() for p in params] if undo is None else None
            times = []
            counts = None
            for i in range(REPS + 1):
                dist.barrier()
                with _Counter() as c:
                    t0 = time.perf_counter()
                    run()
                    t1 = time.perf_counter()
                if i:
                    times.append(t1 - t0)
                counts = (len(c.calls), c.bytes, c.funcol(), sorted(set(c.calls)),
                          {str(k): v for k, v in c.mode.get_comm_counts().items()})
                if undo is not None:
                    undo()
                else:
                    with torch.no_grad():
                        for p, w in zip(params, w0):
                            p.to_local().copy_(w)
            res[name] = {"c10d_calls": counts[0], "c10d_bytes": counts[1], "functional_collectives": counts[2],
                         "ops": counts[3], "functional_by_op": counts[4], "median_s": statistics.median(times),
                         "times_s": times}
        res["reduce_hook"] = {b: {"calls": o._sharding.reduce.calls, "bytes": o._sharding.reduce.bytes}
                              for b, o in opts.items()}
        runs.clear()
        opts.clear()
        del model, params
    finally:
        if rank == 0:
            torch.save(res, out)
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="1 block instead of 12 (quick check)")
    ap.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = ap.parse_args()
    blocks = 1 if args.small else 12
    with tempfile.TemporaryDirectory() as d, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        s.close()
        out = os.path.join(d, "r.pt")
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(r, init, blocks, out)) for r in range(WORLD)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=900)
        for p in procs:
            if p.is_alive():
                p.kill()
        if not os.path.exists(out) or any(p.exitcode != 0 for p in procs):
            raise SystemExit(f"workers failed: {[p.exitcode for p in procs]}")
        res = torch.load(out, weights_only=False)
    from bench._env import write_result, write_text_atomic

    out_res = {"model": f"ViT-B/16 shapes, {blocks} blocks", "world": WORLD, "tensors": res["tensors"],
               "parameters": res["parameters"],
               # one row per first step (docs/performance.md tabulates this list)
               "rows": [{"first step": k, "c10d calls": r["c10d_calls"], "c10d bytes": r["c10d_bytes"],
                         "functional collectives": r["functional_collectives"], "median s": r["median_s"]}
                        for k, r in res.items() if isinstance(r, dict) and "median_s" in r],
               "details": {k: v for k, v in res.items() if k not in ("tensors", "parameters")}}
    name = "fsdp_cpu" if not args.small else "fsdp_cpu_small"
    path = write_result(name, out_res, args.out)
    res["model"] = out_res["model"]
    md = [f"# FSDP2 SAM first step: {res['model']} ({res['parameters'] / 1e6:.1f}M parameters, {res['tensors']} "
          f"tensors), {WORLD} ranks, gloo on loopback, CPU", "",
          "Per step and per rank. c10d: calls into torch.distributed collectives and the bytes this rank sends; "
          "functional: collectives DTensor issues (CommDebugMode; it also sees fastsam's c10d all_gather). "
          "Wall time: median of 5, both ranks pinned to one shared core (numbers for the count, not for speed).",
          "",
          "| first step | c10d calls | c10d bytes | functional collectives | wall time (s) |",
          "|---|---:|---:|---:|---:|"]
    rows = [(f"{k} (local shards, one all_gather of the norm statistics)", r) for k, r in res.items()
            if k.startswith("fastsam ")]
    rows.append(("per-parameter SAM loop on DTensors (davda54/sam style)", res["per-parameter loop"]))
    for k, r in rows:
        md.append(f"| {k} | {r['c10d_calls']} | {r['c10d_bytes']} | {r['functional_collectives']} | "
                  f"{r['median_s']:.3f} |")
    write_text_atomic(path.with_suffix(".md"), "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
