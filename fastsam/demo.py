"""``python -m fastsam.demo`` (console script ``fastsam-demo``): what fastsam does, in under 3 minutes on 2 CPU cores.

Nothing is downloaded: part (a) generates its data, part (b) uses the 8x8 digits that ship
inside scikit-learn (``pip install fastsam[demo]`` for scikit-learn and matplotlib).

(a) The two-feature toy of Springer et al. (ICLR 2024, "SAM Enhances Feature Quality via
    Balanced Learning", section 5.1; see :mod:`fastsam.toy`): a linear "easy" feature and a
    spiral "hard" feature, each fully predictive of the label, a disentangled network, and
    LSAM (only the last layer is perturbed: :class:`fastsam.SAM` with ``rho = 0`` on every
    other parameter group, trained with :func:`fastsam.sam_step`) against SGD (``rho = 0``).
    Reported: the hard feature's probing error against rho; the paper (Figure 2) shows it
    decreasing as rho grows.

    Kept from the paper: the data distribution (appendix E, a_easy = 2, a_hard = 0.25, the
    U([0, 0.5]^2) noise), the network (appendix B: Linear-LayerNorm-ReLU x 2 of width 100, then
    Linear to 1, shared by both features; last layer ``v`` without bias), 300 training points,
    plain SGD without momentum or weight decay, a constant learning rate, the probing error of
    section 5.1 (0-1 error of ``sign(v_hard * Phi_hard(x))``; we multiply by ``v_hard`` so that a
    feature learned with the opposite sign is not counted as wrong).

    Changed, and why:

    - one spiral complexity, 360 degrees, instead of several: at 180 degrees SGD already learns
      the spiral about as well as a network trained on the spiral alone (~21% error, a floor set
      by the noise), leaving nothing to improve; at 540-720 degrees neither method learns much of
      it at this budget;
    - batch 20 and learning rate 0.05 instead of 5 and 0.01 (learning rate scaled with the
      batch) and 25 epochs (the paper does not give its epoch count): 375 steps, about a second
      per run on one core. Longer runs let ``|v|`` grow, which shrinks a fixed rho's relative
      effect: at 100 epochs (6 seeds) we saw no effect of rho at all;
    - a rho grid of 0, 0.25, 0.5, 1 (the paper does not list its grid) with 12 seeds: the effect
      is a few points of error against a seed-to-seed spread of 5-9 points, so the table also
      gives the paired difference with SGD on the same seed (same data, initialization and batch
      order) and its standard error. In our runs the paper's measure fell by 2.5, 4.3 and 5.5
      points at rho = 0.25, 0.5, 1 (1.8 to 2.8 standard errors), the fitted probe below by 0.2,
      2.6 and 2.7 (at most 1.3 standard errors): the paper's direction, with a small effect;
    - a second measure next to the paper's: section 3's linear probe specialized to a scalar
      feature (a fitted sign and threshold, :func:`fastsam.toy.threshold_probe_error`), which
      does not count the offset that ``Phi``'s output bias (shared by both features) adds.
      At rho = 1 LSAM starts to damage the easy feature in some seeds; we show it.

(b) scikit-learn's 8x8 digits (1,797 images, a fixed stratified 75/25 split) with
    :class:`fastsam.models.TinyViT` (18k parameters): every variant through
    :func:`fastsam.sam_step` (m-SAM is ``micro_batch``, ESAM is :class:`fastsam.ESAM` plus
    ``sds_keep``, SAM+OBF / SAM+BiSAM pass :mod:`fastsam.losses` as ``ascent_loss_fn``) next to
    the base optimizer alone, all with one recipe (AdamW, warmup + cosine, 5 epochs) and each
    variant's paper defaults (see :class:`DigitsConfig`). Reported: test accuracy (mean and std
    over seeds), milliseconds per training step and the backend that ran the SAM step
    (``fastsam.functional.resolve_backend("auto", device)``). The runs are short (210 steps from
    scratch) and the dataset easy: the variants land within about a point of each other, about
    the seed-to-seed spread. Part (b) shows that every variant runs and composes, and what it
    costs; it is not a ranking.

On CPU the runs are spread over worker processes of one thread each when cores are idle
(``--workers``); every run is a pure function of its seed, so the numbers do not depend on how
they were scheduled (the ms/step do: they are per process, one thread each).

Outputs (``--out``, default ``fastsam_demo_out/``): ``results.json`` (every number, every run),
``demo.png`` (both plots); the tables go to stdout, progress bars to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import __version__
from .functional import resolve_backend
from .models import TinyViT
from .optim.presets import ASAM, ESAM, GSAM, FriendlySAM
from .optim.sam import SAM
from .schedulers import ProportionalRho
from .toy import ToyConfig, train_toy
from .train import sam_step

__all__ = ["DigitsConfig", "VARIANTS", "main", "run_digits", "run_toy"]


# ----------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class DigitsConfig:
    """Training recipe for part (b): one recipe for every variant (only the SAM options differ)."""

    epochs: int = 5  # 210 steps: ~95% test accuracy for AdamW alone (~97% after 8 epochs)
    batch_size: int = 32  # more, smaller steps learn faster per second here than batch 64
    lr: float = 1e-2  # AdamW (high for a ViT, right for 210 steps from scratch); SGD uses sgd_lr
    sgd_lr: float = 0.1  # momentum 0.9
    weight_decay: float = 0.05  # AdamW's ViT default (DeiT)
    warmup_frac: float = 0.1  # linear warmup over the first 10% of steps, then cosine to 0
    optimizer: str = "adamw"  # base optimizer of every variant: "adamw" or "sgd"
    rho: float = 0.05  # SAM, GSAM, F-SAM, ESAM, OBF, BiSAM, m-SAM (Foret et al.'s default)
    asam_rho: float = 0.5  # ASAM is scale-invariant: 10x SAM's rho (Kwon et al.)
    asam_eta: float = 0.01  # Kwon et al.
    gsam_alpha: float = 0.4  # fastsam.GSAM's default; rho follows the lr (ProportionalRho)
    fsam_sigma: float = 1.0  # Li et al.: 1 in every experiment
    fsam_lambda: float = 0.6  # Li et al.: 0.6 for the smaller CIFAR models
    esam_swp_keep: float = 0.5  # Du et al.: beta = 0.5
    esam_sds_keep: float = 0.5  # Du et al.: gamma = 0.5
    obf_gamma: float = 1.0  # Vani et al.: gamma = 1 for ViTs, lam = 1/C
    bisam_phi: str = "log"  # Xie et al.: BiSAM (-log) with mu = 1.5
    micro_batch: int = 16  # m-SAM: 2 micro-batches of the batch of 32 (8 would cost 2x more again)
    max_steps: int | None = None  # cap on the steps of one run (None: epochs * steps per epoch)
    timing_warmup_steps: int = 3  # not timed: first-call allocations and lazy imports


@dataclass(frozen=True)
class Variant:
    """One row of part (b): how to build its optimizer and what to pass to ``sam_step``."""

    name: str  # command-line name
    label: str  # table label
    reference: str  # paper / option
    make: Callable[[list[torch.nn.Parameter], DigitsConfig], torch.optim.Optimizer]
    step_kwargs: Callable[[DigitsConfig], dict[str, Any]] = field(default=lambda cfg: {})
    ascent_loss: str | None = None  # "obf" / "bisam": reported with the loss backend


def _base_kwargs(cfg: DigitsConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW, {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    return torch.optim.SGD, {"lr": cfg.sgd_lr, "momentum": 0.9, "weight_decay": 5e-4}  # 5e-4: CIFAR recipe


def _sam(**opts: Any) -> Callable[[list[torch.nn.Parameter], DigitsConfig], torch.optim.Optimizer]:
    def make(params: list[torch.nn.Parameter], cfg: DigitsConfig) -> torch.optim.Optimizer:
        base, kw = _base_kwargs(cfg)
        return SAM(params, base, rho=cfg.rho, **opts, **kw)
    return make


def _make_base(params: list[torch.nn.Parameter], cfg: DigitsConfig) -> torch.optim.Optimizer:
    base, kw = _base_kwargs(cfg)
    return base(params, **kw)


def _make_asam(params: list[torch.nn.Parameter], cfg: DigitsConfig) -> torch.optim.Optimizer:
    base, kw = _base_kwargs(cfg)
    return ASAM(params, base, rho=cfg.asam_rho, eta=cfg.asam_eta, **kw)


def _make_gsam(params: list[torch.nn.Parameter], cfg: DigitsConfig) -> torch.optim.Optimizer:
    base, kw = _base_kwargs(cfg)
    return GSAM(params, base, rho=cfg.rho, gsam_alpha=cfg.gsam_alpha, **kw)


def _make_fsam(params: list[torch.nn.Parameter], cfg: DigitsConfig) -> torch.optim.Optimizer:
    base, kw = _base_kwargs(cfg)
    return FriendlySAM(params, base, rho=cfg.rho, fsam_sigma=cfg.fsam_sigma, fsam_lambda=cfg.fsam_lambda, **kw)


def _make_esam(params: list[torch.nn.Parameter], cfg: DigitsConfig) -> torch.optim.Optimizer:
    base, kw = _base_kwargs(cfg)
    return ESAM(params, base, rho=cfg.rho, swp_keep=cfg.esam_swp_keep, **kw)


def _obf_kwargs(cfg: DigitsConfig) -> dict[str, Any]:
    from .losses import obf_loss  # imported late: a broken losses module only breaks this row

    gamma = cfg.obf_gamma
    return {"ascent_loss_fn": lambda z, y, reduction="mean": obf_loss(z, y, gamma=gamma, reduction=reduction)}


def _bisam_kwargs(cfg: DigitsConfig) -> dict[str, Any]:
    from .losses import bisam_loss

    phi = cfg.bisam_phi
    return {"ascent_loss_fn": lambda z, y, reduction="mean": bisam_loss(z, y, phi=phi, reduction=reduction)}


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("base", "base optimizer", "no SAM, one pass per step", _make_base),
    Variant("sam", "SAM", "Foret et al. 2021", _sam()),
    Variant("asam", "ASAM", "Kwon et al. 2021: adaptive=True, eta", _make_asam),
    Variant("gsam", "GSAM", "Zhuang et al. 2022: gsam_alpha + ProportionalRho", _make_gsam),
    Variant("fsam", "F-SAM", "Li et al. 2024: fsam_sigma, fsam_lambda", _make_fsam),
    Variant("esam", "ESAM", "Du et al. 2022: swp_keep + sds_keep", _make_esam,
            lambda cfg: {"sds_keep": cfg.esam_sds_keep}),
    Variant("sam+obf", "SAM+OBF", "Vani et al. 2024: ascent_loss_fn=obf_loss", _sam(), _obf_kwargs, "obf"),
    Variant("sam+bisam", "SAM+BiSAM", "Xie et al. 2024: ascent_loss_fn=bisam_loss", _sam(), _bisam_kwargs, "bisam"),
    Variant("msam", "m-SAM", "Foret et al. 2021 s4.1: micro_batch", _sam(),
            lambda cfg: {"micro_batch": cfg.micro_batch}),
]}

TOY_RHOS = (0.0, 0.25, 0.5, 1.0)  # rho = 0 is SGD
QUICK_TOY_RHOS = (0.0, 0.5)


# ----------------------------------------------------------------------------------- helpers
def _progress(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar on stderr (a no-op object when disabled)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not enabled, leave=False, dynamic_ncols=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _device_name(device: torch.device) -> str:
    """GPU name, or the CPU model from /proc/cpuinfo (platform's processor string elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loss_backend(device: torch.device) -> str:
    """Backend of ``fastsam.losses`` with ``backend="auto"`` (its documented rule): triton for
    CUDA tensors when triton imports, else the PyTorch reference."""
    if device.type != "cuda":
        return "reference"
    try:
        import triton  # noqa: F401
    except Exception:
        return "reference"
    return "triton"


def load_digits_split(device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 8x8 digits: a fixed stratified 75/25 split, pixels standardized with the
    training set's mean and std. Returns ``x_train [N, 64], y_train, x_test, y_test`` on ``device``."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit("the digits part of the demo needs scikit-learn: pip install 'fastsam[demo]'") from e
    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(d.data, d.target, test_size=0.25, stratify=d.target, random_state=0)
    xtr_t, xte_t = torch.tensor(xtr, dtype=torch.float32), torch.tensor(xte, dtype=torch.float32)
    mu, sd = xtr_t.mean(), xtr_t.std()
    out = ((xtr_t - mu) / sd, torch.tensor(ytr), (xte_t - mu) / sd, torch.tensor(yte))
    return tuple(t.to(device) for t in out)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------- part (b)
def train_digits(
    variant: Variant,
    seed: int,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    cfg: DigitsConfig,
    device: torch.device,
    on_step: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train a :class:`TinyViT` on the digits with one variant; test accuracy and ms per step.

    Every step of a SAM variant is :func:`fastsam.sam_step`; the base variant is the plain
    ``zero_grad / backward / step``. The learning rate warms up linearly then follows a cosine to 0.
    Steps after the first ``cfg.timing_warmup_steps`` are timed (device synchronized).
    """
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = TinyViT().to(device)
    opt = variant.make(list(model.parameters()), cfg)
    step_kw = variant.step_kwargs(cfg)
    n = xtr.shape[0]
    per_epoch = n // cfg.batch_size  # drop the last partial batch: every step has the same shape
    total = per_epoch * cfg.epochs if cfg.max_steps is None else min(per_epoch * cfg.epochs, cfg.max_steps)
    warm = max(1, int(cfg.warmup_frac * total))
    lr_at = lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    # rho follows the lr from (max_lr = the peak lr, rho) down to 0. max_lr is given: by default
    # ProportionalRho takes the lr at construction, which LambdaLR has already set to the first
    # warmup value (peak / warm), and rho would then grow to warm * rho during warmup.
    rho_sched = ProportionalRho(opt, max_lr=sched.base_lrs[0]) if isinstance(opt, GSAM) else None
    g = torch.Generator().manual_seed(seed)
    timed, elapsed, skipped, step, loss = 0, 0.0, 0, 0, float("nan")
    t_start = time.perf_counter()
    model.train()
    while step < total:
        perm = torch.randperm(n, generator=g).to(device)
        for b in range(min(per_epoch, total - step)):
            idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            xb, yb = xtr[idx], ytr[idx]
            _sync(device)
            t0 = time.perf_counter()
            if isinstance(opt, SAM):
                res = sam_step(model, opt, xb, yb, F.cross_entropy, **step_kw)
                skipped += int(res.skipped)
                loss_t = res.loss_tensor
            else:
                opt.zero_grad(set_to_none=True)
                loss_t = F.cross_entropy(model(xb), yb)
                loss_t.backward()
                opt.step()
            sched.step()
            if rho_sched is not None:
                rho_sched.step()
            _sync(device)
            if step >= cfg.timing_warmup_steps:
                elapsed += time.perf_counter() - t0
                timed += 1
            step += 1
            if on_step is not None:
                on_step()
        loss = float(loss_t.detach())
    model.eval()
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean())
    return {"seed": seed, "test_acc": acc, "final_train_loss": loss, "steps": step, "skipped_steps": skipped,
            "ms_per_step": 1e3 * elapsed / max(1, timed), "train_s": time.perf_counter() - t_start}


_DIGITS_CACHE: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] = {}


def _digits_job(name: str, seed: int, cfg: DigitsConfig, device: str) -> dict[str, Any]:
    """One part (b) run by variant name (picklable, for worker processes); data loaded once per process."""
    if device not in _DIGITS_CACHE:
        _DIGITS_CACHE[device] = load_digits_split(torch.device(device))
    out = train_digits(VARIANTS[name], seed, _DIGITS_CACHE[device], cfg, torch.device(device))
    return {"name": name, **out}


def _default_workers() -> int:
    """Cores that are idle now: CPU count minus the 1-minute load average, rounded, at least 1.

    Worker processes only pay off on idle cores: on this project's shared 2-core machine, with
    another process busy, two workers took 92 s for what one process did in 67 s (each worker
    also pays ~4 s of imports)."""
    n = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (OSError, AttributeError):  # not available on every platform
        busy = 0.0
    return max(1, min(n, int(n - busy + 0.5)))


def _init_worker() -> None:
    torch.set_num_threads(1)  # one core per worker process: the runs are tiny and latency-bound


def _run_jobs(
    fn: Callable[..., dict[str, Any]], jobs: list[tuple[Any, ...]], pool: ProcessPoolExecutor | None, bar: Any
) -> list[dict[str, Any]]:
    """``fn(*job)`` for every job, in ``pool`` when given (results in completion order), else here."""
    out = []
    if pool is None:
        for job in jobs:
            out.append(fn(*job))
            bar.update(1)
        return out
    futs = [pool.submit(fn, *job) for job in jobs]
    try:
        for fut in as_completed(futs):
            out.append(fut.result())
            bar.update(1)
    except BaseException:
        for f in futs:
            f.cancel()
        raise
    return out


def run_digits(
    names: Sequence[str], seeds: Sequence[int], cfg: DigitsConfig, device: torch.device,
    pool: ProcessPoolExecutor | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Part (b): every variant in ``names`` for every seed; per-run and per-variant numbers.

    With a ``pool`` (CPU), runs are spread over its worker processes (longest first); each
    worker has one thread and its own core, so a run's ms/step is that of one core.
    """
    sam_backend = resolve_backend("auto", device)
    # longest runs first (fewer idle workers at the end); relative costs measured on 2 CPU cores
    cost = {"msam": 2.0, "esam": 1.3, "base": 0.5}
    order = sorted(names, key=lambda n: -cost.get(n, 1.0))
    jobs = [(name, seed, cfg, str(device)) for name in order for seed in seeds]
    bar = _progress(len(jobs), "(b) digits ViT", progress)
    try:
        results = _run_jobs(_digits_job, jobs, pool, bar)
    finally:
        bar.close()
    rows = []
    for name in names:
        v = VARIANTS[name]
        runs = sorted((r for r in results if r["name"] == name), key=lambda r: r["seed"])
        accs = [r["test_acc"] for r in runs]
        acc_mean, acc_std = _mean_std(accs)
        if name == "base":
            backend = "torch"
        else:
            backend = sam_backend + (f" + {_loss_backend(device)} loss" if v.ascent_loss else "")
        label = {"adamw": "AdamW", "sgd": "SGD"}[cfg.optimizer] if name == "base" else v.label
        if name == "msam":
            label += f" (m={cfg.micro_batch})"
        rows.append({
            "name": name, "label": label, "reference": v.reference, "backend": backend,
            "test_acc_mean": acc_mean, "test_acc_std": acc_std, "test_acc": accs,
            "ms_per_step": statistics.fmean(r["ms_per_step"] for r in runs),
            "skipped_steps": sum(r["skipped_steps"] for r in runs),
            "runs": [{k: x for k, x in r.items() if k != "name"} for r in runs],
        })
    n_train = 1347  # 75% of scikit-learn's 1,797 digits (stratified split)
    return {"dataset": f"sklearn digits 8x8 ({n_train} train / 450 test)", "model": "TinyViT",
            "params": TinyViT().num_parameters(), "seeds": list(seeds), "config": asdict(cfg), "variants": rows}


# ----------------------------------------------------------------------------------- part (a)
_TOY_KEYS = ("hard_sign_error", "hard_probe_error", "easy_sign_error", "easy_probe_error", "test_error")


def run_toy(
    rhos: Sequence[float], seeds: Sequence[int], cfg: ToyConfig, device: torch.device,
    pool: ProcessPoolExecutor | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Part (a): the LSAM rho sweep, one run per (rho, seed); each run is deterministic given its
    seed whether it runs here or in a worker of ``pool``."""
    # SGD runs (one pass per step) last: longest first leaves fewer idle workers at the end
    jobs = [(float(r), int(s), cfg, str(device)) for r in sorted(rhos, key=lambda r: (r == 0, r)) for s in seeds]
    bar = _progress(len(jobs), "(a) LSAM toy", progress)
    try:
        results = _run_jobs(train_toy, jobs, pool, bar)
    finally:
        bar.close()
    results.sort(key=lambda d: (d["rho"], d["seed"]))
    summary = []
    sgd = {d["seed"]: d for d in results if d["rho"] == 0}
    for r in sorted({float(x) for x in rhos}):
        rs = [d for d in results if d["rho"] == r]
        row: dict[str, Any] = {"rho": r, "method": "SGD" if r == 0 else "LSAM", "n": len(rs)}
        for key in _TOY_KEYS:
            row[key + "_mean"], row[key + "_std"] = _mean_std([d[key] for d in rs])
            row[key + "_sem"] = row[key + "_std"] / math.sqrt(len(rs))
            # paired with SGD on the same seed (same data, initialization and batch order)
            diffs = [d[key] - sgd[d["seed"]][key] for d in rs if d["seed"] in sgd]
            if r != 0 and len(diffs) > 1:
                m, sd = _mean_std(diffs)
                row[key + "_vs_sgd_mean"], row[key + "_vs_sgd_sem"] = m, sd / math.sqrt(len(diffs))
        summary.append(row)
    for d in results:
        d.pop("config", None)
    return {"config": asdict(cfg), "rhos": sorted({float(x) for x in rhos}), "seeds": list(seeds),
            "summary": summary, "runs": results}


# ----------------------------------------------------------------------------------- output
def _n(count: int, noun: str) -> str:
    """``"1 seed"``, ``"3 seeds"``."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def format_tables(res: dict[str, Any]) -> str:
    """The demo's text tables (markdown, so they paste into a README)."""
    out = []
    toy = res.get("toy")
    if toy:
        c = toy["config"]
        out.append(f"(a) Two-feature toy (Springer et al. 2024, s5.1): spiral {c['complexity']:g} deg, "
                   f"{c['n_train']} train points, {c['epochs']} epochs, batch {c['batch_size']}, lr {c['lr']:g}, "
                   f"{_n(len(toy['seeds']), 'seed')}")
        out.append("")
        out.append("Probing errors in %, mean ± std over seeds; 'vs SGD': mean paired difference with the SGD "
                   "run of the same seed ± its standard error. Hard/easy: error of sign(v_f * Phi_f(x)) (the "
                   "paper's toy measure); probe: a fitted 1-D linear probe (sign + threshold).")
        out.append("")
        out.append("| rho | method | hard feature | hard vs SGD | hard, probe | hard probe vs SGD | easy feature "
                   "| model test error |")
        out.append("|---:|---|---:|---:|---:|---:|---:|---:|")
        for r in toy["summary"]:
            pm = lambda k, r=r: f"{100 * r[k + '_mean']:.1f} ± {100 * r[k + '_std']:.1f}"
            dv = lambda k, r=r: (f"{100 * r[k + '_vs_sgd_mean']:+.1f} ± {100 * r[k + '_vs_sgd_sem']:.1f}"
                                 if k + "_vs_sgd_mean" in r else "")
            out.append(f"| {r['rho']:g} | {r['method']} | {pm('hard_sign_error')} | {dv('hard_sign_error')} "
                       f"| {pm('hard_probe_error')} | {dv('hard_probe_error')} | {pm('easy_sign_error')} "
                       f"| {pm('test_error')} |")
        out.append("")
    dig = res.get("digits")
    if dig:
        c = dig["config"]
        out.append(f"(b) {dig['dataset']}, {dig['model']} ({dig['params']:,} params), {c['epochs']} epochs, "
                   f"batch {c['batch_size']}, base {c['optimizer']}, {_n(len(dig['seeds']), 'seed')}, "
                   f"device {res['device']}")
        out.append("")
        out.append("| variant | test accuracy | ms / step | x base | backend |")
        out.append("|---|---:|---:|---:|---|")
        base_ms = next((v["ms_per_step"] for v in dig["variants"] if v["name"] == "base"), None)
        for v in dig["variants"]:
            ratio = f"{v['ms_per_step'] / base_ms:.1f}" if base_ms else "-"
            skip = f" ({v['skipped_steps']} skipped)" if v["skipped_steps"] else ""
            spread = f" ± {100 * v['test_acc_std']:.1f}" if len(v["test_acc"]) > 1 else ""
            out.append(f"| {v['label']} | {100 * v['test_acc_mean']:.1f}{spread} %{skip} "
                       f"| {v['ms_per_step']:.1f} | {ratio} | {v['backend']} |")
        out.append("")
    par = (f"{res['workers']} worker processes of 1 thread each" if res["workers"] > 1
           else _n(res["torch_threads"], "thread"))
    out.append(f"fastsam {res['fastsam']}, torch {res['torch']}, {res['device']} ({res['device_name']}, {par}), "
               f"total {res['elapsed_s']:.0f} s")
    return "\n".join(out)


def save_plot(res: dict[str, Any], path: Path) -> bool:
    """``demo.png``: (a) probing error vs rho, (b) test accuracy per variant. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    toy, dig = res.get("toy"), res.get("digits")
    panels = [p for p in (toy, dig) if p]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4), squeeze=False)
    ax_iter = iter(axes[0])
    if toy:
        ax = next(ax_iter)
        s = toy["summary"]
        rho = [r["rho"] for r in s]
        for key, lab, style in (("hard_sign_error", r"hard feature (spiral): sign of $v_h\Phi_h$", "o-"),
                                ("hard_probe_error", "hard feature: fitted 1-D probe", "s--"),
                                ("easy_sign_error", r"easy feature (linear): sign of $v_e\Phi_e$", "^:")):
            ax.errorbar(rho, [100 * r[key + "_mean"] for r in s], yerr=[100 * r[key + "_sem"] for r in s],
                        fmt=style, capsize=3, label=lab)
        ax.annotate("SGD", (0, 100 * s[0]["hard_sign_error_mean"]), textcoords="offset points", xytext=(6, 6))
        ax.set_xlabel(r"LSAM $\rho$ (0 = SGD)")
        ax.set_ylabel("probing error (%)")
        ax.set_title(f"(a) two-feature toy, spiral {toy['config']['complexity']:g}°: "
                     f"mean ± s.e.m. of {_n(len(toy['seeds']), 'seed')}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if dig:
        ax = next(ax_iter)
        vs = dig["variants"]
        ys = list(range(len(vs)))[::-1]
        acc = [100 * v["test_acc_mean"] for v in vs]
        ax.barh(ys, acc, xerr=[100 * v["test_acc_std"] for v in vs], capsize=3, color="tab:blue", alpha=0.75)
        ax.set_yticks(ys, [v["label"] for v in vs])
        lo = min(a - 100 * v["test_acc_std"] for a, v in zip(acc, vs))
        ax.set_xlim(max(0.0, lo - 3.0), 100.0)
        for y, v in zip(ys, vs):
            ax.text(max(0.0, lo - 3.0) + 0.2, y, f"{v['ms_per_step']:.1f} ms/step", va="center", fontsize=7,
                    color="white")
        ax.set_xlabel("test accuracy (%)")
        ax.set_title(f"(b) 8x8 digits, TinyViT, {dig['config']['epochs']} epochs: mean ± std of "
                     f"{_n(len(dig['seeds']), 'seed')}, {res['device']}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------- CLI
def _parse_seeds(text: str) -> list[int]:
    """``"3"`` -> [0, 1, 2]; ``"0,5,7"`` -> [0, 5, 7]."""
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            seeds = list(range(int(text)))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds: a count (3) or a comma list (0,5,7), got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"--seeds: at least one seed, all >= 0, got {text!r}")
    return seeds


def _parse_rhos(text: str) -> list[float]:
    try:
        rhos = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--toy-rhos: a comma list of floats, got {text!r}") from None
    if not rhos or any(not (math.isfinite(r) and r >= 0) for r in rhos):
        raise argparse.ArgumentTypeError(f"--toy-rhos: finite values >= 0, got {text!r}")
    return rhos


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    names = ", ".join(VARIANTS)
    p = argparse.ArgumentParser(
        prog="fastsam-demo",
        description="Train (a) the LSAM two-feature toy and (b) a tiny ViT on 8x8 digits with every SAM "
                    "variant; print a table, save results.json and demo.png. Nothing is downloaded.",
    )
    p.add_argument("--quick", action="store_true", help="smaller run (under a minute on 2 CPU cores)")
    p.add_argument("--variants", default="all",
                   help=f"comma list of part (b) variants, or 'all' (default) or 'none'. Names: {names}")
    p.add_argument("--parts", default="toy,digits", help="comma list of parts to run: toy, digits (default both)")
    p.add_argument("--seeds", type=_parse_seeds, default=None,
                   help="part (b) seeds: a count or a comma list (default 3; --quick: 1)")
    p.add_argument("--epochs", type=_positive_int, default=None, help="part (b) epochs (default 5; --quick: 3)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="part (b): stop each run after this many steps (default: all steps of --epochs)")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="base optimizer of every variant")
    p.add_argument("--toy-seeds", type=_parse_seeds, default=None, help="part (a) seeds (default 12; --quick: 4)")
    p.add_argument("--toy-epochs", type=_positive_int, default=None, help="part (a) epochs (default 25)")
    p.add_argument("--toy-rhos", type=_parse_rhos, default=None,
                   help=f"part (a) LSAM rho grid, 0 = SGD (default {','.join(f'{r:g}' for r in TOY_RHOS)})")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--workers", type=int, default=None,
                   help="CPU only: worker processes, one thread each (default: the cores not busy now, i.e. "
                        "CPU count minus the 1-minute load average, at least 1; 0 or 1: all in this process)")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="CPU only: torch threads when running in this process (default 1: the models are "
                        "tiny, and one thread does not collapse when other processes compete for the cores)")
    p.add_argument("--out", default="fastsam_demo_out", help="output directory (default fastsam_demo_out/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _select_variants(p: argparse.ArgumentParser, text: str) -> list[str]:
    if text.strip() == "all":
        return list(VARIANTS)
    if text.strip() == "none":
        return []
    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad or not names:
        p.error(f"--variants: unknown {', '.join(repr(b) for b in bad) or 'empty list'}; "
                f"choose from: {', '.join(VARIANTS)} (or 'all', 'none')")
    return list(dict.fromkeys(names))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the process exit status (0 on success)."""
    p = build_parser()
    args = p.parse_args(argv)
    parts = {s.strip() for s in args.parts.split(",") if s.strip()}
    if not parts or parts - {"toy", "digits"}:
        p.error(f"--parts: a comma list of toy, digits; got {args.parts!r}")
    names = _select_variants(p, args.variants) if "digits" in parts else []
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            p.error(f"--device: not a torch device: {args.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            p.error("--device cuda: CUDA is not available here (use --device cpu)")
    workers = args.workers if args.workers is not None else _default_workers()
    if workers < 0:
        p.error(f"--workers: expected >= 0, got {workers}")
    if device.type != "cpu":
        workers = 0  # one accelerator: runs go one after the other in this process

    q = args.quick
    toy_cfg = replace(ToyConfig(), epochs=args.toy_epochs or ToyConfig().epochs)
    toy_seeds = args.toy_seeds or list(range(4 if q else 12))
    toy_rhos = args.toy_rhos or list(QUICK_TOY_RHOS if q else TOY_RHOS)
    dig_cfg = replace(DigitsConfig(), epochs=args.epochs or (3 if q else DigitsConfig().epochs),
                      optimizer=args.optimizer, max_steps=args.steps)
    dig_seeds = args.seeds or list(range(1 if q else 3))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    res: dict[str, Any] = {
        "fastsam": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "device": str(device), "device_name": _device_name(device), "cpu_count": os.cpu_count(),
        "workers": workers if workers > 1 else 1,
        "torch_threads": 1 if workers > 1 else torch.get_num_threads(), "quick": q,
        "argv": list(argv) if argv is not None else sys.argv[1:],
    }
    progress = not args.no_progress
    pool = None
    if workers > 1:
        # spawn, not fork: forking a process whose torch thread pools are running can hang
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker)
    try:
        if "toy" in parts:
            res["toy"] = run_toy(toy_rhos, toy_seeds, toy_cfg, device, pool=pool, progress=progress)
        if names:
            res["digits"] = run_digits(names, dig_seeds, dig_cfg, device, pool=pool, progress=progress)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    res["elapsed_s"] = time.perf_counter() - t0

    (out_dir / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    plotted = save_plot(res, out_dir / "demo.png")
    print(format_tables(res))
    print(f"\nwrote {out_dir / 'results.json'}" + (f" and {out_dir / 'demo.png'}" if plotted else
                                                     " (no plot: pip install matplotlib)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
