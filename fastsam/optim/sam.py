"""``fastsam.SAM``: one optimizer class for SAM and its family (ASAM, GSAM, ESAM, F-SAM, LSAM).

The class validates, keeps state and dispatches; the math lives in the backends behind
:mod:`fastsam.functional` (definition of correct: :mod:`fastsam.reference`).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from .. import functional as F
from ..functional import BACKENDS
from ._fused import fused_second_step

_GROUP_KEYS = ("rho", "adaptive", "eta")

# The step methods mutate Python attributes of the optimizer (_perturbed, _sam_step, ...). Inside
# a torch.compile'd function, dynamo (torch 2.13) drops attribute writes made on an Optimizer
# instance when a graph break happens inside its method, which would leave first_step's state
# unset for second_step. These methods therefore always run eagerly; their kernels are
# custom ops, so a compiled model around them is unaffected.
# torch._disable_dynamo is torch.compiler.disable with the import of torch._dynamo deferred to
# the first call (torch.optim uses it for the same reason): importing dynamo costs ~2 s, which
# `import fastsam` would otherwise pay even when no SAM step ever runs.
_eager = getattr(torch, "_disable_dynamo", None) or torch.compiler.disable


def _check_group_options(group: dict[str, Any]) -> None:
    rho, eta, adaptive = group["rho"], group["eta"], group["adaptive"]
    if not isinstance(rho, (int, float)) or isinstance(rho, bool) or not math.isfinite(rho) or rho < 0:
        raise ValueError(f"rho must be a finite float >= 0 (0 leaves a group unperturbed), got {rho!r}")
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite float >= 0, got {eta!r}")
    if not isinstance(adaptive, bool):
        raise ValueError(f"adaptive must be True or False, got {adaptive!r}")


class SAM(torch.optim.Optimizer):
    r"""Sharpness-Aware Minimization (Foret et al., 2021) and its family over any base optimizer.

    One SAM step costs two forward/backward passes:

    1. gradient ``g`` at ``w`` (``loss.backward()``), then :meth:`first_step` moves to
       ``w + e`` with ``e = rho * T * sign(u) |u|^(q-1) / (||u||_q^(q-1) + 1e-12)``,
       ``u = T * d``, ``q = p / (p - 1)`` (p = 2: ``e = rho * T^2 d / ||T d||_2``);
    2. gradient at ``w + e``, then :meth:`second_step` restores ``w`` exactly and runs the base
       optimizer with that gradient.

    Options (each alone or combined with every other):

    - ``adaptive`` / ``eta`` (ASAM, Kwon et al. 2021): ``T = |w| + eta`` elementwise, else 1.
    - ``p`` (Foret et al. eq. 2): perturbation in the p-norm ball; any p > 1 or ``math.inf``
      (then ``e = rho * T * sign(u)``).
    - ``fsam_sigma`` / ``fsam_lambda`` (F-SAM, Li et al. 2024): ``d = g - sigma * m`` with
      ``m`` an EMA of gradients, ``m <- lam * m + (1 - lam) * g`` (``m = g``, ``d = g`` on a
      parameter's first step). ``None`` disables it.
    - ``gsam_alpha`` (GSAM, Zhuang et al. 2022): the gradient at ``w + e`` becomes
      ``gs - alpha * (g - cos(g, gs) |g| gs / |gs|)``.
    - ``swp_keep = beta`` (ESAM stochastic weight perturbation, Du et al. 2022): each element
      of ``e`` is kept with probability beta and scaled by 1/beta (Philox mask of
      (seed, step, element index), identical in every backend).
    - per-group ``rho``, ``adaptive``, ``eta``; ``rho = 0`` leaves a group unperturbed and out
      of the norm (LSAM, Springer et al. 2024: perturb only the last layer).

    Norms are global over the parameters that have a gradient in groups with rho > 0, and
    accumulate in float32 (float64 for float64 parameters).

    Args:
        params: tensors or param-group dicts (keys ``rho``, ``adaptive``, ``eta`` and any base
            optimizer option). May be ``None`` when ``base_optimizer`` is an instance.
        base_optimizer: an optimizer class, built over this optimizer's ``param_groups`` with
            ``**base_kwargs`` (the groups are shared, so LR schedulers on the SAM object work),
            or an already-built ``torch.optim.Optimizer`` over the same parameters.
        rho: neighbourhood radius (default for groups that do not set it).
        backend: ``"auto"`` | ``"triton"`` | ``"cuda"`` | ``"cpp"`` | ``"foreach"`` | ``"reference"``.
        seed: ESAM mask seed.

    Usage (the davda54/sam interface)::

        opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None,
        base_optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer,
        rho: float = 0.05,
        *,
        adaptive: bool = False,
        eta: float = 0.0,
        p: float = 2.0,
        fsam_sigma: float | None = None,
        fsam_lambda: float = 0.9,
        gsam_alpha: float = 0.0,
        swp_keep: float = 1.0,
        seed: int = 0,
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        _check_group_options({"rho": rho, "eta": eta, "adaptive": adaptive})
        if not isinstance(p, (int, float)) or isinstance(p, bool) or math.isnan(p) or not p > 1:
            raise ValueError(f"p must be > 1 (2 for SAM, math.inf for sign perturbations), got {p!r}")
        if fsam_sigma is not None and (not math.isfinite(fsam_sigma) or fsam_sigma < 0):
            raise ValueError(f"fsam_sigma must be None (F-SAM off) or a finite float >= 0, got {fsam_sigma!r}")
        if not (0.0 <= fsam_lambda < 1.0):
            raise ValueError(f"fsam_lambda must be in [0, 1), got {fsam_lambda!r}")
        if not math.isfinite(gsam_alpha) or gsam_alpha < 0:
            raise ValueError(f"gsam_alpha must be a finite float >= 0 (0 disables GSAM), got {gsam_alpha!r}")
        if not (0.0 < swp_keep <= 1.0):
            raise ValueError(f"swp_keep must be in (0, 1] (1 disables ESAM weight masks), got {swp_keep!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        F.resolve_backend(backend)  # an explicitly requested but unavailable backend fails here

        self.p = float(p)
        self.fsam_sigma = None if fsam_sigma is None else float(fsam_sigma)
        self.fsam_lambda = float(fsam_lambda)
        self.gsam_alpha = float(gsam_alpha)
        self.swp_keep = float(swp_keep)
        self.seed = seed
        self.backend = backend
        self._sam_step = 0  # completed first steps: the ESAM mask key
        self._perturbed: list[Tensor] | None = None  # the tensors perturbed by the open first step
        self._perturb_ok: Tensor | None = None
        # transient per-parameter buffers (w_old, g_old), never saved; keyed like self.state
        self._scratch: dict[Tensor, dict[str, Tensor]] = {}
        self._grad_marks: list[tuple[Tensor, Any]] | None = None
        # ids of the parameters whose scratch "acc" buffer holds a partial sum (see accumulate())
        self._acc_live: set[int] = set()

        sam_defaults = {"rho": rho, "adaptive": adaptive, "eta": eta}
        if isinstance(base_optimizer, torch.optim.Optimizer):
            if base_kwargs:
                raise ValueError(
                    f"base_kwargs {sorted(base_kwargs)} cannot be combined with an optimizer instance; "
                    "pass the base optimizer class instead, or configure the instance itself"
                )
            base = base_optimizer
            if params is None:
                params = [{"params": g["params"]} for g in base.param_groups]
            super().__init__(params, sam_defaults)
            self._adopt_instance(base)
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
            if params is None:
                raise ValueError("params is required when base_optimizer is a class")
            super().__init__(params, {**sam_defaults, **base_kwargs})
            base = base_optimizer(self.param_groups, **base_kwargs)
        else:
            raise ValueError(
                "base_optimizer must be a torch.optim.Optimizer subclass or instance, "
                f"got {base_optimizer!r}"
            )
        self.base_optimizer = base
        self.param_groups = base.param_groups  # shared: LR schedulers on SAM drive the base
        self.defaults = {**base.defaults, **self.defaults}

    # ------------------------------------------------------------------ construction helpers
    def _adopt_instance(self, base: torch.optim.Optimizer) -> None:
        owner = {id(p): g for g in self.param_groups for p in g["params"]}
        base_ids = [id(p) for g in base.param_groups for p in g["params"]]
        if set(base_ids) != set(owner):
            raise ValueError("params must be exactly the parameters of the base_optimizer instance")
        for bg in base.param_groups:
            src = {id(owner[id(p)]) for p in bg["params"]}
            if len(src) > 1:
                raise ValueError(
                    "params: a param group of the base_optimizer instance mixes parameters from SAM "
                    "param groups with different rho/adaptive/eta; give SAM the same grouping"
                )
            sg = owner[id(bg["params"][0])] if bg["params"] else self.defaults
            for k in _GROUP_KEYS:
                bg.setdefault(k, sg[k])
            _check_group_options(bg)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (also to the base optimizer); validates ``rho``, ``adaptive``, ``eta``."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in params) or len({id(p) for p in params}) != len(params):
            raise ValueError("params: a parameter appears in more than one parameter group")
        param_group = {**param_group, "params": params}
        if not hasattr(self, "base_optimizer"):  # called by Optimizer.__init__
            super().add_param_group(param_group)
            _check_group_options(self.param_groups[-1])
            return
        for k in _GROUP_KEYS:
            param_group.setdefault(k, self.defaults[k])
        _check_group_options(param_group)
        self.base_optimizer.add_param_group(param_group)  # appends to the shared list

    # ------------------------------------------------------------------ the step
    def _collect(self) -> tuple[list[Tensor], list[Tensor], list[float], list[float], list[bool], list[int]]:
        """The perturbed set P with its per-tensor options and global element offsets."""
        params, grads, rhos, etas, adaptive, offsets = [], [], [], [], [], []
        offset = 0
        for group in self.param_groups:
            rho = group["rho"]
            for w in group["params"]:
                g = w.grad
                if g is not None and rho > 0:
                    if g.is_sparse:
                        raise ValueError("SAM does not support sparse gradients (params: a parameter has one)")
                    params.append(w)
                    grads.append(g)
                    rhos.append(float(rho))
                    etas.append(float(group["eta"]))
                    adaptive.append(bool(group["adaptive"]))
                    offsets.append(offset)
                offset += w.numel()
        return params, grads, rhos, etas, adaptive, offsets

    def _buffer(self, w: Tensor, name: str) -> Tensor:
        bufs = self._scratch.setdefault(w, {})
        buf = bufs.get(name)
        if buf is None or buf.shape != w.shape or buf.dtype != w.dtype or buf.device != w.device:
            buf = torch.empty_like(w, memory_format=torch.preserve_format)
            bufs[name] = buf
        return buf

    @_eager
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Perturb: ``w_old <- w``, ``w <- w + e(g)`` on every parameter of P (see class doc).

        A non-finite gradient norm perturbs nothing and changes no state; see
        :attr:`perturbation_skipped`.
        """
        if self._perturbed is not None:
            raise RuntimeError(
                "first_step() called twice: the weights are still perturbed; call second_step() "
                "(or restore()) before the next first_step()"
            )
        params, grads, rhos, etas, adaptive, offsets = self._collect()
        w_old = [self._buffer(w, "w_old") for w in params]
        g_old = [self._buffer(w, "g_old") for w in params] if self.gsam_alpha > 0 else None
        ema = ready = None
        if self.fsam_sigma is not None:
            ema, ready = [], []
            for w in params:
                st = self.state[w]
                if "fsam_ema" not in st:
                    st["fsam_ema"] = torch.zeros_like(w, memory_format=torch.preserve_format)
                    st["fsam_ready"] = torch.zeros((), dtype=torch.float32, device=w.device)
                ema.append(st["fsam_ema"])
                ready.append(st["fsam_ready"])
        ok = F.sam_perturb_(
            params, grads, w_old, ema, ready, g_old, rhos, etas, adaptive, offsets,
            p=self.p, fsam_sigma=self.fsam_sigma, fsam_lambda=self.fsam_lambda,
            swp_keep=self.swp_keep, seed=self.seed, step=self._sam_step, backend=self.backend,
        )
        self._perturbed = params
        self._perturb_ok = ok
        self._sam_step += 1
        if zero_grad:
            self.zero_grad()

    @_eager
    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` exactly, apply GSAM if enabled, then run the base optimizer step.

        With a fused backend and a torch SGD/Adam/AdamW base this is one pass over the weights.
        """
        if self._perturbed is None:
            raise RuntimeError(
                "second_step() called without a matching first_step(): compute the gradient at w, "
                "call first_step(), compute the gradient at the perturbed point, then second_step()"
            )
        if fused_second_step(self, self._perturbed):
            self._perturbed = None
            self._after_base_step()
        else:
            self.restore(apply_gsam=True)
            self.base_step()
        if zero_grad:
            self.zero_grad()

    @_eager
    @torch.no_grad()
    def restore(self, apply_gsam: bool = False) -> None:
        """Put the weights back to ``w_old`` (bit-exact) without a base step. No-op when the
        weights are not perturbed, so it is safe in any exception handler.

        ``apply_gsam=True`` also replaces the gradient in ``.grad`` by the GSAM combination
        (when ``gsam_alpha > 0``): what :meth:`second_step` does before its base step, and what
        a training loop needs per micro-batch (m-sharpness).
        """
        params = self._perturbed
        if params is None:
            return
        F.sam_restore_(params, [self._scratch[w]["w_old"] for w in params], backend=self.backend)
        self._perturbed = None
        if apply_gsam and self.gsam_alpha > 0:
            pairs = [(w.grad, self._scratch[w]["g_old"]) for w in params if w.grad is not None]
            if pairs:
                gs, go = (list(t) for t in zip(*pairs))
                F.gsam_combine_(gs, go, self.gsam_alpha, backend=self.backend)

    @_eager
    @torch.no_grad()
    def accumulate(self, weight: float = 1.0, *, scale: float = 1.0) -> None:
        r"""Restore ``w`` (when perturbed), GSAM-combine the gradient in ``.grad`` (when perturbed
        and ``gsam_alpha > 0``) and add it into per-parameter accumulation buffers, in one pass
        per (device, dtype) group on the fused backends (m-sharpness: once per micro-batch)::

            acc <- scale * (acc + weight * g)        (acc = 0 after load_accumulated / clear_accumulated)

        Every parameter of every group with a ``.grad`` is accumulated (groups with ``rho = 0``
        too); ``.grad`` is only read, so call ``zero_grad()`` before the next backward.
        :meth:`load_accumulated` then puts the sums into ``.grad`` for :meth:`base_step`.
        With micro-batches of sizes ``n_k`` and a reference size ``n``: ``weight = n_k / n``
        each, and ``scale = n / sum(n_k)`` on the last one gives the size-weighted mean.
        The buffers have the parameter's dtype (as ``.grad``), become the ``.grad`` tensors on
        :meth:`load_accumulated` (the next accumulation allocates new ones), and are transient:
        not in :meth:`state_dict`, dropped by :meth:`load_state_dict`.
        """
        for name, v in (("weight", weight), ("scale", scale)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite float, got {v!r}")
        perturbed = {id(w) for w in self._perturbed} if self._perturbed is not None else set()
        live = self._acc_live
        params: list[Tensor] = []
        grads: list[Tensor | None] = []
        w_old: list[Tensor | None] = []
        g_old: list[Tensor | None] = []
        acc: list[Tensor | None] = []
        reset: list[bool] = []
        gsam = self.gsam_alpha > 0 and bool(perturbed)
        for group in self.param_groups:
            for w in group["params"]:
                g = w.grad
                in_p = id(w) in perturbed
                is_live = id(w) in live
                if g is None and not in_p and not (is_live and scale != 1.0):
                    continue
                if g is not None and g.is_sparse:
                    raise ValueError("accumulate() does not support sparse gradients (params: a parameter has one)")
                params.append(w)
                grads.append(g)
                w_old.append(self._scratch[w]["w_old"] if in_p else None)
                g_old.append(self._scratch[w]["g_old"] if in_p and gsam else None)
                has_acc = g is not None or is_live
                acc.append(self._buffer(w, "acc") if has_acc else None)
                reset.append(not is_live)
        if params:
            F.sam_restore_accumulate_(
                params, grads, w_old, g_old if gsam else None, acc, reset, weight=float(weight),
                scale=float(scale), gsam_alpha=self.gsam_alpha if gsam else 0.0, backend=self.backend,
            )
        self._perturbed = None
        for w, a in zip(params, acc):
            if a is not None:
                live.add(id(w))

    def load_accumulated(self) -> None:
        """``.grad <- acc`` for every parameter with an accumulated sum (``None`` for the others)
        and start a new accumulation; see :meth:`accumulate`. The weights must be unperturbed."""
        if self._perturbed is not None:
            raise RuntimeError("load_accumulated() while the weights are perturbed; call accumulate() first")
        live = self._acc_live
        for group in self.param_groups:
            for w in group["params"]:
                # hand the buffer over: .grad must not alias the next step's running sum (an
                # in-place zero_grad(set_to_none=False) or a kept reference would corrupt it)
                w.grad = self._scratch[w].pop("acc") if id(w) in live else None
        live.clear()

    def clear_accumulated(self) -> None:
        """Drop the partial sums of :meth:`accumulate` (the next call starts from 0)."""
        self._acc_live.clear()

    @property
    def has_accumulated(self) -> bool:
        """True if :meth:`accumulate` holds partial sums not yet loaded or cleared."""
        return bool(self._acc_live)

    @_eager
    @torch.no_grad()
    def base_step(self) -> None:
        """Run the base optimizer on the gradients in ``.grad`` (weights must be unperturbed).

        With a fused backend and a torch SGD/Adam/AdamW base this is the same fused update as
        :meth:`second_step` without the restore: one pass, torch's update formula computed in
        float32 (float64 for float64 parameters) and rounded once, base optimizer state kept
        where torch keeps it; otherwise ``base_optimizer.step()``.
        """
        if self._perturbed is not None:
            raise RuntimeError("base_step() while the weights are perturbed; call restore() first")
        if not fused_second_step(self, []):
            self.base_optimizer.step()
        self._after_base_step()

    def _after_base_step(self) -> None:
        self._opt_called = True  # tells torch's LR schedulers that an optimizer step happened
        self._mark_grads()

    @property
    def is_perturbed(self) -> bool:
        """True between :meth:`first_step` and :meth:`second_step` / :meth:`restore`."""
        return self._perturbed is not None

    @property
    def perturbation_skipped(self) -> bool:
        """True if the last :meth:`first_step` saw a non-finite gradient norm and perturbed
        nothing. Reading it synchronizes with the device (``perturbation_ok`` does not)."""
        return self._perturb_ok is not None and not bool(self._perturb_ok)

    @property
    def perturbation_ok(self) -> Tensor | None:
        """0-dim bool tensor on the device: the last first step's norm was finite."""
        return self._perturb_ok

    @contextlib.contextmanager
    def perturbed(self, zero_grad: bool = True, step: bool = True) -> Iterator[SAM]:
        """Context for the perturbed pass: ``first_step`` on entry; on normal exit
        ``second_step`` (or just ``restore`` with ``step=False``); on any exception the weights
        are restored to ``w`` and the exception propagates.

        ::

            loss_fn(model(x), y).backward()
            with opt.perturbed():
                loss_fn(model(x), y).backward()
        """
        self.first_step(zero_grad=zero_grad)
        try:
            yield self
        except BaseException:
            self.restore()
            raise
        if step:
            self.second_step()
        else:
            self.restore()

    def _mark_grads(self) -> None:
        """Remember which gradient tensors are "stale" (already used by a SAM step)."""
        self._grad_marks = [
            (w, None if w.grad is None else (weakref.ref(w.grad), w.grad._version))
            for g in self.param_groups for w in g["params"]
        ]

    def _has_fresh_grads(self) -> bool:
        """True if some parameter got a gradient since the last second_step / zero_grad."""
        marks = self._grad_marks
        if marks is None:
            return any(w.grad is not None for g in self.param_groups for w in g["params"])
        for w, mark in marks:
            grad = w.grad
            if grad is None:
                continue
            if mark is None or mark[0]() is not grad or mark[1] != grad._version:
                return True
        return False

    @_eager
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Whole SAM step: [closure], first_step, closure, second_step.

        ``closure`` runs forward + backward and returns the loss (clearing gradients first, as
        torch's closure convention). If fresh gradients are already present (davda54/sam usage:
        ``loss.backward(); opt.step(closure)``) they are the first-pass gradient and the closure
        runs once; otherwise it runs twice. Returns the first closure call's loss. An exception
        in the second closure call restores the weights before it propagates.
        """
        if closure is None:
            raise ValueError(
                "SAM.step requires closure (forward + backward returning the loss): a SAM step needs two "
                "forward/backward passes. Use fastsam.sam_step(model, opt, x, y, loss_fn), or first_step() / "
                "second_step() by hand; with Hugging Face transformers use "
                "fastsam.integrations.transformers.SAMTrainer instead of transformers.Trainer"
            )
        closure = torch.enable_grad()(closure)
        loss = None
        if not self._has_fresh_grads():
            loss = closure()
        self.first_step(zero_grad=True)
        try:
            loss2 = closure()
        except BaseException:
            self.restore()
            raise
        self.second_step()
        return loss2 if loss is None else loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self._mark_grads()

    # ------------------------------------------------------------------ checkpoints
    def _all_params(self) -> list[Tensor]:
        return [w for g in self.param_groups for w in g["params"]]

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """``{"base_optimizer": <the base's own state_dict, loadable by plain torch>,
        "sam": {"step", "seed", "state": {param index: F-SAM EMA}, "options"}}``.

        Transient buffers (``w_old``, ``g_old``) are never saved.
        """
        sam_state = {}
        for i, w in enumerate(self._all_params()):
            st = self.state.get(w)
            if st:
                sam_state[i] = dict(st)
        return {
            "base_optimizer": self.base_optimizer.state_dict(),
            "sam": {
                "version": 1,
                "step": self._sam_step,
                "seed": self.seed,
                "state": sam_state,
                "options": {
                    "p": self.p, "fsam_sigma": self.fsam_sigma, "fsam_lambda": self.fsam_lambda,
                    "gsam_alpha": self.gsam_alpha, "swp_keep": self.swp_keep,
                },
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a :meth:`state_dict`; continuing gives bit-identical results to an
        uninterrupted run (the ESAM step counter and seed are restored too)."""
        if not isinstance(state_dict, dict) or "base_optimizer" not in state_dict or "sam" not in state_dict:
            raise ValueError(
                "state_dict must come from fastsam.SAM.state_dict() (keys 'base_optimizer' and 'sam'); "
                "to load a plain torch optimizer state use opt.base_optimizer.load_state_dict()"
            )
        if self._perturbed is not None:
            raise RuntimeError("load_state_dict() while the weights are perturbed; call restore() first")
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        self.param_groups = self.base_optimizer.param_groups  # torch rebuilds the group dicts
        sam = state_dict["sam"]
        params = self._all_params()
        self.state = defaultdict(dict)
        for i, st in sam["state"].items():
            w = params[int(i)]
            new = {}
            for k, v in st.items():
                if k == "fsam_ema":
                    new[k] = v.to(device=w.device, dtype=w.dtype).clone()
                else:
                    new[k] = v.to(device=w.device).clone()
            self.state[w] = new
        self._sam_step = int(sam["step"])
        self.seed = int(sam["seed"])
        self._grad_marks = None
        # partial sums (SAM.accumulate, sam_step(update=False)) belong to the run being replaced
        self._acc_live.clear()
        self.__dict__.pop("_fastsam_accum", None)
