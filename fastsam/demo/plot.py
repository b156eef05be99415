"""``demo.png``: (a) the LSAM toy's probing errors against rho; (b) and (c) test accuracy against
time per step (relative to the base optimizer), one point per variant, clean labels next to noisy
ones, so the accuracy/cost frontier shows at a glance.

The two accuracy panels share one y axis that starts at a round value written on the axis, so a
point's height compares across panels and a 1-point difference looks like one point.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["PNG_KEY", "png_text", "save_plot"]

PNG_KEY = "fastsam-demo-results"  # PNG text chunk: the sha256 of the results the figure was drawn from
_MARKERS = "osD^v<>phP*Xd"


def _toy_panel(ax: Any, toy: dict[str, Any]) -> None:
    s = toy["summary"]
    rho = [r["rho"] for r in s]
    for key, lab, style in (("hard_sign_error", r"hard feature (spiral): sign of $v_h\Phi_h$", "o-"),
                            ("hard_probe_error", "hard feature: fitted 1-D probe", "s--"),
                            ("easy_sign_error", r"easy feature (linear): sign of $v_e\Phi_e$", "^:")):
        ax.errorbar(rho, [100 * r[key + "_mean"] for r in s], yerr=[100 * r[key + "_sem"] for r in s],
                    fmt=style, capsize=3, label=lab)
    ax.set_ylim(bottom=0)
    ax.set_xlabel(r"LSAM $\rho$ (0 = SGD)")
    ax.set_ylabel("probing error (%)")
    ax.set_title(f"(a) two-feature toy, spiral {toy['config']['complexity']:g}°:\n"
                 f"mean ± s.e.m. of {len(toy['seeds'])} seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")


def _frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both cost (lower) and accuracy (higher), by cost."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def save_plot(res: dict[str, Any], path: Path, digest: str | None = None) -> bool:
    """Draw ``res`` into ``path`` (PNG; ``digest`` goes into its :data:`PNG_KEY` text chunk).
    False without matplotlib or with nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    toy, dig = res.get("toy"), res.get("digits")
    n = (1 if toy else 0) + (len(dig["noise_rates"]) if dig else 0)
    if n == 0:
        return False
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.9), squeeze=False)
    axs = list(axes[0])
    if toy:
        _toy_panel(axs.pop(0), toy)
    if dig:
        _accuracy_panels(fig, axs, dig, res)
    fig.tight_layout(rect=(0, 0.12 if dig else 0, 1, 1))
    meta = {PNG_KEY: digest} if digest else {}
    fig.savefig(path, dpi=100, metadata=meta)
    plt.close(fig)
    return True


def _accuracy_panels(fig: Any, axs: list[Any], dig: dict[str, Any], res: dict[str, Any]) -> None:
    import matplotlib.pyplot as plt

    vs = dig["variants"]
    base = next((v for v in vs if v["name"] == "base"), None)
    base_label = base["label"] if base else "base"
    colors = plt.get_cmap("tab20").colors
    lows = [cd["acc_mean"] - cd["acc_std"] for v in vs for cd in v["conditions"]]
    y0 = 5 * math.floor((100 * min(lows) - 1) / 5)  # a round start below every error bar
    handles = []
    for ax, noise in zip(axs, dig["noise_rates"]):
        pts = []
        for i, v in enumerate(vs):
            cd = next(c for c in v["conditions"] if c["noise"] == noise)
            x = v["x_base"] if v.get("x_base") else 1.0
            y = 100 * cd["acc_mean"]
            h = ax.errorbar([x], [y], yerr=[100 * cd["acc_std"]], fmt=_MARKERS[i % len(_MARKERS)],
                            color=colors[(2 * i) % len(colors)], capsize=3, markersize=7,
                            label=f"{v['label']} (rho {cd['rho']:g})" if cd["rho"] is not None else v["label"])
            if noise == dig["noise_rates"][-1]:
                handles.append((h, v["label"]))
            pts.append((x, y))
        front = _frontier(pts)
        if len(front) > 1:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="0.6", lw=1, zorder=0,
                    label="frontier")
        if base:
            b = next(c for c in base["conditions"] if c["noise"] == noise)
            ax.axhline(100 * b["acc_mean"], color="0.4", ls=":", lw=1, zorder=0)
        ax.set_ylim(y0, 100)
        ax.set_yticks(range(int(y0), 101, 5 if 100 - y0 > 10 else 1))
        ax.set_xlim(left=0.5)
        ax.set_xlabel(f"time per step / {base_label}'s ({res['env']['device']}, 1 thread)")
        ax.set_ylabel(f"test accuracy (%), axis from {y0:g}")
        cond = "clean training labels" if noise == 0 else f"{noise:.0%} of training labels wrong"
        ax.set_title(f"({'bc'[dig['noise_rates'].index(noise)]}) digits, TinyViT: {cond}\n"
                     f"mean ± std of {len(dig['seeds'])} seeds; dotted: {base_label}; grey: frontier", fontsize=9)
        ax.grid(alpha=0.3)
    fig.legend([h for h, _ in handles], [lab for _, lab in handles], loc="lower center",
               ncol=min(7, math.ceil(len(handles) / 2)), fontsize=8, frameon=False)


def png_text(path: Path) -> dict[str, str]:
    """The text chunks (tEXt / iTXt, uncompressed) of a PNG file."""
    import struct

    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    out, i = {}, 8
    while i + 8 <= len(data):
        (length,), kind = struct.unpack(">I", data[i:i + 4]), data[i + 4:i + 8]
        body = data[i + 8:i + 8 + length]
        if kind == b"tEXt":
            key, _, val = body.partition(b"\0")
            out[key.decode("latin-1")] = val.decode("latin-1")
        elif kind == b"iTXt":
            key, _, rest = body.partition(b"\0")
            if rest[:1] == b"\0":  # not compressed: flag, method, language\0, translated key\0, text
                _lang, _, rest2 = rest[2:].partition(b"\0")
                _tkey, _, text = rest2.partition(b"\0")
                out[key.decode("latin-1")] = text.decode("utf-8")
        i += 12 + length
    return out
