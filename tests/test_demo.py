"""The demo (fastsam.demo): its command line, its toy (fastsam.demo.toy) and model (fastsam.models) on tiny
configs. Part (b)'s pieces are in test_demo_digits.py, the committed outputs in test_demo_readme.py."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

import fastsam
from fastsam import demo
from fastsam.demo import cli, jobs
from fastsam.demo.lsam import run_toy
from fastsam.demo.toy import (
    DisentangledNet,
    ToyConfig,
    bce_loss,
    lsam_optimizer,
    make_two_feature_data,
    threshold_probe_error,
    train_toy,
)
from fastsam.models import TinyViT


# ------------------------------------------------------------------------------------ toy
def test_two_feature_data_follows_the_paper() -> None:
    cfg = ToyConfig(complexity=360.0)
    x, y = make_two_feature_data(1000, cfg, generator=torch.Generator().manual_seed(0))
    assert x.shape == (1000, 4) and y.shape == (1000,)
    assert int(y.sum()) == 500  # balanced
    s = 2 * y - 1
    # easy feature: a_easy * [z, z], sign of z = label, |z| <= 1
    assert torch.equal(x[:, 0], x[:, 1])
    assert bool((torch.sign(x[:, 0]) == s).all()) and float(x[:, 0].abs().max()) <= cfg.a_easy
    # hard feature: a_hard * |z| * (unit vector) + U([0, 0.5]^2) noise, |z| <= 2 pi chi / 360
    r_max = cfg.a_hard * 2 * math.pi * cfg.complexity / 360
    assert float((x[:, 2:] - cfg.noise / 2).norm(dim=1).max()) <= r_max + cfg.noise / math.sqrt(2) + 1e-5


def test_threshold_probe_error() -> None:
    s = torch.arange(10.0)
    y = (s >= 5).float()
    assert threshold_probe_error(s, y, s, y) == 0.0
    assert threshold_probe_error(-s, y, -s, y) == 0.0  # the probe picks the sign
    assert threshold_probe_error(s, y, s, 1 - y) == 1.0
    g = torch.Generator().manual_seed(0)
    noise = threshold_probe_error(torch.randn(2000, generator=g), (torch.rand(2000, generator=g) < 0.5).float(),
                                  torch.randn(2000, generator=g), (torch.rand(2000, generator=g) < 0.5).float())
    assert 0.4 < noise < 0.6


def test_disentangled_net_features() -> None:
    torch.manual_seed(0)
    m = DisentangledNet(hidden=8)
    x = torch.randn(5, 4)
    f = m.features(x)
    zeros = torch.zeros(5, 2)
    torch.testing.assert_close(f[:, 0], m.phi(torch.cat([x[:, :2], zeros], 1))[:, 0])
    torch.testing.assert_close(f[:, 1], m.phi(torch.cat([zeros, x[:, 2:]], 1))[:, 0])
    torch.testing.assert_close(m(x), f @ m.head.weight[0])


def test_lsam_perturbs_only_the_last_layer() -> None:
    """The ascent step moves v (by exactly rho) and nothing else; the descent updates everything."""
    torch.manual_seed(0)
    model = DisentangledNet(hidden=16)
    x, y = make_two_feature_data(20, ToyConfig(), generator=torch.Generator().manual_seed(1))
    rho = 0.3
    opt = lsam_optimizer(model, rho, lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    # by hand: the perturbed point
    bce_loss(model(x), y).backward()
    opt.first_step(zero_grad=True)
    for n, p in model.named_parameters():
        if n.startswith("phi."):
            assert torch.equal(p, before[n]), n
    dv = model.head.weight - before["head.weight"]
    torch.testing.assert_close(dv.norm(), torch.tensor(rho), rtol=1e-5, atol=0)
    opt.restore()

    # through sam_step: record the weights the second forward pass sees
    seen: list[dict[str, torch.Tensor]] = []
    hook = model.head.register_forward_pre_hook(
        lambda mod, inp: seen.append({n: p.detach().clone() for n, p in model.named_parameters()}))
    fastsam.sam_step(model, opt, x, y, bce_loss)
    hook.remove()
    assert len(seen) == 2  # the pass at w, the pass at w + e
    for n in before:
        if n.startswith("phi."):
            assert torch.equal(seen[1][n], before[n]), n  # not perturbed ...
            assert not torch.equal(dict(model.named_parameters())[n], before[n]), n  # ... but updated
    torch.testing.assert_close((seen[1]["head.weight"] - before["head.weight"]).norm(), torch.tensor(rho))


def test_train_toy_runs_and_reports() -> None:
    cfg = ToyConfig(n_train=40, n_test=200, hidden=8, epochs=2)
    for rho in (0.0, 0.5):
        r = train_toy(rho, seed=0, cfg=cfg)
        assert r["steps"] == 2 * 2  # 40 points / batch 20, 2 epochs
        for k in ("hard_probe_error", "easy_probe_error", "hard_sign_error", "test_error"):
            assert 0.0 <= r[k] <= 1.0
    a, b = train_toy(0.5, 3, cfg), train_toy(0.5, 3, cfg)
    a.pop("train_s"), b.pop("train_s")
    assert a == b  # a pure function of (rho, seed, cfg)


# ------------------------------------------------------------------------------------ model
def test_tiny_vit() -> None:
    m = TinyViT()
    assert 5_000 < m.num_parameters() < 50_000
    x = torch.arange(2 * 64, dtype=torch.float32).view(2, 64)
    # 4x4 patches: 4 tokens; patch 1 is the top-right 4x4 block of the 8x8 image, row-major
    assert m.patchify(x).shape == (2, 4, 16)
    assert m.patchify(x)[0, 1].tolist() == [4.0, 5.0, 6.0, 7.0, 12.0, 13.0, 14.0, 15.0,
                                            20.0, 21.0, 22.0, 23.0, 28.0, 29.0, 30.0, 31.0]
    assert TinyViT(patch_size=2).patchify(x)[0, 0].tolist() == [0.0, 1.0, 8.0, 9.0]
    assert m(x).shape == (2, 10)
    assert m(x.view(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        TinyViT(image_size=8, patch_size=3)


# ------------------------------------------------------------------------------------ CLI
_TINY = ["--steps", "5", "--seeds", "2", "--toy-epochs", "1", "--toy-seeds", "2", "--toy-rhos", "0,0.5",
         "--workers", "0", "--no-progress"]


def test_main_tiny_run_writes_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every variant on clean and noisy labels, rho chosen on held-out runs, in one process."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    assert demo.main([*_TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    first = printed.splitlines()[0]
    assert first.startswith("fastsam demo: (a) LSAM toy: 2 rho x 2 seeds; (b) digits: ") and " about " in first
    res = json.loads((out / "results.json").read_text())
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"spec", "env", "toy", "digits", "elapsed_s", "load_before", "load_after"} <= set(res)
    assert [r["method"] for r in res["toy"]["summary"]] == ["SGD", "LSAM"]
    dig = res["digits"]
    assert dig["noise_rates"] == [0.0, 0.4] and dig["splits"] == {"train": 1400, "fit": 1120, "held_out": 280,
                                                                    "test": 397}
    ran = [v["name"] for v in dig["variants"]]
    skipped = [s["name"] for s in dig["skipped"]]
    assert sorted(ran + skipped) == sorted(demo.VARIANTS)  # every registry entry: run, or skipped with why
    assert ran == [n for n in demo.VARIANTS if demo.VARIANTS[n].unavailable() is None]
    assert all(s["reason"] for s in dig["skipped"])
    for v in dig["variants"]:
        entry = demo.VARIANTS[v["name"]]
        assert [c["noise"] for c in v["conditions"]] == [0.0, 0.4], v["name"]
        for c in v["conditions"]:
            assert len(c["acc"]) == 2 and 0.0 <= c["acc_mean"] <= 1.0, v["name"]
            if entry.is_base:
                assert c["rho"] is None and "held_out" not in c
            else:  # one held-out run per grid value, and the choice is one of them
                assert [h["rho"] for h in c["held_out"]] == list(entry.rho_grid), v["name"]
                assert c["rho"] in entry.rho_grid and c["rho_from"] == "held-out"
                assert "vs_base_mean" in c
        assert v["ms_per_step"] > 0 and v["skipped_steps"] == 0, v["name"]
        assert v["backend"] == ("torch" if entry.is_base else fastsam.functional.resolve_backend("auto", "cpu")
                                + (" + reference loss" if "ascent_loss" in entry.step else "")), v["name"]
        assert all(r["steps"] == 5 for r in v["runs"]), v["name"]
    assert "| SAM |" in printed and "| LSAM |" in printed and "Held-out choice of rho" in printed
    assert "results.json" in printed


def test_main_quick_uses_default_rho_and_one_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    out = tmp_path / "q"
    assert demo.main(["--quick", "--steps", "2", "--parts", "digits", "--variants", "base,sam,asam", "--workers",
                      "0", "--no-progress", "--out", str(out)]) == 0
    assert ", default rho" in capsys.readouterr().out.splitlines()[0]
    dig = json.loads((out / "results.json").read_text())["digits"]
    rows = {v["name"]: v for v in dig["variants"]}
    assert dig["seeds"] == [0] and not dig["select"]
    assert [c["rho"] for c in rows["asam"]["conditions"]] == [demo.VARIANTS["asam"].rho] * 2
    assert all(c["rho_from"] == "default" for c in rows["sam"]["conditions"])


def test_main_says_when_it_builds_the_extension_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The first run compiles the C++ extension: one line before it says so and for how long, and the
    estimate includes it (the warm-up step itself is stubbed out here: no compiler run)."""
    calls = []
    monkeypatch.setattr(cli, "extension_build_pending", lambda device: True)
    monkeypatch.setattr(cli, "warm_up_sam", lambda device: calls.append(device) or 42.0)
    assert demo.main(["--parts", "toy", "--toy-epochs", "1", "--toy-seeds", "1", "--toy-rhos", "0", "--workers",
                      "0", "--no-progress", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "first build included" in lines[0]
    assert lines[1].startswith("Building fastsam's C++ extension") and "about a minute" in lines[1]
    assert lines[2] == "Built in 42 s." and len(calls) == 1


def test_main_rejects_unknown_variants(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        demo.main(["--variants", "sam,bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "'bogus'" in err and all(n in err for n in demo.VARIANTS)


@pytest.mark.parametrize("bad", ["-0.1", "0.9", "x"])
def test_main_rejects_bad_noise(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        demo.main(["--noise", bad])
    assert e.value.code == 2 and "--noise" in capsys.readouterr().err


def test_defaults_are_the_documented_run() -> None:
    """No flags = the run the README shows (the committed results are compared with this plan)."""
    p = cli.build_parser()
    assert cli.plan_from_args(p, p.parse_args([])) == cli.DEFAULTS
    assert cli.DEFAULTS.noises == (0.0, 0.4) and cli.DEFAULTS.seeds == (0, 1, 2) and cli.DEFAULTS.select
    assert cli.plan_from_args(p, p.parse_args(["--noise", "0"])).noises == (0.0,)


@pytest.mark.parametrize("load,workers", [(0.0, 2), (0.5, 2), (0.74, 2), (0.8, 1), (1.6, 1), (4.0, 1)])
def test_default_workers_leave_busy_cores_alone(monkeypatch: pytest.MonkeyPatch, load: float, workers: int) -> None:
    monkeypatch.setattr(jobs.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(jobs.os, "getloadavg", lambda: (load, load, load))
    assert jobs.default_workers() == workers


@pytest.mark.parametrize("text,seeds", [("3", [0, 1, 2]), ("0,5,7", [0, 5, 7])])
def test_parse_seeds(text: str, seeds: list[int]) -> None:
    assert cli._parse_seeds(text) == seeds


def test_toy_sweep_in_worker_processes_matches_in_process() -> None:
    """Each run is a pure function of (rho, seed): worker processes give the same numbers."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    # foreach: a worker must not JIT-build the C++ extension (tens of seconds after a csrc change)
    cfg = ToyConfig(n_train=40, n_test=200, hidden=8, epochs=2, backend="foreach")
    here = run_toy([0.0, 0.5], [0, 1], cfg, "cpu")
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=jobs.init_worker) as pool:
        there = run_toy([0.0, 0.5], [0, 1], cfg, "cpu", pool=pool)
    assert len(here["runs"]) == len(there["runs"]) == 4
    for a, b in zip(here["runs"], there["runs"]):
        assert (a["rho"], a["seed"]) == (b["rho"], b["seed"])
        assert a["hard_probe_error"] == b["hard_probe_error"] and a["v_hard"] == pytest.approx(b["v_hard"], abs=1e-6)
    assert here["summary"][1]["hard_sign_error_vs_sgd_mean"] == pytest.approx(
        statistics.fmean(r["hard_sign_error"] - s["hard_sign_error"]
                         for r, s in zip(here["runs"][2:], here["runs"][:2])))


# ------------------------------------------------------------------------------------ bench tables
def _bench_module(name: str):
    import importlib
    import sys

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(f"bench.{name}")


def test_make_tables_block_and_generic_rows(tmp_path: Path) -> None:
    mt = _bench_module("make_tables")
    text = "intro\n<!-- perf:begin -->\nold\n<!-- perf:end -->\noutro\n"
    assert mt.replace_block(text, "new") == "intro\n<!-- perf:begin -->\nnew\n<!-- perf:end -->\noutro\n"
    assert mt.replace_block("no markers", "new") is None
    # nested layouts of other benchmarks: scalars of every level become columns
    res = {"device": "cpu", "cases": [{"preset": "tiny", "impls": {"a": {"ms": 1.0}, "b": {"ms": 2.0}}}]}
    assert mt.find_rows(res) == [{"device": "cpu", "preset": "tiny", "impls": "a", "ms": 1.0},
                                 {"device": "cpu", "preset": "tiny", "impls": "b", "ms": 2.0}]
    assert mt.find_rows({"by": {"1": {"m": {"x": {"ms": 3.0}}}}}) == [{"by": "1", "m": "x", "ms": 3.0}]
    table = mt.table(mt.find_rows(res))
    assert "device: cpu; preset: tiny" in table and "| impls | ms |" in table
    # a results folder -> the block, with the environment line
    env = {"cpu": "X", "cpu_count": 2, "torch_threads": 1, "torch": "2", "commit": "abc", "date": "today"}
    (tmp_path / "r.json").write_text(json.dumps({"env": env, "results": {"rows": [{"k": 1}, {"k": 2}]}}))
    block = mt.build_block(tmp_path)
    assert "### r" in block and "Measured on X (2 cores, 1 torch thread)" in block and "| 2 |" in block
    # a generated .md next to each JSON; a hand-written one (no marker) is kept
    (tmp_path / "h.json").write_text(json.dumps({"env": env, "results": {"rows": [{"k": 3}]}}))
    (tmp_path / "h.md").write_text("my own table\n")
    assert mt.write_markdown(tmp_path) == [tmp_path / "r.md"]
    assert mt.MD_MARK in (tmp_path / "r.md").read_text() and "| 2 |" in (tmp_path / "r.md").read_text()
    assert (tmp_path / "h.md").read_text() == "my own table\n"
    assert mt.write_markdown(tmp_path) == []  # unchanged: nothing rewritten


def test_run_all_converts_pytest_benchmark_json() -> None:
    ra = _bench_module("run_all")
    raw = {"version": "5", "benchmarks": [{"group": "g", "name": "t", "extra_info": {"impl": "foreach"}, "stats": {
        "median": 0.002, "mean": 0.0021, "stddev": 0.0001, "min": 0.0019, "iqr": 0.0002, "rounds": 9,
        "iterations": 3}}]}
    row = ra.convert_pytest_benchmark(raw)["rows"][0]
    assert row["impl"] == "foreach" and row["median_ms"] == pytest.approx(2.0) and row["rounds"] == 9
