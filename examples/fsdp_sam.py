"""SAM under FSDP2 with a distributed checkpoint and resume (README "Sharded training (FSDP2)").

Run on CPU (gloo) or on GPUs (nccl, one per rank), nothing is downloaded::

    torchrun --nproc_per_node 2 examples/fsdp_sam.py

A tiny residual MLP (2 blocks) is sharded with ``fully_shard`` per block and at the root, trained
with ``fastsam.SAM`` over AdamW by ``fastsam.sam_step`` on random data (each rank holds its part of
the global batch, so every step is SAM over the global batch), checkpointed with
``torch.distributed.checkpoint`` half way, and resumed into a fresh model and optimizer with
``fastsam.checkpoint.load_target``. The resumed steps must equal the uninterrupted ones bit for
bit: the script prints ``resume identical: True`` and exits with status 1 otherwise (the test
``tests/test_fsdp_example.py`` runs it and checks both).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import fastsam

DIM, HIDDEN, CLASSES = 16, 32, 4


class Block(nn.Module):
    """Pre-norm residual MLP block (the unit FSDP2 shards and gathers at a time)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.fc1 = nn.Linear(DIM, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def build(seed: int, mesh, device: torch.device) -> tuple[nn.Module, fastsam.SAM]:
    """Model and optimizer, built the same way for the first run and for the resume (a resumed
    run starts from other initial weights: everything it needs must come from the checkpoint)."""
    torch.manual_seed(seed)
    model = Net().to(device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = fastsam.SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=3e-3, weight_decay=0.05)
    return model, opt


def batches(steps: int, global_batch: int, rank: int, world: int, device: torch.device) -> list:
    """The same random global batches on every rank (a fixed generator); each rank keeps its rows.
    Labels come from a fixed random linear teacher, so the loss can go down."""
    g = torch.Generator().manual_seed(1234)
    teacher = torch.randn(DIM, CLASSES, generator=g)
    per = global_batch // world
    out = []
    for _ in range(steps):
        x = torch.randn(global_batch, DIM, generator=g)
        y = (x @ teacher).argmax(dim=1)
        out.append((x[rank * per:(rank + 1) * per].to(device), y[rank * per:(rank + 1) * per].to(device)))
    return out


def step(model: nn.Module, opt: fastsam.SAM, x: torch.Tensor, y: torch.Tensor) -> float:
    """One SAM step; returns the global mean loss at w + e (the ranks' means averaged: equal local
    batch sizes)."""
    r = fastsam.sam_step(model, opt, x, y, F.cross_entropy, max_grad_norm=1.0)
    loss = r.loss_tensor.detach().clone()
    dist.all_reduce(loss)
    return float(loss) / dist.get_world_size()


def local_weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.to_local().detach().clone() for p in model.parameters()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="total steps; the checkpoint is taken after half of them")
    ap.add_argument("--global-batch", type=int, default=64)
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # ranks share the machine's cores
    mesh = init_device_mesh(device.type, (world,))
    say = print if rank == 0 else (lambda *a, **k: None)

    # one checkpoint directory for every rank (rank 0 creates it, the others learn its path)
    holder = [tempfile.mkdtemp(prefix="fastsam_fsdp_") if rank == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    ckpt = holder[0]
    ok = False
    try:
        data = batches(args.steps, args.global_batch, rank, world, device)
        half = args.steps // 2
        model, opt = build(0, mesh, device)
        say(f"{world} ranks ({dist.get_backend()}), global batch {args.global_batch}, SAM over AdamW")
        for s in range(half):
            say(f"step {s}: loss {step(model, opt, *data[s]):.4f}")
        dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=ckpt)
        say(f"saved checkpoint after step {half - 1} (step_count {opt.step_count})")
        want_loss = []
        for s in range(half, args.steps):
            want_loss.append(step(model, opt, *data[s]))
            say(f"step {s}: loss {want_loss[-1]:.4f}")
        want = local_weights(model)
        del model, opt

        # resume: a fresh model and optimizer (other initial weights), loaded in place
        model, opt = build(1, mesh, device)
        sd = {"model": model.state_dict(), "optim": fastsam.checkpoint.load_target(opt)}
        dcp.load(sd, checkpoint_id=ckpt)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])
        say(f"resumed at step_count {opt.step_count}")
        got_loss = []
        for s in range(half, args.steps):
            got_loss.append(step(model, opt, *data[s]))
            say(f"step {s} (resumed): loss {got_loss[-1]:.4f}")
        got = local_weights(model)
        same = torch.tensor([float(got_loss == want_loss and all(torch.equal(a, b) for a, b in zip(got, want)))],
                            device=device)
        dist.all_reduce(same, op=dist.ReduceOp.MIN)  # every rank's shards
        ok = bool(same.item() == 1.0)
        say(f"resume identical: {ok}")
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(ckpt, ignore_errors=True)
        gc.collect()  # drop the FSDP modules' references to the process group before tearing it down
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
