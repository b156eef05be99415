"""The README "Performance" summary, ``docs/performance.md`` and the ``docs/perf_*.png`` figures,
generated from the committed benchmark results.

::

    python -m bench.make_tables            # rewrite README.md between the perf markers,
                                           # docs/performance.md and the figures that are stale
    python -m bench.make_tables --check    # exit 1 if any of them is stale (tests/test_make_tables.py)
    python -m bench.make_tables --stdout   # print the README block only
    python -m bench.make_tables --siblings # also rewrite the generated <name>.md next to each JSON

Reads every ``*.json`` under ``bench/results/`` (subfolders too, e.g. ``gpu/`` from the GPU suite):
files written by :func:`bench._env.write_result` (``{"env": ..., "results": ...}``) and files of
several runs, each with its own environment (``{"note": ..., "runs": {name: {"environment": ...,
"rows": [...]}}}``, ``bench_host``). Three outputs:

* the README block (only the text between ``<!-- perf:begin -->`` and ``<!-- perf:end -->`` is
  replaced): one table row per claim, saying the number, what it is compared against and where it
  comes from: ``CPU: <model>`` (timed on that CPU, from the result's environment), ``counted``
  (bytes, launches and memory counted by ``bench/traffic.py``: the same on any machine) or ``GPU
  prediction`` (not measured: bytes counted on CPU through the bandwidth model of ``bench/NOTES.md``,
  "H200 predictions"), then the figures;
* ``docs/performance.md``: every result file as tables, with its environment and a sentence on
  what it measures (known files get a purpose-built table, others the generic one of
  :func:`find_rows` and :func:`table`: constant columns become a caption line, one number format
  per column);
* ``docs/perf_*.png``: drawn from the results with a fixed size and no timestamp or software tag;
  each carries the sha256 of the data it was drawn from in a PNG text chunk (:data:`PNG_KEY`), so
  ``--check`` compares that, not pixels (matplotlib versions draw differently), and a figure is
  redrawn only when its data changed.

Every number in the three comes from a result file, except the constants of the GPU model below.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fastsam.demo.plot import png_text  # one PNG text-chunk reader for the demo's and these figures

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
README = ROOT / "README.md"
DOCS_DIR = ROOT / "docs"
PERF_MD = "performance.md"  # under DOCS_DIR
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
MAX_COLUMNS = 12  # wider tables do not read on GitHub
WIDTH = 98  # the README's hand-wrapped paragraphs are at most this wide
PNG_KEY = "fastsam-perf-data"  # PNG text chunk: sha256 of the data a figure was drawn from
PLOT_VERSION = 1  # part of every figure's digest: bump it when the drawing code changes

# The GPU model of bench/NOTES.md, "H200 predictions" (written before any GPU run): device time =
# counted bytes / (efficiency x the H200's device-to-device copy bandwidth).
H200_COPY_BYTES_PER_S = 4.3e12
EFFICIENCY_TRITON = 0.88  # the three persistent fastsam kernels
EFFICIENCY_TORCH = 0.85  # torch's multi-tensor kernels
VIT_B_NUMEL = 86_567_656  # timm vit_base_patch16_224 (bench/bench_optim.py EXPECTED_NUMEL)

Scalar = str | int | float | bool | None
Claim = tuple[str, str, str, str]  # what, number, against what, where it comes from


# ------------------------------------------------------------------------------ cells and tables
def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt(v: Any) -> str:
    """A single cell: 4 significant digits for floats, thousands separators for large ints."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, float):
        if v != v:  # NaN
            return "nan"
        return f"{v:,.0f}" if abs(v) >= 10_000 else f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def column_format(values: Iterable[Any]) -> Callable[[Any], str]:
    """One format for a whole column: a numeric column gets the same number of decimals in every
    row (3 significant digits on its smallest value, 0 to 3 decimals, at most 1 from 1000 up) and
    thousands separators from 10,000 up; other cells as :func:`fmt`."""
    nums = [v for v in values if _is_num(v) and math.isfinite(v)]
    if not nums:
        return fmt
    nonzero = [abs(v) for v in nums if v]
    if all(float(v).is_integer() for v in nums) or not nonzero:
        dec = 0
    else:
        dec = max(0, min(3, 2 - math.floor(math.log10(min(nonzero)))))
        if max(nonzero) >= 1000:
            dec = min(dec, 1)
    sep = "," if max(abs(v) for v in nums) >= 10_000 else ""

    def cell(v: Any) -> str:
        if not _is_num(v):
            return fmt(v)
        if not math.isfinite(v):
            return str(v)
        return f"{v:{sep}.{dec}f}"

    return cell


def _is_records(v: Any) -> bool:
    """A non-empty list of dicts (table rows)."""
    return isinstance(v, list) and bool(v) and all(isinstance(r, dict) for r in v)


def _is_keyed(v: Any) -> bool:
    """A non-empty ``{name: {...}}`` dict (one row, or one sub-table, per name)."""
    return isinstance(v, dict) and bool(v) and all(isinstance(x, dict) for x in v.values())


def find_rows(obj: Any, context: dict[str, Scalar] | None = None) -> list[dict[str, Scalar]]:
    """The table inside a result, flattened: scalars of every enclosing level become columns, and
    the first list of dicts or ``{name: {...}}`` dict at each level is expanded (one row, or one
    sub-table, per element; a ``{name: ...}`` key becomes a column named after the dict)."""
    ctx = dict(context or {})
    if _is_records(obj):
        return [row for item in obj for row in find_rows(item, ctx)]
    if not isinstance(obj, dict):
        return []
    ctx.update({k: v for k, v in obj.items() if _is_scalar(v)})
    for v in obj.values():
        if _is_records(v):
            return find_rows(v, ctx)
    for k, v in obj.items():
        if _is_keyed(v):
            return [row for name, sub in v.items() for row in find_rows(sub, {**ctx, k: name})]
    return [ctx] if context is not None else []


def table(rows: list[dict[str, Scalar]], columns: list[str] | None = None) -> str:
    """Markdown table of ``rows``; columns constant over several rows go to a caption line above
    it, every column has one number format (:func:`column_format`)."""
    if not rows:
        return ""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    constant = {c: rows[0].get(c) for c in columns
                if len(rows) > 1 and all(r.get(c) == rows[0].get(c) for r in rows)}
    cols = [c for c in columns if c not in constant][:MAX_COLUMNS]
    lines = []
    caption = "; ".join(f"{c}: {fmt(v)}" for c, v in constant.items() if v is not None)
    if caption:
        lines.append(caption + "\n")
    cells = {c: column_format(r.get(c) for r in rows) for c in cols}
    numeric = {c: all(_is_num(r.get(c)) or r.get(c) is None for r in rows) for c in cols}
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---:" if numeric[c] else "---" for c in cols) + "|")
    for r in rows:
        lines.append("| " + " | ".join(cells[c](r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def env_line(env: dict[str, Any]) -> str:
    """One line: where and when the numbers were measured."""
    threads = env.get("torch_threads", "?")
    dev = env.get("gpu") or (f"{env.get('cpu', '?')} ({env.get('cpu_count', '?')} cores, "
                             f"{threads} torch thread{'' if threads == 1 else 's'})")
    parts = [dev, f"torch {env.get('torch', '?')}"]
    if env.get("cuda"):
        parts.append(f"CUDA {env['cuda']}")
    if env.get("triton"):
        parts.append(f"triton {env['triton']}" + (" (interpreter)" if env.get("triton_interpret") == "1" else ""))
    parts.append(f"commit {str(env.get('commit', '?'))[:12]}" + (" with uncommitted changes"
                                                                  if str(env.get("commit", "")).endswith("-dirty")
                                                                  else ""))
    parts.append(str(env.get("date", "?")))
    return "Measured on " + ", ".join(parts) + "."


# ------------------------------------------------------------------------------ loading
def load_results(results_dir: Path = RESULTS_DIR) -> dict[str, Any]:
    """``{name: parsed JSON}`` for every ``*.json`` under ``results_dir``, name = path without
    ``.json`` relative to it (``cpu_optim``, ``gpu/bench_optim``); unreadable files map to
    ``{"unreadable": reason}``."""
    out: dict[str, Any] = {}
    for p in sorted(p for p in Path(results_dir).rglob("*.json") if p.is_file()):
        name = p.relative_to(results_dir).with_suffix("").as_posix()
        try:
            out[name] = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            out[name] = {"unreadable": str(e)}
    return out


def _is_result(data: Any) -> bool:
    return isinstance(data, dict) and "env" in data and "results" in data


def _is_runs(data: Any) -> bool:
    runs = data.get("runs") if isinstance(data, dict) else None
    return _is_keyed(runs) and all(isinstance(r.get("environment"), dict) for r in runs.values())


def _envs(data: Any) -> list[dict[str, Any]]:
    if _is_result(data):
        return [data["env"]] if isinstance(data["env"], dict) else []
    if _is_runs(data):
        return [r["environment"] for r in data["runs"].values()]
    return []


def _res(results: dict[str, Any], name: str) -> Any:
    """The ``results`` part of a write_result file, None when absent."""
    data = results.get(name)
    return data["results"] if _is_result(data) else None


def _where(env: dict[str, Any], threads: Any = None, extra: str = "") -> str:
    """The provenance cell of a timed claim: the device from the result's environment."""
    if env.get("gpu"):
        return f"GPU: {env['gpu']}" + (f", {extra}" if extra else "")
    n = env.get("torch_threads") if threads is None else threads
    t = f"{n} thread{'' if n == 1 else 's'}" if n is not None else ""
    return "CPU: " + ", ".join(x for x in (str(env.get("cpu", "?")), t, extra) if x)


def _pick_run(runs: dict[str, Any], prefer: str) -> tuple[str, Any]:
    """``runs[prefer]`` if there, else the first run (name, run)."""
    if prefer in runs:
        return prefer, runs[prefer]
    return next(iter(runs.items()))


def _threads_of(name: str) -> int | str:
    t = str(name).split("=")[-1]
    return int(t) if t.isdigit() else t


# ------------------------------------------------------------------------------ number words
def _x(v: float) -> str:
    return f"{v:.1f}x" if v >= 10 else f"{v:.2f}x"


def _ms(v: float) -> str:
    if v >= 100:
        return f"{v:.0f} ms"
    if v >= 10:
        return f"{v:.1f} ms"
    return f"{v:.2f} ms" if v >= 1 else f"{v:.3f} ms"


def _span(vals: list[float], unit: Callable[[float], str] = _x) -> str:
    lo, hi = min(vals), max(vals)
    a, b = unit(lo), unit(hi)
    return a if a == b else f"{a.rstrip('x')}-{b}" if unit is _x else f"{a}-{b}"


# ------------------------------------------------------------------------------ README claims
def claims_cheap(results: dict[str, Any]) -> list[Claim]:
    """bench_cheap: each variant's whole training step against AdamW's, over the models."""
    res = _res(results, "cheap_cpu")
    if not res:
        return []
    rows = res["rows"]
    env = results["cheap_cpu"]["env"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    out = []
    for v in dict.fromkeys(r["variant"] for r in rows):
        if v == "AdamW":
            continue
        vr = [r for r in rows if r["variant"] == v]
        passes = [r["passes_per_step"] for r in vr]
        what = f"{v} training step ({_span(passes, lambda p: f'{p:.2f}')} forward passes per step"
        frac = [r["perturbing_fraction"] for r in vr if r.get("perturbing_fraction") is not None]
        if frac and min(frac) < 0.995:
            what += f", SAM on {_span([100 * f for f in frac], lambda p: f'{p:.0f}')} % of steps"
        out.append((what + ")", _span([r["x_adamw"] for r in vr]) + " the time",
                    f"an AdamW step on the same model ({', '.join(models)})",
                    _where(env, res.get("torch_threads"))))
    return out


def claims_cpu_optim(results: dict[str, Any]) -> list[Claim]:
    """bench_cpu_optim: the cpp SAM step against the loop, foreach and its floor (1 thread: the
    2-thread medians of a shared VM are disturbed, both are in docs/performance.md)."""
    res = _res(results, "cpu_optim")
    if not res:
        return []
    name, run = _pick_run(res["by_threads"], "1")
    s = run["summary"]["median"]
    env = results["cpu_optim"]["env"]
    where = _where(env, _threads_of(name))
    what = 'SAM optimizer step, `backend="cpp"` (`first_step` + `second_step`, AdamW, ViT-B/16 fp32)'
    return [(what, f"{_x(s['loop_over_cpp'])} faster",
             f"a per-parameter loop (davda54/sam style); {_x(s['foreach_over_cpp'])} faster than "
             '`backend="foreach"`', where),
            ("the same step against its memory floor", f"{_x(s['cpp_over_floor'])} the floor's time",
             "12/7 of torch's fused AdamW step (12 parameter-sized passes against 7)", where)]


def claims_base_step(results: dict[str, Any]) -> list[Claim]:
    """bench_base_step: base_step() against torch's AdamW implementations."""
    res = _res(results, "base_step_cpu")
    if not res:
        return []
    name, run = _pick_run(res["runs"], "threads=1")
    m = {k: v["median_ms"] for k, v in run["methods"].items()}
    ours = m["fastsam base_step"]
    env = results["base_step_cpu"]["env"]
    return [("`SAM.base_step()`, the AdamW update after micro-batches (ViT-B/16 fp32)",
             f"{_x(m['torch default'] / ours)} faster",
             f"torch's default CPU AdamW (what it ran before); {_x(ours / m['torch fused'])} the time of "
             "torch's fused AdamW", _where(env, _threads_of(name)))]


def claims_msam(results: dict[str, Any]) -> list[Claim]:
    """bench_msam: the fused micro-batch restore + GSAM + accumulate."""
    res = _res(results, "msam_cpu")
    if not res:
        return []
    name, run = _pick_run(res["runs"], "threads=1")
    sp = run["per_round_median_speedup"]
    p = res.get("passes", {})
    env = results["msam_cpu"]["env"]
    return [('Per micro-batch: restore + GSAM combine + accumulate fused, `backend="cpp"` (ViT-B/16 fp32)',
             f"{_x(sp['cpp_gsam: unfused / fused'])} faster",
             f"the same as separate ops ({p.get('unfused_gsam', '?')} passes against {p.get('fused_gsam', '?')}); "
             f"without GSAM {_x(sp['cpp: unfused / fused'])} (the same {p.get('fused', '?')} passes)",
             _where(env, _threads_of(name)))]


def _host_rows(data: dict[str, Any], run: str) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(r["backend"], r["base"], r["model"]): r for r in data["runs"][run]["rows"]}


def claims_host(results: dict[str, Any]) -> list[Claim]:
    """bench_host: host time of a triton AdamW SAM step, first run against the last."""
    data = results.get("host_cpu")
    if not _is_runs(data):
        return []
    names = list(data["runs"])
    first, last = _host_rows(data, names[0]), _host_rows(data, names[-1])
    key_b, key_l = ("triton", "adamw", "vit_b16"), ("triton", "adamw", "vit_l16")
    if key_b not in last or key_l not in last:
        return []
    env = data["runs"][names[-1]]["environment"]
    b, lg = last[key_b]["step_ms"], last[key_l]["step_ms"]
    what = ('Host time of a `backend="triton"` SAM step, kernels stubbed (AdamW; ViT-B/16 '
            f"{last[key_b].get('tensors', '?')} tensors, ViT-L/16 {last[key_l].get('tensors', '?')})")
    number = f"ViT-B {_ms(b)}, ViT-L {_ms(lg)}"
    if len(names) > 1 and key_b in first and key_l in first:
        b0, l0 = first[key_b]["step_ms"], first[key_l]["step_ms"]
        against = (f"{_ms(b0)} and {_ms(l0)} in run `{names[0]}` ({_x(b0 / b)} and {_x(l0 / lg)} "
                   f"the time of run `{names[-1]}`)")
    else:
        against = f"nothing yet: run `{names[-1]}` is the only one recorded"
    return [(what, number, against, _where(env, extra="host code only"))]


def _triton_traffic(results: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]] | None:
    res = _res(results, "traffic_cpu")
    if not res or "optim" not in res:
        return None
    return {(r["dtype"], r["method"]): r for r in res["optim"]["rows"]}


def claims_traffic(results: dict[str, Any]) -> list[Claim]:
    """bench_traffic: bytes, kernels and memory of the SAM step and of the fused losses."""
    res = _res(results, "traffic_cpu")
    rows = _triton_traffic(results)
    out: list[Claim] = []
    if rows and ("float32", "fastsam_triton") in rows:
        t = rows[("float32", "fastsam_triton")]

        def other(method: str, label: str, kernels: bool = False) -> str:
            r = rows.get(("float32", method))
            if r is None:
                return ""
            k = f" in {r['kernels_first'] + r['kernels_second']} kernels" if kernels else ""
            return f"{label} {r['passes']:.2f} ({_x(r['passes'] / t['passes'])}){k}"

        against = "; ".join(x for x in (other("fastsam_foreach", '`backend="foreach"`'),
                                         other("loop", "per-parameter loop", kernels=True),
                                         other("pytorch_optimizer", "pytorch_optimizer.SAM")) if x)
        out.append(('Bytes of a `backend="triton"` SAM step (AdamW, fp32)',
                    f"{t['passes']:.2f} parameter-sized passes in {t['kernels_first'] + t['kernels_second']} kernels",
                    against + "; the floor is 12", "counted"))
        peaks = [(label, max(r["peak_first"], r["peak_second"])) for m, label in
                 (("fastsam_foreach", '`backend="foreach"`'), ("pytorch_optimizer", "pytorch_optimizer.SAM"),
                  ("loop", "loop")) if (r := rows.get(("float32", m)))]
        out.append(('Memory allocated inside a `backend="triton"` SAM step',
                    f"{max(t['peak_first'], t['peak_second']):.2f} parameter sizes",
                    ", ".join(f"{label} {p:.2f}" for label, p in peaks) + " (most alive at once)", "counted"))
    lo = (res or {}).get("losses")
    if lo and lo.get("rows"):
        fused = [r for r in lo["rows"] if str(r["method"]).endswith("/fused")]
        if fused:
            widths = sorted({r["C"] for r in lo["rows"]})
            dtypes = list(dict.fromkeys(r["dtype"] for r in lo["rows"]))
            out.append(("Fused OBF / BiSAM ascent losses, forward + backward",
                        f"{_span([r['bytes_vs_ce'] for r in fused])} the bytes, "
                        f"{_span([r['peak_vs_ce'] for r in fused])} the peak memory",
                        f"F.cross_entropy ({', '.join(dtypes)}; C = {widths[0]:,}-{widths[-1]:,})", "counted"))
    return out


def claims_gpu(results: dict[str, Any]) -> list[Claim]:
    """GPU predictions: counted bytes through the H200 model of bench/NOTES.md."""
    rows = _triton_traffic(results)
    if not rows or ("float32", "fastsam_triton") not in rows:
        return []

    def device_ms(dtype: str, method: str, eff: float) -> float | None:
        r = rows.get((dtype, method))
        size = 4 if dtype == "float32" else 2
        return None if r is None else 1e3 * r["passes"] * VIT_B_NUMEL * size / (eff * H200_COPY_BYTES_PER_S)

    tri = device_ms("float32", "fastsam_triton", EFFICIENCY_TRITON)
    fe = device_ms("float32", "fastsam_foreach", EFFICIENCY_TORCH)
    loop = device_ms("float32", "loop", EFFICIENCY_TORCH)
    assert tri is not None
    against = []
    if fe is not None:
        against.append(f'`backend="foreach"` ~{_ms(fe)} ({_x(fe / tri)})')
    if loop is not None:
        r = rows[("float32", "loop")]
        against.append(f"loop ~{_ms(loop)} + the host time of its {r['kernels_first'] + r['kernels_second']} launches")
    where = "GPU prediction"
    out = [('`backend="triton"` SAM step on an H200, ViT-B/16 fp32, device time',
            f"~{_ms(tri)}", "; ".join(against), where)]
    host = results.get("host_cpu")
    bf = device_ms("bfloat16", "fastsam_triton", EFFICIENCY_TRITON)
    if _is_runs(host) and bf is not None:
        names = list(host["runs"])
        last = _host_rows(host, names[-1]).get(("triton", "adamw", "vit_b16"))
        if last is not None:
            h = last["step_ms"]
            bound = "device-bound" if h < min(tri, bf) else "host-bound" if h > max(tri, bf) else "mixed"
            out.append(("The same step issued back to back (ViT-B/16)", f"{bound}: host {_ms(h)}",
                        f"predicted device time ~{_ms(tri)} (fp32), ~{_ms(bf)} (bf16)",
                        "GPU prediction; host time: CPU"))
    return out


CLAIMS: list[Callable[[dict[str, Any]], list[Claim]]] = [
    claims_cheap, claims_cpu_optim, claims_base_step, claims_msam, claims_host, claims_traffic, claims_gpu]


# ------------------------------------------------------------------------------ figures
def _plot_cheap(results: dict[str, Any]) -> dict[str, Any] | None:
    res = _res(results, "cheap_cpu")
    if not res:
        return None
    rows = res["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if v != "AdamW"]
    by = {(r["model"], r["variant"]): r for r in rows}
    return {"kind": "cheap", "models": models, "variants": variants,
            "x": [[by[(m, v)]["x_adamw"] if (m, v) in by else None for v in variants] for m in models],
            "passes": [[by[(m, v)]["passes_per_step"] for m in models if (m, v) in by] for v in variants],
            "title": "Training step time / AdamW's, same model",
            "xlabel": f"time per step / AdamW's ({_where(results['cheap_cpu']['env'], res.get('torch_threads'))}, "
                      "median)"}


def _plot_cpu_step(results: dict[str, Any]) -> dict[str, Any] | None:
    panels = []
    res = _res(results, "cpu_optim")
    if res:
        name, run = _pick_run(res["by_threads"], "1")
        m = run["methods"]
        names = [k for k in ("loop", "foreach", "cpp") if k in m]
        panels.append({"title": "SAM step (first_step + second_step)",
                       "labels": [{"loop": "loop (davda54)", "foreach": 'backend="foreach"',
                                   "cpp": 'backend="cpp"'}[k] for k in names],
                       "values": [m[k]["median_ms"] for k in names], "ours": [k == "cpp" for k in names],
                       "line": run["summary"]["median"]["floor_ms"], "line_label": "floor: 12/7 fused AdamW",
                       "cpu": _where(results["cpu_optim"]["env"], _threads_of(name))})
    res = _res(results, "base_step_cpu")
    if res:
        name, run = _pick_run(res["runs"], "threads=1")
        m = run["methods"]
        names = list(m)
        panels.append({"title": "AdamW update alone (base_step)",
                       "labels": names,
                       "values": [m[k]["median_ms"] for k in names], "ours": [k.startswith("fastsam") for k in names],
                       "line": None, "line_label": "",
                       "cpu": _where(results["base_step_cpu"]["env"], _threads_of(name))})
    if not panels:
        return None
    cpus = list(dict.fromkeys(p.pop("cpu") for p in panels))
    return {"kind": "bars", "panels": panels,
            "title": f"ViT-B/16 fp32 optimizer step, median ms ({'; '.join(cpus)})"}


def _plot_traffic(results: dict[str, Any]) -> dict[str, Any] | None:
    rows = _triton_traffic(results)
    if not rows:
        return None
    order = ["loop", "pytorch_optimizer", "fastsam_foreach", "fastsam_triton", "adamw_only"]
    labels = {"loop": "loop (davda54)", "pytorch_optimizer": "pytorch_optimizer.SAM",
              "fastsam_foreach": 'backend="foreach"', "fastsam_triton": 'backend="triton"',
              "adamw_only": "AdamW alone (torch foreach)"}
    methods = [m for m in order if ("float32", m) in rows]
    methods += [m for (d, m) in rows if d == "float32" and m not in methods]
    rs = [rows[("float32", m)] for m in methods]
    return {"kind": "traffic", "labels": [labels.get(m, m) for m in methods],
            "first": [r["passes_first"] for r in rs], "second": [r["passes_second"] for r in rs],
            "kernels": [f"{r['kernels_first']} + {r['kernels_second']}" for r in rs],
            "ours": [m == "fastsam_triton" for m in methods],
            "title": "Bytes per SAM step, AdamW base, fp32: counted (same on any machine)",
            "xlabel": "parameter-sized passes (bytes / parameter bytes); labels: kernels first + second step"}


def _plot_host(results: dict[str, Any]) -> dict[str, Any] | None:
    data = results.get("host_cpu")
    if not _is_runs(data):
        return None
    names = list(data["runs"])
    keys = list(dict.fromkeys(k for n in names for k in _host_rows(data, n) if k[2] != "slope"))
    vals = {n: [(_host_rows(data, n).get(k) or {}).get("step_ms") for k in keys] for n in names}
    env = data["runs"][names[-1]]["environment"]
    return {"kind": "host", "runs": names, "values": [vals[n] for n in names],
            "labels": [f"{b} {base} {m.replace('vit_b16', 'ViT-B').replace('vit_l16', 'ViT-L')}"
                       for b, base, m in keys],
            "title": "Host time per SAM step, kernels stubbed, median",
            "xlabel": f"ms per step ({_where(env, extra='host code only')})"}


PLOTS: dict[str, Callable[[dict[str, Any]], dict[str, Any] | None]] = {
    "perf_cheap.png": _plot_cheap, "perf_cpu_step.png": _plot_cpu_step,
    "perf_traffic.png": _plot_traffic, "perf_host.png": _plot_host}

_OURS, _OTHER = "#1f77b4", "#b0b0b0"


def digest(data: dict[str, Any]) -> str:
    """sha256 of a figure's data (and :data:`PLOT_VERSION`), independent of formatting."""
    return hashlib.sha256(json.dumps({"version": PLOT_VERSION, "data": data}, sort_keys=True,
                                     separators=(",", ":")).encode()).hexdigest()


def _draw(data: dict[str, Any], plt: Any) -> Any:
    kind = data["kind"]
    if kind == "bars":
        n = len(data["panels"])
        fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
        for ax, p in zip(axes[0], data["panels"]):
            y = range(len(p["values"]))
            ax.barh(list(y), p["values"], color=[_OURS if o else _OTHER for o in p["ours"]])
            for i, v in enumerate(p["values"]):
                ax.text(v, i, f" {v:.0f}", va="center", fontsize=8)
            if p["line"]:
                ax.axvline(p["line"], color="k", ls="--", lw=1, label=p["line_label"])
                ax.legend(fontsize=7, loc="lower right")
            ax.set_yticks(list(y), p["labels"], fontsize=8)
            ax.invert_yaxis()
            ax.set_xlim(0, 1.25 * max(p["values"]))
            ax.set_xlabel("ms per step (median)", fontsize=8)
            ax.set_title(p["title"], fontsize=9)
        fig.suptitle(data["title"], fontsize=9)
    elif kind == "cheap":
        fig, ax = plt.subplots(figsize=(7.2, 4.2))
        nm, nv = len(data["models"]), len(data["variants"])
        h = 0.8 / nm
        colors = plt.get_cmap("tab10").colors
        for j, (model, xs) in enumerate(zip(data["models"], data["x"])):
            ys = [i + (j - (nm - 1) / 2) * h for i in range(nv)]
            ax.barh(ys, [x or 0 for x in xs], height=h, color=colors[j % 10], label=model)
            for yy, x in zip(ys, xs):
                if x is not None:
                    ax.text(x, yy, f" {x:.2f}", va="center", fontsize=7)
        ax.axvline(1.0, color="k", lw=1)
        ax.axvline(2.0, color="k", ls=":", lw=1)
        labels = [f"{v}\n{min(p):.2f}-{max(p):.2f} passes" if p and max(p) - min(p) > 0.005 else
                  f"{v}\n{p[0]:.2f} passes" if p else v for v, p in zip(data["variants"], data["passes"])]
        ax.set_yticks(range(nv), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.4 * max(x for xs in data["x"] for x in xs if x is not None))
        ax.set_xlabel(data["xlabel"], fontsize=8)
        ax.set_title(data["title"] + "; solid: AdamW, dotted: two passes", fontsize=9)
        ax.legend(fontsize=7, loc="center right")
    elif kind == "traffic":
        fig, ax = plt.subplots(figsize=(7.2, 3.6))
        y = list(range(len(data["labels"])))
        ours = [_OURS if o else _OTHER for o in data["ours"]]
        ax.barh(y, data["first"], color=ours, label="first_step")
        ax.barh(y, data["second"], left=data["first"], color=ours, alpha=0.55, hatch="//", label="second_step")
        for i, (a, b, k) in enumerate(zip(data["first"], data["second"], data["kernels"])):
            ax.text(a + b, i, f" {a + b:.2f} ({k} kernels)", va="center", fontsize=7)
        ax.axvline(12, color="k", ls="--", lw=1, label="floor: 12 passes")
        ax.set_yticks(y, data["labels"], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.45 * max(a + b for a, b in zip(data["first"], data["second"])))
        ax.set_xlabel(data["xlabel"], fontsize=8)
        ax.set_title(data["title"], fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    elif kind == "host":
        fig, ax = plt.subplots(figsize=(7.2, 3.8))
        nr, nl = len(data["runs"]), len(data["labels"])
        h = 0.8 / nr
        colors = [_OTHER, _OURS] if nr == 2 else plt.get_cmap("tab10").colors
        for j, (run, vs) in enumerate(zip(data["runs"], data["values"])):
            ys = [i + (j - (nr - 1) / 2) * h for i in range(nl)]
            ax.barh(ys, [v or 0 for v in vs], height=h, color=colors[j % len(colors)], label=f"run {run}")
            for yy, v in zip(ys, vs):
                if v is not None:
                    ax.text(v, yy, f" {v:.2f}", va="center", fontsize=7)
        ax.set_yticks(range(nl), data["labels"], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.15 * max(v for vs in data["values"] for v in vs if v is not None))
        ax.set_xlabel(data["xlabel"], fontsize=8)
        ax.set_title(data["title"], fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    else:
        raise ValueError(f"unknown figure kind {kind!r}")
    fig.tight_layout()
    return fig


def save_figure(data: dict[str, Any], path: Path) -> bool:
    """Draw ``data`` into ``path`` (fixed size and dpi, no software tag, the data's digest in a
    :data:`PNG_KEY` text chunk). False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    with plt.rc_context({"svg.hashsalt": "fastsam", "font.family": "DejaVu Sans"}):
        fig = _draw(data, plt)
        fig.savefig(path, dpi=100, metadata={"Software": None, PNG_KEY: digest(data)})
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------ docs/performance.md
def doc_cheap(res: dict[str, Any]) -> str:
    rows = [{"model": r["model"], "params": r.get("params"), "variant": r["variant"], "ms / step": r["ms_per_step"],
             "x AdamW": r["x_adamw"], "passes / step": r["passes_per_step"],
             "SAM steps": r.get("perturbing_fraction"), "backend": r.get("backend", "")} for r in res["rows"]]
    cap = (f"Median over {res.get('rounds', '?')} rounds of {res.get('steps_per_round', '?')} steps each; "
           "`SAM steps`: fraction of steps that perturbed (two passes; MSAM perturbs every step, from the "
           "momentum, in one pass).\n\n")
    return cap + table(rows)


def doc_cpu_micro(res: dict[str, Any]) -> str:
    rows = res.get("rows", [])
    out = []
    opt = [r for r in rows if r.get("group") == "optimizer_step"]
    if opt:
        impls = list(dict.fromkeys(r["impl"] for r in opt))
        keys = list(dict.fromkeys((r["param_set"], r["options"]) for r in opt))
        out.append("`first_step()` + `second_step()` (AdamW base, gradients given), median ms of the rounds (each "
                   "round the mean of several calls; min, mean and IQR are in the JSON); `adamw_only` is one plain "
                   "torch AdamW step for scale.\n")
        trows = []
        for ps, o in keys:
            by = {r["impl"]: r for r in opt if r["param_set"] == ps and r["options"] == o}
            first = next(iter(by.values()))
            row: dict[str, Scalar] = {"parameter set": ps, "params": first.get("numel"),
                                      "tensors": first.get("tensors"), "options": o}
            row.update({i: by[i]["median_ms"] if i in by else None for i in impls})
            if "reference" in by and "cpp" in by:
                row["reference / cpp"] = by["reference"]["median_ms"] / by["cpp"]["median_ms"]
            trows.append(row)
        out += [table(trows), ""]
    load = res.get("loadavg_1min")
    if isinstance(load, dict) and load.get("before") is not None:
        out.append(f"1-minute load average of the machine: {load['before']} before, {load.get('after')} after "
                   "(above 0, other processes shared the cores).\n")
    tr = [r for r in rows if r.get("group") == "train_step"]
    if tr:
        first = tr[0]
        two = next((r["median_ms"] for r in tr if r.get("kind") == "two_passes_adamw"), None)
        out.append(f"One training step of the demo's {first.get('model')} ({fmt(first.get('params'))} params, "
                   f"batch {first.get('batch')}), median ms. `two_passes_adamw`: two forward/backward passes + torch "
                   "AdamW, what any SAM step must cost; `manual_sam`: the same SAM step written with `first_step` / "
                   "`second_step`; `sam_step`: `fastsam.sam_step`.\n")
        out.append(table([{"step": r.get("kind"), "backend": r.get("backend", ""), "median ms": r["median_ms"],
                           "x two passes + AdamW": r["median_ms"] / two if two else None} for r in tr]))
    return "\n".join(out)


def doc_cpu_optim(res: dict[str, Any]) -> str:
    out = [f"{res.get('model', '?')}: {fmt(res.get('num_params'))} {res.get('dtype', '')} parameters in "
           f"{res.get('num_tensors', '?')} tensors; base {res.get('base_optimizer', '?')}; {res.get('rounds', '?')} "
           "rounds, methods interleaved. `floor passes`: the minimum parameter-sized passes of the work (12 for a "
           "SAM step, whatever a method really moves: `traffic_cpu` counts those); GB/s = floor bytes / median.\n"]
    rows, summ = [], []
    for t, run in res["by_threads"].items():
        lb = run.get("loadavg_before_after")
        for m, v in run["methods"].items():
            rows.append({"threads": _threads_of(t), "method": m, "median ms": v["median_ms"], "min ms": v["min_ms"],
                         "max ms": v.get("max_ms"), "floor passes": v.get("passes"), "GB/s": v.get("gb_per_s"),
                         "load before / after": " / ".join(map(str, lb)) if isinstance(lb, list) else None})
        for stat, s in run.get("summary", {}).items():
            if stat == "targets":
                continue
            summ.append({"threads": _threads_of(t), "statistic": stat.replace("_", " "), "floor ms": s.get("floor_ms"),
                         "cpp / floor": s.get("cpp_over_floor"), "loop / cpp": s.get("loop_over_cpp"),
                         "foreach / cpp": s.get("foreach_over_cpp")})
    out += [table(rows), ""]
    tg = next((run["summary"].get("targets") for run in res["by_threads"].values() if "summary" in run), None)
    if summ:
        out.append("Ratios (floor = 12/7 of `adamw_fused`'s time" + (
            f"; targets: loop / cpp >= {tg.get('loop_over_cpp_min')}, cpp / floor <= {tg.get('cpp_over_floor_max')}"
            if tg else "") + "):\n")
        out.append(table(summ))
    return "\n".join(out)


def doc_base_step(res: dict[str, Any]) -> str:
    rows = []
    for t, run in res["runs"].items():
        ours = run["methods"].get("fastsam base_step", {}).get("median_ms")
        for m, v in run["methods"].items():
            rows.append({"threads": _threads_of(t), "method": m, "median ms": v["median_ms"], "min ms": v["min_ms"],
                         "GB/s (7 passes, median)": v.get("gb_per_s_7_passes"),
                         "x base_step (median)": v["median_ms"] / ours if ours else None})
    cap = (f"{res.get('model', '?')}, {fmt(res.get('numel'))} parameters, backend {res.get('backend', '?')}, "
           f"{res.get('rounds', '?')} interleaved rounds.\n\n")
    return cap + table(rows)


def doc_msam(res: dict[str, Any]) -> str:
    rows, sp = [], []
    for t, run in res["runs"].items():
        for m, v in run["methods"].items():
            rows.append({"threads": _threads_of(t), "method": m, "median ms": v["median_ms"], "min ms": v["min_ms"],
                         "passes": v.get("passes"), "GB/s": v.get("gb_per_s")})
        for k, v in run.get("per_round_median_speedup", {}).items():
            sp.append({"threads": _threads_of(t), "comparison": k, "median over rounds": v})
    cap = (f"{res.get('model', '?')}, {fmt(res.get('numel'))} parameters, {res.get('rounds', '?')} interleaved "
           f"rounds, device {res.get('device', '?')}; GB/s = passes x parameter bytes / median.\n\n")
    tail = "\n\nSpeed-up of the fused op, per round then the median:\n\n" + table(sp) if sp else ""
    return cap + table(rows) + tail


def doc_losses(res: dict[str, Any]) -> str:
    rows = [{"B x C": f"{r['B']} x {r['C']}", "dtype": r.get("dtype"), "method": r["method"], "ms": r["ms"],
             "peak MB": r.get("peak_mb"), "time / F.ce": r.get("time_vs_ce"), "peak / F.ce": r.get("mem_vs_ce")}
            for r in res["rows"]]
    cap = f"{res.get('iters', '?')} timed calls after {res.get('warmup', '?')} warm-up; device {res.get('device')}."
    return cap + "\n\n" + table(rows)


def doc_traffic(res: dict[str, Any]) -> str:
    out = render_traffic(res)
    if res.get("losses"):
        full = render_traffic({"losses": res["losses"]}, full=True).strip("\n")
        out += f"\n<details><summary>The losses at every width</summary>\n\n{full}\n\n</details>\n"
    return out


def doc_host(data: dict[str, Any]) -> str:
    names = list(data["runs"])
    out = []
    for n in names:
        run = data["runs"][n]
        la = run.get("load_average")
        out.append(f"Run `{n}`: {env_line(run['environment'])} {run.get('steps', '?')} steps"
                   + (f"; load average {', '.join(f'{x:.2f}' for x in la)}" if isinstance(la, list) else "") + ".")
    out.append("")
    rows_by = {n: _host_rows(data, n) for n in names}
    keys = list(dict.fromkeys(k for n in names for k in rows_by[n]))
    steps, slopes = [], []
    for k in keys:
        if k[2] == "slope":
            for n in names:
                r = rows_by[n].get(k)
                if r:
                    slopes.append({"backend": k[0], "base": k[1], "run": n, "us / tensor": r.get("us_per_tensor"),
                                   "fixed ms": r.get("fixed_ms"), "ViT-L / ViT-B": r.get("l_over_b")})
            continue
        tensors = next((rows_by[n][k].get("tensors") for n in names if k in rows_by[n]), None)
        row: dict[str, Scalar] = {"backend": k[0], "base": k[1], "model": k[2], "tensors": tensors}
        for n in names:
            row[f"step ms ({n})"] = (rows_by[n].get(k) or {}).get("step_ms")
        a, b = (rows_by[names[0]].get(k) or {}).get("step_ms"), (rows_by[names[-1]].get(k) or {}).get("step_ms")
        if len(names) > 1:
            row[f"{names[0]} / {names[-1]}"] = a / b if a and b else None
        last = rows_by[names[-1]].get(k) or {}
        row[f"first ms ({names[-1]})"], row[f"second ms ({names[-1]})"] = last.get("first_ms"), last.get("second_ms")
        steps.append(row)
    out += [table(steps), "", "Per-tensor slope and fixed cost (a line through the ViT-B and ViT-L points):", "",
            table(slopes)] if slopes else [table(steps)]
    ss = [{"run": n, "backend": b, "tensors": v.get("tensors"), "manual ms": v.get("manual_ms"),
           "sam_step ms": v.get("sam_step_ms"), "overhead ms": v.get("overhead_ms")}
          for n in names for b, v in (data["runs"][n].get("sam_step") or {}).items()]
    if ss:
        out += ["", "`fastsam.sam_step` against the same step written by hand (TinyViT-sized parameter set):", "",
                table(ss)]
    return "\n".join(out)


DOCS: dict[str, tuple[str, Callable[[Any], str]]] = {
    "cheap_cpu": ("Whole training steps (forward, backward, optimizer) of SAM and the cheaper variants through "
                  "`fastsam.sam_step`, against a plain AdamW step on the same model in the same process, "
                  "interleaved round by round (`python -m bench.bench_cheap`).", doc_cheap),
    "cpu_optim": ("One SAM optimizer step (`first_step()` + `second_step()`, AdamW base, gradients given) on the "
                  "ViT-B/16 parameter set for each implementation; `adamw_fused` (torch's fused AdamW step alone, "
                  "7 passes) and `copy` (a parameter copy, 2 passes) for scale (`bench/bench_cpu_optim.py`).",
                  doc_cpu_optim),
    "base_step_cpu": ("`SAM.base_step()`, the base optimizer's update that `sam_step` runs after micro-batches, "
                      "against torch's CPU AdamW implementations; `torch default` is what it ran before "
                      "(`bench/bench_base_step.py`).", doc_base_step),
    "msam_cpu": ("The optimizer work per micro-batch of `sam_step(micro_batch=...)`: restore w, GSAM combine "
                 "(`_gsam` rows), add the gradient into the running sum; `unfused` = restore + a foreach add, "
                 "`fused` = one sweep (`python -m bench.bench_msam`).", doc_msam),
    "host_cpu": ("Host time (Python and launch preparation) of one SAM step with the kernels stubbed, so no device "
                 "work: what a GPU step costs the CPU, on parameter lists with ViT-B/16 and ViT-L/16 tensor counts "
                 "(`bench/bench_host.py`).", doc_host),
    "traffic_cpu": ("Counted, not timed: bytes (in parameter-sized passes), kernels and memory of one SAM step and "
                    "of the ascent losses, from the code that runs on the GPU (`python -m bench.bench_traffic`); the "
                    "same numbers on any machine.", doc_traffic),
    "losses_cpu": ("The ascent losses forward + backward on CPU: their eager PyTorch formula against "
                   "F.cross_entropy. The fused Triton losses run on a GPU only and are not in this table "
                   "(`python -m bench.bench_losses`).", doc_losses),
    "cpu_micro": ("pytest-benchmark micro-benchmarks (`bench/test_bench_cpu.py`): the SAM optimizer step per "
                  "backend on small parameter sets, and one training step of the demo's TinyViT.", doc_cpu_micro),
}


def render_file(name: str, data: Any) -> str:
    """The ``### name`` section of ``docs/performance.md`` for one result file ('' if it is not a
    benchmark result)."""
    src = f"`bench/results/{name}.json`"
    if isinstance(data, dict) and "unreadable" in data and len(data) == 1:
        return f"### {name}\n\n{src} is unreadable: {data['unreadable']}\n"
    sentence, render = DOCS.get(name, ("", None))
    if _is_result(data):
        res = data["results"]
        head = env_line(data["env"]) + f" Source: {src}."
        if render is not None:
            body = render(res)
        else:
            rows = [{k: v for k, v in r.items() if k != "note"} for r in find_rows(res)]
            body = table(rows)
            if not body:
                scal = {k: v for k, v in res.items() if _is_scalar(v) and k != "note"} if isinstance(res, dict) else {}
                body = table([scal]) if scal else "(no table in this result)"
        note = res.get("note") if isinstance(res, dict) and isinstance(res.get("note"), str) else ""
    elif _is_runs(data):
        head = f"Source: {src}."
        body = render(data) if render is not None else "\n\n".join(
            f"Run `{n}`: {env_line(r['environment'])}\n\n" + table(find_rows(r)) for n, r in data["runs"].items())
        note = data.get("note") if isinstance(data.get("note"), str) else ""
    else:
        return ""
    parts = [f"### {name}", ""]
    if sentence:
        parts += [sentence, ""]
    parts += [head, ""]
    if note:
        parts += [f"Note recorded with the result: {note}", ""]
    parts += [body.rstrip("\n"), ""]
    return "\n".join(parts)


def build_block(results_dir: Path = RESULTS_DIR) -> str:
    """Every result file as tables (the body of ``docs/performance.md``), sorted by name."""
    results = load_results(results_dir)
    sections = [s for s in (render_file(n, d) for n, d in results.items()) if s]
    return "\n".join(sections) if sections else "No results yet.\n"


def build_performance_md(results: dict[str, Any], figures: list[str]) -> str:
    head = ["# Performance: every benchmark result", "",
            "_Generated by `python -m bench.make_tables` from the JSON files in `bench/results/`; regenerate, do "
            "not edit by hand (`python -m bench.make_tables --check` fails when this file is stale). The summary "
            "is in the README's \"Performance\" section; `python -m bench.run_all` re-measures._", "",
            "Timed results are wall-clock times on the machine named above each table (a CPU unless it names a "
            "GPU); on a shared machine other load only adds time, so compare rows of one table (measured in one "
            "process, rounds interleaved) rather than rows of different tables. Counted "
            "results (`traffic_cpu`) are exact counts of bytes, kernels and memory. No GPU result exists yet "
            "unless a table below names a GPU; the GPU predictions are in `bench/NOTES.md`.", ""]
    if figures:
        head += [" ".join(f"![{f}]({f})" for f in figures), ""]
    sections = [s for s in (render_file(n, d) for n, d in results.items()) if s]
    return "\n".join(head) + "\n" + ("\n".join(sections) if sections else "No results yet.\n")


# ------------------------------------------------------------------------------ README block
def _wrap(text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, break_long_words=False, break_on_hyphens=False) or [""]


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def build_summary(results: dict[str, Any], figures: list[str], docs_rel: str = "docs") -> str:
    """The README block (without the markers)."""
    claims = [c for f in CLAIMS for c in f(results)]
    envs = [e for d in results.values() for e in _envs(d)]
    cpus = list(dict.fromkeys(f"{e.get('cpu', '?')} ({e.get('cpu_count', '?')} cores), torch {e.get('torch', '?')}"
                              for e in envs if not e.get("gpu")))
    gpus = list(dict.fromkeys(str(e["gpu"]) for e in envs if e.get("gpu")))
    out = _wrap(f"_Generated by `python -m bench.make_tables` from the JSON files in `bench/results/`; regenerate, "
                f"do not edit by hand. Every table, with the machine, commit and date of each run: "
                f"[{docs_rel}/{PERF_MD}]({docs_rel}/{PERF_MD})._")
    out.append("")
    kinds = ("Where each number comes from (last column): **CPU**: timed on the CPU named there"
             + (f" (the runs so far: {'; '.join(cpus)})" if cpus else "")
             + ", medians; what one row compares ran in one process with the rounds interleaved, except host "
             "time (separate runs before and after the change). **counted**: bytes moved, "
             "kernels launched and memory held, counted on CPU by `bench/traffic.py` from the code a GPU runs "
             "(the same on any machine). **GPU prediction**: not measured, ")
    if gpus:
        kinds += (f"although GPU results exist ({', '.join(gpus)}: in {docs_rel}/{PERF_MD}, not yet compared "
                  "here): ")
    else:
        kinds += "no GPU run exists yet: "
    kinds += (f"counted bytes at {EFFICIENCY_TRITON:.0%} (fastsam triton) or {EFFICIENCY_TORCH:.0%} (torch) of "
              f"an H200's {H200_COPY_BYTES_PER_S / 1e12:.1f} TB/s copy bandwidth, the model of `bench/NOTES.md`, "
              "\"H200 predictions\".")
    out += _wrap(kinds.replace("%", " %"))
    out.append("")
    if claims:
        out += ["| what | number | against | where |", "|---|---|---|---|"]
        out += ["| " + " | ".join(_md_cell(x) for x in c) + " |" for c in claims]
    else:
        out.append("No results yet.")
    if figures:
        out.append("")
        out += [" ".join(f'<img src="{docs_rel}/{f}" alt="{f}" width="49%">' for f in figures[i:i + 2])
                for i in range(0, len(figures), 2)]
    return "\n".join(out) + "\n"


def replace_block(text: str, block: str) -> str | None:
    """``text`` with the markers' content replaced by ``block``; None when the markers are missing."""
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < 0 or j < i:
        return None
    return text[: i + len(BEGIN)] + "\n" + block.rstrip("\n") + "\n" + text[j:]


# ------------------------------------------------------------------------------ outputs and check
def outputs(results_dir: Path = RESULTS_DIR, readme: Path = README, docs: Path = DOCS_DIR
            ) -> tuple[str, str, dict[str, dict[str, Any] | None]]:
    """(README block, docs/performance.md text, {figure file: its data or None}) for ``results_dir``."""
    results = load_results(results_dir)
    plots = {name: f(results) for name, f in PLOTS.items()}
    figures = [n for n, d in plots.items() if d is not None]
    docs_rel = Path(os.path.relpath(Path(docs).resolve(), Path(readme).resolve().parent)).as_posix()
    return build_summary(results, figures, docs_rel), build_performance_md(results, figures), plots


def stale_reasons(results_dir: Path = RESULTS_DIR, readme: Path = README, docs: Path = DOCS_DIR) -> list[str]:
    """Why the README block, ``docs/performance.md`` or a figure is not what the results give
    (empty: all current). Figures are compared by the digest of their data, not by pixels."""
    block, perf, plots = outputs(results_dir, readme, docs)
    why = []
    text = Path(readme).read_text() if Path(readme).exists() else ""
    new = replace_block(text, block)
    if new is None:
        why.append(f"{readme} has no {BEGIN} ... {END} block")
    elif new != text:
        why.append(f"{readme}: the performance block is not generated from the results")
    md = Path(docs) / PERF_MD
    if not md.exists() or md.read_text() != perf:
        why.append(f"{md} is {'stale' if md.exists() else 'missing'}")
    for name, data in plots.items():
        png = Path(docs) / name
        if data is None:
            if png.exists():
                why.append(f"{png}: no result to draw it from any more (delete it)")
            continue
        if not png.exists():
            why.append(f"{png} is missing")
            continue
        try:
            have = png_text(png).get(PNG_KEY)
        except ValueError as e:
            why.append(str(e))
            continue
        except OSError as e:
            why.append(f"{png}: {e}")
            continue
        if have != digest(data):
            why.append(f"{png} was not drawn from the current results")
    return why


def write_outputs(results_dir: Path = RESULTS_DIR, readme: Path = README, docs: Path = DOCS_DIR) -> list[str]:
    """Rewrite what is stale; returns what was written (messages). Raises when matplotlib is
    missing and a figure must be drawn."""
    block, perf, plots = outputs(results_dir, readme, docs)
    done = []
    readme = Path(readme)
    text = readme.read_text() if readme.exists() else ""
    new = replace_block(text, block)
    if new is None:
        done.append(f"{readme}: markers {BEGIN} / {END} not found; README left alone")
    elif new != text:
        readme.write_text(new)
        done.append(f"updated {readme} ({block.count(chr(10))} lines between the markers)")
    Path(docs).mkdir(parents=True, exist_ok=True)
    md = Path(docs) / PERF_MD
    if not md.exists() or md.read_text() != perf:
        md.write_text(perf)
        done.append(f"wrote {md}")
    for name, data in plots.items():
        png = Path(docs) / name
        if data is None:
            if png.exists():
                png.unlink()
                done.append(f"removed {png} (no result to draw it from)")
            continue
        try:
            current = png.exists() and png_text(png).get(PNG_KEY) == digest(data)
        except (OSError, ValueError):
            current = False
        if not current:
            if not save_figure(data, png):
                raise RuntimeError(f"{png} needs matplotlib (pip install matplotlib)")
            done.append(f"drew {png}")
    return done


# ------------------------------------------------------------------------------ <name>.md siblings
MD_MARK = "<!-- generated by bench/make_tables.py from the JSON next to this file -->"


def write_markdown(results_dir: Path = RESULTS_DIR) -> list[Path]:
    """``<name>.md`` next to every result JSON (its ``docs/performance.md`` section). A
    benchmark that writes its own ``.md`` (no ``MD_MARK`` line) keeps it; ours are rewritten when
    they changed. Returns the files written. Run by ``--siblings`` only."""
    written = []
    for name, data in load_results(results_dir).items():
        section = render_file(name, data)
        if not section:
            continue
        md = (Path(results_dir) / name).with_suffix(".md")
        if md.exists() and MD_MARK not in md.read_text():
            continue
        text = MD_MARK + "\n\n" + section
        if not md.exists() or md.read_text() != text:
            md.write_text(text)
            written.append(md)
    return written


def render_traffic(results: dict[str, Any], full: bool = False) -> str:
    """``bench_traffic`` (bytes / kernels / memory counted on CPU). ``full``: every loss width (the
    ``.md`` next to the JSON); else one loss row per (dtype, method), min-max over the widths."""
    lines: list[str] = []
    if "optim" in results:
        o = results["optim"]
        lines += [f"SAM step (`first_step` + `second_step`), AdamW base, {o['set']} ({o['tensors']} tensors, "
                  f"{o['numel']:,} parameters). Passes = bytes / parameter bytes (the fused floor is 12); "
                  "kernels = ATen ops + Triton launches (a `_foreach_` op counted once); allocated = most "
                  "memory allocated in the step and alive at once, in passes.", "",
                  "| dtype | method | kernels first + second | passes first + second | passes | "
                  "bytes / triton's | allocated first / second |", "|---|---|---|---|---:|---:|---|"]
        tri = {r["dtype"]: r["passes"] for r in o["rows"] if r["method"] == "fastsam_triton"}
        for r in o["rows"]:
            ratio = f"{r['passes'] / tri[r['dtype']]:.2f}" if r["dtype"] in tri else ""
            lines.append(f"| {r['dtype']} | {r['method']} | {r['kernels_first']} + {r['kernels_second']} | "
                         f"{r['passes_first']:.2f} + {r['passes_second']:.2f} | {r['passes']:.2f} | {ratio} | "
                         f"{r['peak_first']:.2f} / {r['peak_second']:.2f} |")
        lines += ["", f"{o['options_set']}, one option at a time (index loads: the kernels' address-table "
                  "reads, not in the passes):", "",
                  "| options | kernels first + second | passes first + second | passes | index loads (passes) |",
                  "|---|---|---|---:|---:|"]
        for r in o["options"]:
            lines.append(f"| {r['options']} | {r['kernels_first']} + {r['kernels_second']} | "
                         f"{r['passes_first']:.2f} + {r['passes_second']:.2f} | {r['passes']:.2f} | "
                         f"{r['index_passes']:.3f} |")
    if "losses" in results:
        lo = results["losses"]
        lines += ["", "Loss forward + backward (`reduction=\"mean\"`): passes and peak memory (the logits' "
                  "gradient included) in units of B x C x itemsize; the CPU-only target check "
                  f"({lo['cpu_only_check_ops_subtracted']} small ops, skipped on GPU) subtracted.", ""]
        if full:
            lines += ["| dtype | C | method | kernels | passes | bytes / CE's | peak | peak / CE's |",
                      "|---|---:|---|---:|---:|---:|---:|---:|"]
            for r in lo["rows"]:
                lines.append(f"| {r['dtype']} | {r['C']} | {r['method']} | {r['kernels']} | {r['passes']:.2f} | "
                             f"{r['bytes_vs_ce']:.2f} | {r['peak_passes']:.2f} | {r['peak_vs_ce']:.2f} |")
        else:
            widths = sorted({r["C"] for r in lo["rows"]})
            lines += [f"Min-max over C in {widths}.", "",
                      "| dtype | method | kernels | passes | bytes / CE's | peak | peak / CE's |",
                      "|---|---|---:|---:|---:|---:|---:|"]
            groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for r in lo["rows"]:
                groups.setdefault((r["dtype"], r["method"]), []).append(r)

            def span(rows: list[dict[str, Any]], key: str) -> str:
                lo_, hi = min(r[key] for r in rows), max(r[key] for r in rows)
                return f"{lo_:.2f}" if hi - lo_ < 0.005 else f"{lo_:.2f}-{hi:.2f}"

            for (dtype, method), rows in groups.items():
                k = sorted({r["kernels"] for r in rows})
                lines.append(f"| {dtype} | {method} | {'-'.join(map(str, (k[0], k[-1]) if len(k) > 1 else k))} | "
                             f"{span(rows, 'passes')} | {span(rows, 'bytes_vs_ce')} | {span(rows, 'peak_passes')} | "
                             f"{span(rows, 'peak_vs_ce')} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    """Rewrite (or print, or check) the README block, docs/performance.md and the figures;
    returns the exit status."""
    p = argparse.ArgumentParser(description="Regenerate the README performance summary, docs/performance.md and "
                                            "docs/perf_*.png from bench/results.")
    p.add_argument("--results", default=str(RESULTS_DIR), help="results directory (default bench/results)")
    p.add_argument("--readme", default=str(README), help="README to update (default README.md)")
    p.add_argument("--docs", default=str(DOCS_DIR), help="folder of performance.md and the figures (default docs)")
    p.add_argument("--stdout", action="store_true", help="print the README block, write nothing")
    p.add_argument("--check", action="store_true", help="exit 1 if the block, performance.md or a figure is stale")
    p.add_argument("--siblings", action="store_true", help="also rewrite the generated <name>.md next to each JSON")
    args = p.parse_args(argv)
    results_dir, readme, docs = Path(args.results).resolve(), Path(args.readme), Path(args.docs)
    if args.stdout:
        print(outputs(results_dir, readme, docs)[0], end="")
        return 0
    if args.check:
        why = stale_reasons(results_dir, readme, docs)
        for w in why:
            print(f"stale: {w}", file=sys.stderr)
        if why:
            print("run: python -m bench.make_tables", file=sys.stderr)
        return 1 if why else 0
    try:
        done = write_outputs(results_dir, readme, docs)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    for line in done or ["README block, docs/performance.md and figures already up to date"]:
        print(line)
    if args.siblings:
        for md in write_markdown(results_dir):
            print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
