"""The demo's tables and sentences, in markdown, from a results dict (what ``main`` prints and
what the README's demo section is generated from): every number here comes from the results."""

from __future__ import annotations

from typing import Any

__all__ = ["digits_heldout_table", "digits_lines", "format_report", "run_line", "toy_lines"]


def _n(count: int, noun: str) -> str:
    """``"1 seed"``, ``"3 seeds"``."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _cond_name(noise: float) -> str:
    return "clean labels" if noise == 0 else f"{noise:.0%} noisy labels"


def _rho(r: float | None) -> str:
    return "-" if r is None else f"{r:g}"


# ----------------------------------------------------------------------------------- part (a)
def toy_lines(toy: dict[str, Any]) -> list[str]:
    """Part (a): caption, table, and what it shows (signed paired differences, in standard errors)."""
    c = toy["config"]
    out = [f"(a) Two-feature toy (Springer et al. 2024, s5.1): spiral {c['complexity']:g} deg, {c['n_train']} "
           f"training points, {c['epochs']} epochs, batch {c['batch_size']}, SGD lr {c['lr']:g}, "
           f"{_n(len(toy['seeds']), 'seed')}. Probing errors in %, mean ± std over seeds; 'vs SGD': the mean "
           "paired difference with the SGD run of the same seed ± its standard error. Hard/easy feature: error of "
           "sign(v_f Phi_f(x)) (the paper's measure); probe: a fitted 1-D probe (sign and threshold).", ""]
    out.append("| rho | method | hard feature | vs SGD | hard, fitted probe | vs SGD | easy feature | model |")
    out.append("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in toy["summary"]:
        pm = lambda k, r=r: f"{_pct(r[k + '_mean'])} ± {_pct(r[k + '_std'])}"
        dv = lambda k, r=r: (f"{100 * r[k + '_vs_sgd_mean']:+.1f} ± {_pct(r[k + '_vs_sgd_sem'])}"
                             if k + "_vs_sgd_mean" in r else "")
        out.append(f"| {r['rho']:g} | {r['method']} | {pm('hard_sign_error')} | {dv('hard_sign_error')} "
                   f"| {pm('hard_probe_error')} | {dv('hard_probe_error')} | {pm('easy_sign_error')} "
                   f"| {pm('test_error')} |")
    lsam = [r for r in toy["summary"] if "hard_sign_error_vs_sgd_mean" in r]
    if lsam:
        def effect(key: str) -> str:
            diffs = ", ".join(f"{100 * r[key + '_vs_sgd_mean']:+.1f}" for r in lsam)
            z = [r[key + "_vs_sgd_mean"] / r[key + "_vs_sgd_sem"] for r in lsam if r[key + "_vs_sgd_sem"] > 0]
            span = f" ({min(z):+.1f} to {max(z):+.1f} standard errors)" if z else ""
            return f"{diffs} points{span}"

        rhos = ", ".join(f"{r['rho']:g}" for r in lsam)
        sgd = next((r for r in toy["summary"] if r["rho"] == 0), None)
        worst = max(lsam, key=lambda r: r["easy_sign_error_mean"])
        easy = (f" The easy feature's error is {_pct(sgd['easy_sign_error_mean'])} % with SGD and at most "
                f"{_pct(worst['easy_sign_error_mean'])} ± {_pct(worst['easy_sign_error_std'])} % "
                f"(rho = {worst['rho']:g})." if sgd else "")
        out += ["", f"Against SGD on the same seed, LSAM at rho = {rhos} changes the hard feature's error by "
                    f"{effect('hard_sign_error')} on the paper's measure and by {effect('hard_probe_error')} on the "
                    f"fitted probe (negative: better learned, the paper's direction).{easy}"]
    return out


# ----------------------------------------------------------------------------------- part (b)
def _passes(v: dict[str, Any]) -> str:
    """Forward+backward passes per step, plus forward-only ones (ESAM's scoring), in batches."""
    fb, fwd = v["backward_per_step"], v["forward_per_step"] - v["backward_per_step"]
    return f"{fb:.3g}" + (f" + {fwd:.3g} fwd" if fwd > 0.005 else "")


def digits_lines(dig: dict[str, Any]) -> list[str]:
    """Part (b): caption, the per-variant table, and what it shows."""
    c, s = dig["config"], dig["splits"]
    noises = dig["noise_rates"]
    base = next((v for v in dig["variants"] if v["name"] == "base"), None)
    base_label = base["label"] if base else "the base optimizer"
    sel = (f"rho chosen per variant and condition on the clean held-out {s['held_out']} images (trained on the "
           f"other {s['fit']}, one run per grid value, seed {dig['select_seed']}, not a reported one)"
           if dig["select"] else "each variant's default rho (no held-out choice)")
    out = [f"(b) {dig['dataset']}: {s['train']} training / {s['test']} test images, {dig['model']} "
           f"({dig['params']:,} params), {c['epochs']} epochs of batch {c['batch_size']}, {dig['base']['name']} "
           f"lr {c['lr' if dig['base']['name'] == 'AdamW' else 'sgd_lr']:g} (warmup + cosine), "
           f"{_n(len(dig['seeds']), 'seed')}; {sel}. Test accuracy in %, mean ± std over seeds; "
           f"'vs {base_label}': paired difference with the same seed ± its standard error; ms / step: median "
           "over the reported runs, one thread each; passes: forward+backward passes per step in batches, "
           "counted.", ""]
    noisy = [r for r in noises if r > 0]
    head = "| variant | rho | " + " | ".join(_cond_name(r) for r in noises)
    head += "".join(f" | {r:.0%} noise vs {base_label}" for r in noisy)
    head += f" | ms / step | x {base_label} | passes / step | backend |"
    out.append(head)
    out.append("|---|---:|" + "---:|" * (len(noises) + len(noisy)) + "---:|---:|---:|---|")
    for v in dig["variants"]:
        conds = {cd["noise"]: cd for cd in v["conditions"]}
        rho = " / ".join(_rho(conds[r]["rho"]) for r in noises)
        accs = " | ".join(f"{_pct(conds[r]['acc_mean'])} ± {_pct(conds[r]['acc_std'])}" for r in noises)
        vs = "".join(f" | {100 * conds[r]['vs_base_mean']:+.1f} ± {_pct(conds[r]['vs_base_sem'])}"
                     if "vs_base_mean" in conds[r] else " | " for r in noisy)
        ratio = f"{v['x_base']:.2f}" if v.get("x_base") else "-"
        skip = f" ({v['skipped_steps']} skipped steps)" if v["skipped_steps"] else ""
        out.append(f"| {v['label']}{skip} | {rho} | {accs}{vs} | {v['ms_per_step']:.1f} | {ratio} | {_passes(v)} "
                   f"| {v['backend']} |")
    if dig.get("skipped"):
        out += ["", "Not run: " + "; ".join(f"{x['label']} ({x['reason']})" for x in dig["skipped"]) + "."]
    out += _digits_sentences(dig, base)
    return out


def _digits_sentences(dig: dict[str, Any], base: dict[str, Any] | None) -> list[str]:
    """What the table shows, in numbers taken from it."""
    if base is None:
        return []
    lines = []
    for r in dig["noise_rates"]:
        b = next(cd for cd in base["conditions"] if cd["noise"] == r)
        others = [(v, next(cd for cd in v["conditions"] if cd["noise"] == r)) for v in dig["variants"]
                  if v is not base]
        if not others:
            continue
        best_v, best = max(others, key=lambda vc: vc[1]["acc_mean"])
        above = [v["label"] for v, cd in others if cd.get("vs_base_sem", 0) > 0
                 and cd["vs_base_mean"] > 2 * cd["vs_base_sem"]]
        below = [v["label"] for v, cd in others if cd.get("vs_base_sem", 0) > 0
                 and cd["vs_base_mean"] < -2 * cd["vs_base_sem"]]
        lo, hi = min(cd["acc_mean"] for _, cd in others), max(cd["acc_mean"] for _, cd in others)
        text = (f"{_cond_name(r).capitalize()}: {base['label']} {_pct(b['acc_mean'])} ± {_pct(b['acc_std'])} %, "
                f"the SAM variants {_pct(lo)} to {_pct(hi)} %; the best, {best_v['label']} (rho {_rho(best['rho'])}), "
                f"{_pct(best['acc_mean'])} ± {_pct(best['acc_std'])} %")
        if "vs_base_mean" in best:
            text += f", {100 * best['vs_base_mean']:+.1f} ± {_pct(best['vs_base_sem'])} points paired"
        text += f". More than 2 standard errors above {base['label']}: {', '.join(above) or 'none'}"
        text += f"; below: {', '.join(below) or 'none'}."
        lines += ["", text]
    return lines


def digits_heldout_table(dig: dict[str, Any]) -> list[str]:
    """The held-out accuracy of every grid value (the choice of rho, in the open)."""
    if not dig.get("select"):
        return []
    out = ["| variant | label noise | held-out accuracy % per rho (chosen in bold) |", "|---|---:|---|"]
    for v in dig["variants"]:
        for cd in v["conditions"]:
            if "held_out" not in cd:
                continue
            cells = ", ".join((f"**{h['rho']:g}: {_pct(h['acc'])}**" if h["rho"] == cd["rho"]
                               else f"{h['rho']:g}: {_pct(h['acc'])}") for h in cd["held_out"])
            out.append(f"| {v['label']} | {cd['noise']:.0%} | {cells} |")
    return out


# ----------------------------------------------------------------------------------- whole run
def run_line(res: dict[str, Any]) -> str:
    """Where and how fast the run was measured."""
    env = res["env"]
    par = (f"{res['workers']} worker processes of 1 thread each" if res["workers"] > 1
           else _n(res["torch_threads"], "thread"))
    load = ""
    if res.get("load_before") is not None and res.get("load_after") is not None:
        load = f", 1-minute load average {res['load_before']:.2f} before and {res['load_after']:.2f} after"
    c = env.get("commit") or ""
    commit = f", commit {c[:12]}{'-dirty' if c.endswith('-dirty') else ''}" if c else ""
    return (f"fastsam {env['fastsam']}, torch {env['torch']}, {env['device']} ({env['device_name']}, "
            f"{env['cpu_count']} cores, {par}){commit}, {env['date']}: {res['elapsed_s']:.0f} s wall{load}.")


def format_report(res: dict[str, Any]) -> str:
    """Everything the demo prints after its runs."""
    out: list[str] = []
    if res.get("toy"):
        out += toy_lines(res["toy"]) + [""]
    if res.get("digits"):
        out += digits_lines(res["digits"]) + [""]
        held = digits_heldout_table(res["digits"])
        if held:
            out += ["Held-out choice of rho:", ""] + held + [""]
    out.append(run_line(res))
    return "\n".join(out)
