"""bench/make_tables.py: the README "Performance" summary, docs/performance.md and docs/perf_*.png
are generated from bench/results/*.json, and these tests fail when any of them drifts
(``python -m bench.make_tables --check``)."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
mt = importlib.import_module("bench.make_tables")

ENV = {"date": "2026-12-05T00:00:00+00:00", "commit": "0123456789abcdef", "cpu": "Test CPU", "cpu_count": 2,
       "torch_threads": 1, "torch": "2.13.0+cpu", "cuda": None, "gpu": None, "triton": None}
# bench/bench_cheap.py's layout: per (model, variant) median ms, ratio to AdamW, passes, SAM-step fraction
CHEAP = {"AdamW": (1.0, 1.0, None), "SAM": (1.97, 2.0, 1.0), "LookSAM k=5": (1.26, 1.2, 0.2),
         "interval k=5": (1.21, 1.2, 0.2), "AE-SAM": (1.42, 1.4, 0.4), "MSAM": (1.07, 1.0, 1.0),
         "WSAM": (2.01, 2.0, 1.0)}


def cheap_result(scale: dict[str, float] | None = None) -> dict:
    rows = []
    for i, model in enumerate(("tinyvit", "vit_s_blocks", "wide_mlp")):
        for v, (x, passes, frac) in CHEAP.items():
            x = x * (1 + 0.01 * i) if v != "AdamW" else 1.0
            x *= (scale or {}).get(v, 1.0)
            row = {"model": model, "variant": v, "ms_per_step": 10.0 * (i + 1) * x, "x_adamw": x,
                   "passes_per_step": passes, "params": 1000 * (i + 1)}
            if frac is not None:
                row.update(perturbing_fraction=frac, backend="cpp")
            rows.append(row)
    return {"env": ENV, "results": {"steps_per_round": 10, "rounds": 5, "torch_threads": 1, "rows": rows}}


@pytest.fixture()
def tree(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The results in bench/results with cheap_cpu.json replaced by :func:`cheap_result`, a
    README with the markers, and a docs folder: (results, readme, docs)."""
    res = tmp_path / "results"
    shutil.copytree(mt.RESULTS_DIR, res, ignore=shutil.ignore_patterns("*.md"))
    (res / "cheap_cpu.json").write_text(json.dumps(cheap_result()))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Performance\n\n{mt.BEGIN}\nold\n{mt.END}\n\n## After\n")
    return res, readme, tmp_path / "docs"


def test_committed_performance_outputs_are_current() -> None:
    """If this fails: run `python -m bench.make_tables` and commit README.md (the perf block only),
    docs/performance.md and docs/perf_*.png."""
    assert mt.stale_reasons() == []
    assert mt.main(["--check"]) == 0


def test_summary_says_where_every_number_comes_from(tree: tuple[Path, Path, Path]) -> None:
    res, readme, docs = tree
    block, perf, plots = mt.outputs(res, readme, docs)
    rows = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| what")]
    assert len(rows) >= 10
    for line in rows:
        where = line.rstrip(" |").rsplit(" | ", 1)[1]
        assert where.startswith(("CPU: ", "counted", "GPU prediction")), line
    assert any("GPU prediction" in r for r in rows) and any(r.endswith("| counted |") for r in rows)
    # the cheap variants: one row each, the range over the models, against AdamW, on the named CPU
    sam = next(r for r in rows if r.startswith("| SAM training step"))
    assert "1.97-2.01x the time" in sam and "an AdamW step on the same model" in sam
    assert sam.endswith("| CPU: Test CPU, 1 thread |")
    look = next(r for r in rows if r.startswith("| LookSAM k=5 training step"))
    assert "1.20 forward passes per step, SAM on 20 % of steps" in look
    assert not any(r.startswith("| AdamW training step") for r in rows)
    # every figure with data is shown in the README and in performance.md
    assert sorted(n for n, d in plots.items() if d) == sorted(mt.PLOTS)
    for name in mt.PLOTS:
        assert f'<img src="docs/{name}"' in block and f"![{name}]({name})" in perf
    assert "[docs/performance.md](docs/performance.md)" in block
    # performance.md: one section per result file, each with its environment line and source
    for p in sorted(res.glob("*.json")):
        sec = perf[perf.index(f"### {p.stem}\n"):]
        assert f"Source: `bench/results/{p.name}`" in sec.split("\n### ")[0]
    assert perf.count("Measured on ") >= len(list(res.glob("*.json")))


def test_generate_then_check_catches_each_kind_of_drift(tree: tuple[Path, Path, Path]) -> None:
    pytest.importorskip("matplotlib")
    res, readme, docs = tree
    args = ["--results", str(res), "--readme", str(readme), "--docs", str(docs)]
    assert mt.main(args) == 0
    assert mt.stale_reasons(res, readme, docs) == [] and mt.main([*args, "--check"]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\n## Performance\n\n" + mt.BEGIN) and text.endswith(mt.END + "\n\n## After\n")
    pngs = {p.name: p.read_bytes() for p in docs.glob("*.png")}
    assert sorted(pngs) == sorted(mt.PLOTS)
    assert mt.write_outputs(res, readme, docs) == []  # nothing stale: nothing rewritten

    # a hand-edited number in the README block
    readme.write_text(text.replace("12.01 parameter-sized passes", "11.01 parameter-sized passes"))
    assert mt.stale_reasons(res, readme, docs) == [f"{readme}: the performance block is not generated from the "
                                                   "results"]
    assert mt.main([*args, "--check"]) == 1
    readme.write_text(text)

    # a new result: README, performance.md and the figure drawn from it are stale, the others not
    data = json.loads((res / "cheap_cpu.json").read_text())
    data["results"]["rows"][1]["x_adamw"] += 0.5
    (res / "cheap_cpu.json").write_text(json.dumps(data))
    why = mt.stale_reasons(res, readme, docs)
    assert len(why) == 3 and "performance block" in why[0] and "performance.md is stale" in why[1]
    assert why[2] == f"{docs / 'perf_cheap.png'} was not drawn from the current results"
    assert mt.main(args) == 0 and mt.stale_reasons(res, readme, docs) == []
    assert {p.name for p in docs.glob("*.png") if p.read_bytes() != pngs[p.name]} == {"perf_cheap.png"}

    # a missing figure, a figure that is not a PNG, a stale performance.md
    (docs / "perf_host.png").unlink()
    (docs / "perf_traffic.png").write_text("not a png")
    (docs / mt.PERF_MD).write_text("edited")
    assert sorted(mt.stale_reasons(res, readme, docs)) == sorted([
        f"{docs / mt.PERF_MD} is stale", f"{docs / 'perf_host.png'} is missing",
        f"{docs / 'perf_traffic.png'} is not a PNG file"])
    assert mt.main(args) == 0 and mt.stale_reasons(res, readme, docs) == []

    # a result removed: its figure must go, and the generator removes it
    (res / "cheap_cpu.json").unlink()
    assert f"{docs / 'perf_cheap.png'}: no result to draw it from any more (delete it)" in \
        mt.stale_reasons(res, readme, docs)
    assert mt.main(args) == 0 and not (docs / "perf_cheap.png").exists()
    assert mt.stale_reasons(res, readme, docs) == [] and "perf_cheap.png" not in readme.read_text()

    # no markers: the README is left alone and the check fails
    readme.write_text("no markers\n")
    assert any("has no <!-- perf:begin -->" in w for w in mt.stale_reasons(res, readme, docs))
    assert mt.main(args) == 0 and readme.read_text() == "no markers\n"


def test_figures_are_reproducible_and_carry_their_data_digest(tree: tuple[Path, Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    res, readme, docs = tree
    _, _, plots = mt.outputs(res, readme, docs)
    for name, data in plots.items():
        a, b = tmp_path / f"a_{name}", tmp_path / f"b_{name}"
        assert mt.save_figure(data, a) and mt.save_figure(data, b)
        assert a.read_bytes() == b.read_bytes()  # no timestamp, no software tag
        assert mt.png_text(a) == {mt.PNG_KEY: mt.digest(data)}
    # the digest follows the data, not its formatting, and changes with the drawing code's version
    data = plots["perf_traffic.png"]
    assert mt.digest(json.loads(json.dumps(data))) == mt.digest(data)
    assert mt.digest({**data, "first": [x + 1 for x in data["first"]]}) != mt.digest(data)


def test_one_number_format_per_column() -> None:
    rows = [{"impl": "a", "ms": 0.6663, "big": 2995.39, "n": 18154, "r": 1.0},
            {"impl": "b", "ms": 127.9, "big": 316.14, "n": 31, "r": 10.321}]
    t = mt.table(rows)
    assert "| a | 0.666 | 2995 | 18,154 | 1.00 |" in t and "| b | 127.900 | 316 | 31 | 10.32 |" in t
    assert "|---|---:|---:|---:|---:|" in t
    # constant columns go to the caption, None stays empty
    t = mt.table([{"k": "x", "v": 1.5, "w": None}, {"k": "x", "v": 2.25, "w": 3}])
    assert t.startswith("k: x\n") and "| 1.50 |  |" in t and "| 2.25 | 3 |" in t


def test_unknown_result_layouts_get_generic_tables(tmp_path: Path) -> None:
    (tmp_path / "gpu").mkdir()
    env = {**ENV, "gpu": "NVIDIA H200", "cuda": "13.0"}
    (tmp_path / "gpu" / "bench_optim.json").write_text(json.dumps({"env": env, "results": {
        "note": "n", "device": "cuda", "sets": {"vit_b16": {"impls": {"a": {"ms": 1.0}, "b": {"ms": 2.5}}}}}}))
    (tmp_path / "other.json").write_text(json.dumps({"note": "several runs", "runs": {
        "x": {"environment": ENV, "rows": [{"k": 1, "t": 0.5}, {"k": 2, "t": 0.25}]}}}))
    (tmp_path / "broken.json").write_text("{")
    results = mt.load_results(tmp_path)
    assert sorted(results) == ["broken", "gpu/bench_optim", "other"]
    perf = mt.build_performance_md(results, [])
    assert "### gpu/bench_optim" in perf and "Measured on NVIDIA H200, torch 2.13.0+cpu, CUDA 13.0" in perf
    assert "device: cuda; sets: vit_b16" in perf and "| impls | ms |" in perf and "| b | 2.50 |" in perf
    assert "Note recorded with the result: n" in perf
    assert "### other" in perf and "Run `x`: Measured on Test CPU" in perf and "| 2 | 0.250 |" in perf
    assert "### broken" in perf and "unreadable" in perf
    block = " ".join(mt.build_summary(results, []).split())
    assert "although GPU results exist (NVIDIA H200" in block and "No results yet." in block


def test_gpu_model_constants_are_those_of_the_benchmarks() -> None:
    text = (ROOT / "bench" / "bench_optim.py").read_text()
    assert re.search(r'"vit_b16": 86_567_656', text) and mt.VIT_B_NUMEL == 86_567_656
    notes = (ROOT / "bench" / "NOTES.md").read_text()
    assert "**4.3 TB/s**" in notes and "efficiency 0.88" in notes and "0.85 for torch" in notes
