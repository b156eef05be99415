"""The demo's registry of SAM variants: one :class:`Variant` entry per row of the digits table.

An entry says how to build the optimizer (a fastsam preset by name, with the variant's own
options), what to pass to :func:`fastsam.sam_step`, the rho it uses without a held-out choice
(``--quick``) and the grid the held-out choice picks from. Entries name fastsam's API by string
and are checked against the installed fastsam (:meth:`Variant.unavailable`), so a variant whose
preset or option has not landed yet is skipped with that reason and appears by itself once it does.

Adding a variant is one ``Variant(...)`` line in :data:`REGISTRY`, e.g. a preset with options and
a ``sam_step`` argument::

    Variant("looksam", "LookSAM (k=5)", "Liu et al. 2022: ...", preset="LookSAM",
            options={"k": 5, "alpha": 0.7}, step={}, rho=0.05, rho_grid=(0.05, 0.1, 0.2), cost=1.3),

then ``python -m fastsam.demo`` (the default run) and ``python -m fastsam.demo.readme --from
fastsam_demo_out/results.json``, and commit ``docs/demo_results.json``, ``docs/demo.png`` and
``README.md``: ``tests/test_demo_readme.py`` fails until the committed results have every
variant that the installed fastsam can run.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import fastsam

__all__ = ["REGISTRY", "VARIANTS", "BaseRecipe", "Variant"]

# rho grids of the held-out choice: the paper default and two doublings. On the digits, SAM's
# best rho moves up with label noise (the larger values regularize against memorizing wrong
# labels) and none above 4x the default won on either condition in our trials.
SAM_RHOS = (0.05, 0.1, 0.2)
ASAM_RHOS = (0.5, 1.0, 2.0)  # ASAM's neighbourhood is scale-invariant: 10x SAM's (Kwon et al.)


@dataclass(frozen=True)
class BaseRecipe:
    """The base optimizer every variant wraps: class name in ``torch.optim`` and its arguments."""

    name: str  # "AdamW" or "SGD"
    kwargs: Mapping[str, Any]

    @property
    def cls(self) -> type[torch.optim.Optimizer]:
        """The ``torch.optim`` class."""
        return getattr(torch.optim, self.name)


def _signature_names(fn: Callable[..., Any]) -> set[str]:
    """Named parameters of ``fn`` (``**kwargs`` excluded: a swallowed option would reach the base optimizer)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


@dataclass(frozen=True)
class Variant:
    """One SAM variant of the demo.

    ``preset`` names a class exported by ``fastsam`` (``"SAM"``, ``"ASAM"``, ``"LookSAM"``, ...),
    built as ``fastsam.<preset>(params, base, rho=rho, **options, **base_kwargs)``; None is the
    base optimizer alone. ``step`` are :func:`fastsam.sam_step` keyword arguments, JSON-able:
    ``ascent_loss`` is the name of a :mod:`fastsam.losses` function, with ``ascent_loss_kwargs``.
    ``cost`` is a guess of the time per step relative to the base optimizer, used only to order
    the runs and to estimate the run time up front (the table reports the measured time).
    """

    name: str  # command-line name and key in results.json
    label: str  # table and plot label
    paper: str  # where it comes from and which options make it
    preset: str | None = "SAM"
    options: Mapping[str, Any] = field(default_factory=dict)
    step: Mapping[str, Any] = field(default_factory=dict)
    rho: float | None = 0.05  # used without a held-out choice (--quick, --no-select)
    rho_grid: tuple[float, ...] = SAM_RHOS  # the held-out choice picks one of these
    rho_follows_lr: bool = False  # fastsam.ProportionalRho (GSAM's recipe)
    cost: float = 2.0

    @property
    def is_base(self) -> bool:
        """True for the base optimizer alone (no SAM)."""
        return self.preset is None

    def unavailable(self) -> str | None:
        """Why the installed fastsam cannot run this variant (a preset or option it lacks), or None."""
        if self.preset is None:
            return None
        cls = getattr(fastsam, self.preset, None)
        if cls is None:
            return f"fastsam has no {self.preset} yet"
        known = _signature_names(cls.__init__) | _signature_names(fastsam.SAM.__init__)
        missing = [k for k in self.options if k not in known]
        if missing:
            return f"fastsam.{self.preset} has no option {', '.join(missing)} yet"
        step_known = _signature_names(fastsam.sam_step)
        missing = [k for k in self.step if k not in step_known and k not in ("ascent_loss", "ascent_loss_kwargs")]
        if missing:
            return f"fastsam.sam_step has no argument {', '.join(missing)} yet"
        loss = self.step.get("ascent_loss")
        if loss is not None and not hasattr(fastsam.losses, loss):
            return f"fastsam.losses has no {loss}"
        return None

    def build(self, params: Sequence[torch.nn.Parameter], rho: float | None, base: BaseRecipe) -> torch.optim.Optimizer:
        """The optimizer over ``params`` (rho ignored for the base optimizer)."""
        if self.preset is None:
            return base.cls(params, **base.kwargs)
        cls = getattr(fastsam, self.preset)
        return cls(params, base.cls, rho=rho, **self.options, **base.kwargs)

    def step_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`fastsam.sam_step` (the ascent loss resolved to a function)."""
        kw = {k: v for k, v in self.step.items() if k not in ("ascent_loss", "ascent_loss_kwargs")}
        loss = self.step.get("ascent_loss")
        if loss is not None:
            fn = getattr(fastsam.losses, loss)
            extra = dict(self.step.get("ascent_loss_kwargs", {}))
            kw["ascent_loss_fn"] = functools.partial(fn, **extra) if extra else fn
        return kw

    def spec(self) -> dict[str, Any]:
        """Everything of this entry that determines its numbers (compared with committed results)."""
        return {"name": self.name, "label": self.label, "preset": self.preset, "options": dict(self.options),
                "step": {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in self.step.items()},
                "rho": self.rho, "rho_grid": list(self.rho_grid), "rho_follows_lr": self.rho_follows_lr}


# One entry per variant, in table order. Hyperparameters: each paper's defaults for small models.
REGISTRY: tuple[Variant, ...] = (
    Variant("base", "AdamW", "the base optimizer alone: one pass per step", preset=None, rho=None, rho_grid=(),
            cost=1.0),
    Variant("sam", "SAM", "Foret et al. 2021"),
    Variant("asam", "ASAM", "Kwon et al. 2021: adaptive=True, eta=0.01", preset="ASAM", options={"eta": 0.01},
            rho=0.5, rho_grid=ASAM_RHOS),
    Variant("gsam", "GSAM", "Zhuang et al. 2022: gsam_alpha=0.4, rho proportional to the lr", preset="GSAM",
            options={"gsam_alpha": 0.4}, rho_follows_lr=True),
    Variant("fsam", "F-SAM", "Li et al. 2024: fsam_sigma=1, fsam_lambda=0.6 (their smaller CIFAR models)",
            preset="FriendlySAM", options={"fsam_sigma": 1.0, "fsam_lambda": 0.6}),
    Variant("esam", "ESAM", "Du et al. 2022: swp_keep=0.5, sam_step(sds_keep=0.5)", preset="ESAM",
            options={"swp_keep": 0.5}, step={"sds_keep": 0.5}, cost=2.2),
    Variant("sam+obf", "SAM+OBF", "Vani et al. 2024: ascent_loss_fn=obf_loss (gamma=1)",
            step={"ascent_loss": "obf_loss", "ascent_loss_kwargs": {"gamma": 1.0}}, cost=2.2),
    Variant("sam+bisam", "SAM+BiSAM", "Xie et al. 2024: ascent_loss_fn=bisam_loss (phi=log)",
            step={"ascent_loss": "bisam_loss", "ascent_loss_kwargs": {"phi": "log"}}, cost=2.4),
    Variant("msam", "m-SAM (m=32)", "Foret et al. 2021 s4.1: sam_step(micro_batch=32), 2 micro-batches",
            step={"micro_batch": 32}, cost=3.0),
    # The cheaper variants of issue #17.
    Variant("looksam", "LookSAM (k=5)", "Liu et al. 2022: SAM gradient every k=5 steps, alpha=0.7", preset="LookSAM",
            options={"k": 5, "alpha": 0.7}, cost=1.3),
    Variant("sam-every5", "SAM every 5", "interval SAM: sam_every=5, plain steps in between",
            options={"sam_every": 5}, cost=1.3),
    # AE-SAM's threshold moves from c_start to c_end over total_steps: the default run's 315 steps
    # (21 batches x 15 epochs; --quick runs stop earlier, at a lower threshold)
    Variant("aesam", "AE-SAM", "Jiang et al. 2023: SAM only where the gradient norm is large", preset="AESAM",
            options={"total_steps": 315}, cost=1.5),
    # MSAM's rho acts on the normalized momentum, not the gradient: a wider grid (Becker et al. use
    # larger values than SAM's)
    Variant("momentum-sam", "MSAM", "Becker et al. 2024: perturbation along the momentum, one pass", preset="MSAM",
            rho=0.2, rho_grid=(0.05, 0.2, 0.8), cost=1.1),
    Variant("wsam", "WSAM", "Yue et al. 2023: weighted sharpness, gamma=0.9, decoupled", preset="WSAM",
            options={"gamma": 0.9, "decouple": True}),
)

VARIANTS: dict[str, Variant] = {v.name: v for v in REGISTRY}
if len(VARIANTS) != len(REGISTRY):  # pragma: no cover - a typo in the table above
    raise RuntimeError("two demo variants share a name")
