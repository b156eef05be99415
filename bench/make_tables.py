"""Regenerate the README "Performance" block from the committed benchmark results.

::

    python -m bench.make_tables            # rewrite README.md between the perf markers, and the
                                           # <name>.md table next to each result JSON
    python -m bench.make_tables --stdout   # print the block only
    python -m bench.make_tables --check    # exit 1 if README.md is not up to date (for CI)

Reads every ``*.json`` under ``bench/results/`` (subfolders too, e.g. ``gpu/`` from the GPU
suite) written by :func:`bench._env.write_result` (``{"env": ..., "results": ...}``) and
renders one markdown table per file, headed by the environment it was measured in (CPU or GPU
model, torch, triton, CUDA, commit, date). Only the text between ``<!-- perf:begin -->`` and
``<!-- perf:end -->`` is replaced; without those markers README.md is left alone and the block
is printed. Every number in the block comes from a result file.

Known result files get a purpose-built table (``cpu_micro``, this repository's pytest-benchmark
micro-benchmarks); any other layout is rendered generically by :func:`find_rows`: lists of row
dicts (``rows``, ``cases``, ...) and ``{name: {...}}`` dicts are expanded level by level, the
scalars of every level become columns, and columns that are constant over all rows become a
caption line above the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR.parent / "README.md"
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
MAX_COLUMNS = 12  # wider tables do not read on GitHub

Scalar = str | int | float | bool | None


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def fmt(v: Any) -> str:
    """A cell: 4 significant digits for floats, thousands separators for large ints."""
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
    parts.append(f"commit {str(env.get('commit', '?'))[:12]}")
    parts.append(str(env.get("date", "?")))
    return "Measured on " + ", ".join(parts) + "."


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
    """Markdown table of ``rows``; constant columns go to a caption line above it."""
    if not rows:
        return ""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    constant = {c: rows[0].get(c) for c in columns
                if len(rows) > 1 and all(r.get(c) == rows[0].get(c) for r in rows)}
    cols = [c for c in columns if c not in constant][:MAX_COLUMNS]
    lines = []
    if constant:
        lines.append("; ".join(f"{c}: {fmt(v)}" for c, v in constant.items() if v is not None) + "\n")
    numeric = {c: all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in cols}
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---:" if numeric[c] else "---" for c in cols) + "|")
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def render_cpu_micro(results: dict[str, Any]) -> str:
    """bench/test_bench_cpu.py: optimizer step per backend, and the training-step overhead."""
    rows = results.get("rows", [])
    out = []
    opt = [r for r in rows if r.get("group") == "optimizer_step"]
    if opt:
        impls = list(dict.fromkeys(r["impl"] for r in opt))
        keys = list(dict.fromkeys((r["param_set"], r["options"]) for r in opt))
        out.append("`first_step()` + `second_step()` (AdamW base, gradients given), ms: the fastest round "
                   "(each round the mean of several calls; on a shared machine other processes only add time, so "
                   "the minimum is the steadiest estimate; medians are in the JSON); `adamw_only` is one plain "
                   "AdamW step for scale.\n")
        head = ["parameter set", "options", *impls]
        if "reference" in impls and "foreach" in impls:
            head.append("reference / foreach")
        out.append("| " + " | ".join(head) + " |")
        out.append("|---|---|" + "---:|" * (len(head) - 2))
        for ps, o in keys:
            by = {r["impl"]: r for r in opt if r["param_set"] == ps and r["options"] == o}
            first = next(iter(by.values()))
            cells = [f"{ps} ({fmt(first.get('numel'))} params, {first.get('tensors')} tensors)", o]
            cells += [fmt(by[i]["min_ms"]) if i in by else "" for i in impls]
            if "reference" in impls and "foreach" in impls:
                ok = "reference" in by and "foreach" in by
                cells.append(f"{by['reference']['min_ms'] / by['foreach']['min_ms']:.1f}x" if ok else "")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    load = results.get("loadavg_1min")
    if isinstance(load, dict) and load.get("before") is not None:
        out.append(f"1-minute load average of the machine: {load['before']} before, {load.get('after')} after "
                   "(above 0, other processes shared the cores).\n")
    tr = [r for r in rows if r.get("group") == "train_step"]
    if tr:
        two = next((r["min_ms"] for r in tr if r.get("kind") == "two_passes_adamw"), None)
        first = tr[0]
        manual = next((r["min_ms"] for r in tr if r.get("kind") == "manual_sam"), None)
        out.append(f"One training step of the demo's {first.get('model')} ({fmt(first.get('params'))} params, "
                   f"batch {first.get('batch')}), ms (fastest round, and the median). `two_passes_adamw`: "
                   "two forward/backward passes + torch AdamW, what any SAM step must cost; `manual_sam`: the same "
                   "SAM step written with `first_step` / `second_step`; `sam_step`: `fastsam.sam_step`.\n")
        out.append("| step | min ms | median ms | vs two passes + AdamW | vs manual_sam | backend |")
        out.append("|---|---:|---:|---:|---:|---|")
        for r in tr:
            k = str(r.get("kind"))
            over = f"{r['min_ms'] - two:+.2f} ms" if two is not None and "sam" in k else ""
            vs_manual = f"{r['min_ms'] - manual:+.2f} ms" if manual is not None and k == "sam_step" else ""
            out.append(f"| {k} | {fmt(r['min_ms'])} | {fmt(r['median_ms'])} | {over} | {vs_manual} | "
                       f"{r.get('backend', '')} |")
    return "\n".join(out)


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


RENDERERS: dict[str, Callable[[Any], str]] = {"cpu_micro": render_cpu_micro, "traffic_cpu": render_traffic}


def render_file(path: Path, results_dir: Path) -> str:
    """The section for one result file ('' if it is not a write_result file)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"### {path.name}\n\n(unreadable: {e})\n"
    if not isinstance(data, dict) or "env" not in data or "results" not in data:
        return ""
    rel = path.relative_to(results_dir).with_suffix("").as_posix()
    res = data["results"]
    body = RENDERERS[rel](res) if rel in RENDERERS else table(find_rows(res))
    if not body:
        scal = {k: v for k, v in res.items() if _is_scalar(v)} if isinstance(res, dict) else {}
        body = table([scal]) if scal else "(no table in this result)"
    notes = [str(res[k]) for k in ("note",) if isinstance(res, dict) and isinstance(res.get(k), str)]
    src = f"`bench/results/{path.relative_to(results_dir).as_posix()}`"
    parts = [f"### {rel}", "", env_line(data["env"]) + f" Source: {src}.", ""]
    if notes:
        parts += [" ".join(notes), ""]
    parts += [body, ""]
    return "\n".join(parts)


def build_block(results_dir: Path = RESULTS_DIR) -> str:
    """The whole block (without the markers): one section per result file, sorted by path."""
    files = sorted(p for p in results_dir.rglob("*.json") if p.is_file())
    sections = [s for s in (render_file(p, results_dir) for p in files) if s]
    head = ("_Generated by `python -m bench.make_tables` from the JSON files in `bench/results/`; "
            "regenerate, do not edit by hand. `python -m bench.run_all` re-measures._\n")
    if not sections:
        return head + "\nNo results yet.\n"
    return head + "\n" + "\n".join(sections)


MD_MARK = "<!-- generated by bench/make_tables.py from the JSON next to this file -->"


def write_markdown(results_dir: Path = RESULTS_DIR) -> list[Path]:
    """``<name>.md`` next to every result JSON (DESIGN.md s6: JSON plus a generated table). A
    benchmark that writes its own richer ``.md`` (no ``MD_MARK`` line) keeps it; ours are
    rewritten when they changed. Returns the files written."""
    written = []
    for path in sorted(p for p in results_dir.rglob("*.json") if p.is_file()):
        section = render_file(path, results_dir)
        if not section:
            continue
        md = path.with_suffix(".md")
        if md.exists() and MD_MARK not in md.read_text():
            continue
        text = MD_MARK + "\n\n" + section
        if not md.exists() or md.read_text() != text:
            md.write_text(text)
            written.append(md)
    return written


def replace_block(text: str, block: str) -> str | None:
    """``text`` with the markers' content replaced by ``block``; None when the markers are missing."""
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < 0 or j < i:
        return None
    return text[: i + len(BEGIN)] + "\n" + block.rstrip("\n") + "\n" + text[j:]


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or print, or check) the README block; returns the exit status."""
    p = argparse.ArgumentParser(description="Regenerate the README performance tables from bench/results.")
    p.add_argument("--results", default=str(RESULTS_DIR), help="results directory (default bench/results)")
    p.add_argument("--readme", default=str(README), help="README to update (default README.md)")
    p.add_argument("--stdout", action="store_true", help="print the block, do not touch the README")
    p.add_argument("--check", action="store_true", help="exit 1 if the README block is out of date")
    args = p.parse_args(argv)
    block = build_block(Path(args.results).resolve())
    readme = Path(args.readme)
    if args.stdout:
        print(block)
        return 0
    text = readme.read_text() if readme.exists() else ""
    new = replace_block(text, block)
    if new is None:
        print(f"{readme}: markers {BEGIN} / {END} not found; README left alone. The block:\n", file=sys.stderr)
        print(block)
        return 0 if not args.check else 1
    if args.check:
        if new != text:
            print(f"{readme}: performance block is out of date; run python -m bench.make_tables", file=sys.stderr)
            return 1
        return 0
    if new != text:
        readme.write_text(new)
        print(f"updated {readme} ({block.count(chr(10))} lines between the markers)")
    else:
        print(f"{readme}: already up to date")
    for md in write_markdown(Path(args.results).resolve()):
        print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
