"""examples/fsdp_sam.py runs as the README says (``torchrun --nproc_per_node 2``, gloo on CPU).

The example is the README's FSDP2 recipe; running it here keeps the recipe (sharding, sam_step,
DCP save, ``load_target`` resume) working and its "resume identical" check true. It is run the
way a user of a clean clone would: a subprocess of ``torch.distributed.run`` with the repository
root on ``PYTHONPATH`` and nothing installed, on a free loopback port, under a bounded timeout.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fsdp_sam.py"


def test_fsdp_example_runs_and_resumes_identically(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU, as the README's run
    env["MASTER_ADDR"] = "127.0.0.1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(EXAMPLE)]
    # cwd outside the repository: the example must not depend on the working directory
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "resume identical: True" in p.stdout, out[-4000:]
    assert "2 ranks (gloo)" in p.stdout, out[-4000:]
    losses = [line for line in p.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 9, p.stdout  # 6 steps + the 3 resumed ones, printed by rank 0 only
