"""``fastsam.SAM``: one optimizer class for SAM and its family (ASAM, GSAM, ESAM, F-SAM, LSAM).

The class validates, keeps state and dispatches; the math lives in the backends behind
:mod:`fastsam.functional` (definition of correct: :mod:`fastsam.reference`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import operator
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _host, _shard
from .. import functional as F
from .._compat import no_grad
from .._sequences import TRUSTED_PTRS, PerGroup, Tensors
from .._validate import (
    check_bool,
    check_group_hyper,
    check_int,
    check_param_tensor,
    check_real,
    is_number,
    overlapping_pair,
)
from ..functional import BACKENDS
from . import _cheap, _fused
from ._cheap import PERTURB_FROM, AESAMPolicy
from ._fused import fused_second_step

_GROUP_KEYS = ("rho", "adaptive", "eta")
# base-optimizer state entries that hold one value per parameter element (shape = the parameter's)
_ELEMENTWISE_STATE = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg",
                                "acc_delta", "sum", "grad_avg", "prev", "step_size", "ax", "exp_inf"})
# what torch's own optimizers keep for every parameter they have stepped
_REQUIRED_STATE: dict[type, tuple[str, ...]] = {
    torch.optim.Adam: ("step", "exp_avg", "exp_avg_sq"),
    torch.optim.AdamW: ("step", "exp_avg", "exp_avg_sq"),
}
_UNMARKED = ("unmarked",)  # _grad_marks after a step that did not record its gradients
_UNSET = object()
# the cheap-family options a version-2 checkpoint (saved before they existed) implicitly had
_V2_OPTIONS = {"sam_every": 1, "looksam_alpha": None, "aesam": None, "perturb_from": "gradient",
               "wsam_gamma": None, "wsam_decouple": True}
_FAMILY_KEYS = ("gsam_alpha", "sam_every", "looksam_alpha", "aesam", "perturb_from", "wsam_gamma")

# The step methods mutate Python attributes of the optimizer (_perturbed, _sam_step, ...). Inside
# a torch.compile'd function, dynamo (torch 2.13) drops attribute writes made on an Optimizer
# instance when a graph break happens inside its method, which would leave first_step's state
# unset for second_step. These methods therefore always run eagerly; their kernels are
# custom ops, so a compiled model around them is unaffected.
# torch._disable_dynamo is torch.compiler.disable with the import of torch._dynamo deferred to
# the first call (torch.optim uses it for the same reason): importing dynamo costs ~2 s, which
# `import fastsam` would otherwise pay even when no SAM step ever runs.
_eager = getattr(torch, "_disable_dynamo", None) or torch.compiler.disable

_shape_of = operator.attrgetter("shape")
_grad_of = operator.attrgetter("grad")
_is_none = functools.partial(operator.is_, None)
_dtype_of = operator.attrgetter("dtype")


_is_sparse = operator.attrgetter("is_sparse")
_version_of = operator.attrgetter("_version")


def _check_group_options(group: dict[str, Any], where: str = "") -> None:
    """rho / eta / adaptive of one param group (at construction and before every first step: a
    scheduler or user code may have written them since)."""
    at = f" (param group {where})" if where else ""
    check_real(f"rho{at}", group["rho"], lo=0.0, what="0 leaves a group unperturbed")
    check_real(f"eta{at}", group["eta"], lo=0.0)
    check_bool(f"adaptive{at}", group["adaptive"])


class _Txn:
    """An open SAM step: what changed since it began, so that it can be undone exactly.

    A step is a transaction. It opens at the first mutating call (first_step, accumulate,
    base_step, or an outer scope: sam_step, step(closure), perturbed()) and ends in a commit (the
    step happened) or a rollback (it did not). The F-SAM EMA and the accumulation sums are never
    overwritten while a step is open: the first write of a step goes to another buffer, and the
    committed one is kept here until the end, where it is either dropped (commit) or put back
    (rollback); later writes of the same step go to the new buffer in place.
    """

    __slots__ = ("outer", "ema_old", "acc_old", "acc_live0", "base_len0", "created", "updated", "params", "grads0",
                 "perturbed", "gv_old", "combined", "wsam_pending", "pair0")

    def __init__(self, opt: SAM, outer: bool, params: list[Tensor] | None = None,
                 grads: list[Tensor | None] | None = None) -> None:
        self.outer = outer
        # the gradients at the start (references: zero_grad and backward replace .grad, they do
        # not write into it), put back by a rollback so that a failed call leaves .grad as it was
        self.params = opt._all_params() if params is None else params
        self.grads0 = list(map(_grad_of, self.params)) if grads is None else grads
        self.ema_old: dict[Tensor, tuple[Tensor, Tensor] | None] = {}  # param -> (ema, ready) before the step
        self.acc_old: dict[Tensor, Tensor | None] = {}  # param -> committed partial sum before the step
        self.acc_live0: set[int] | None = None  # the set of live partial sums before the step
        self.base_len0 = len(opt.base_optimizer.state)
        self.created: list[Tensor] = []  # params whose base state this step created (fused path)
        self.updated = False  # the base optimizer stepped: the step counter moves at commit
        self.perturbed = False  # a first step perturbed (counts as a perturbing step at commit)
        self.gv_old: dict[Tensor, Tensor | None] = {}  # param -> LookSAM direction before the step
        self.combined = False  # LookSAM / WSAM have taken this step's two gradients
        self.wsam_pending: tuple | None = None  # decoupled WSAM's correction, applied after the update
        # LookSAM / decoupled WSAM under accumulation: (running sums of g, loaded sums of g) before the step
        self.pair0: tuple[dict, dict] | None = None


class _Layout:
    """The perturbed set P of a step and what depends only on which parameters it holds: kept per
    (parameter addresses, which parameters have a gradient, which groups perturb), so that a step
    does no per-tensor Python (the fused backends cache their launch plans on these tuples)."""

    __slots__ = ("key", "params", "idx", "pick", "w_old", "g_old", "offsets", "group_of", "groups", "shapes",
                 "dtypes", "ptrs", "interned", "check_sparse", "lparams", "lw_old", "lg_old", "__weakref__")

    def __init__(self, opt: SAM, key: tuple, params_all: list[Tensor], grads: list[Tensor | None]) -> None:
        self.key = key
        idx: list[int] = []
        group_of: list[int] = []
        used: dict[int, int] = {}  # param group index -> position among the perturbing groups
        offsets: list[int] = []
        k = offset = 0
        sh = opt._sharding
        for gi, group in enumerate(opt.param_groups):
            rho = group["rho"]
            for w in group["params"]:
                g = grads[k]
                if g is not None and rho > 0:
                    idx.append(k)
                    group_of.append(used.setdefault(gi, len(used)))
                    # a shard's elements keep their indices in the unsharded parameter (ESAM masks)
                    offsets.append(offset if sh is None else offset + sh.start(w))
                offset += w.numel()
                k += 1
        self.idx = None if len(idx) == len(params_all) else tuple(idx)
        # the gradients of P from the list of every parameter's gradient (one C-level call)
        if self.idx is None:
            self.pick = tuple
        elif len(idx) == 1:
            self.pick = lambda gs, _i=idx[0]: (gs[_i],)
        elif not idx:
            self.pick = lambda gs: ()
        else:
            self.pick = operator.itemgetter(*idx)
        self.params = Tensors(params_all[i] for i in idx)
        self.group_of = tuple(group_of)
        self.groups = tuple(used)
        self.offsets = tuple(offsets)
        self.w_old = tuple(opt._buffer(w, "w_old") for w in self.params)
        self.g_old = tuple(opt._buffer(w, "g_old") for w in self.params) if opt._needs_g_old() else None
        # what the backends get: the same objects, or for DTensors their local shards (kept with the
        # layout, which is dropped when the shards' addresses change, so the backends' plans cached
        # per tuple are found again)
        self.lparams, self.lw_old, self.lg_old = self.params, self.w_old, self.g_old
        if sh is not None:
            self.lparams = tuple(_shard.locals_(self.params))  # type: ignore[arg-type]
            self.lw_old = tuple(_shard.locals_(self.w_old))  # type: ignore[arg-type]
            self.lg_old = None if self.g_old is None else tuple(_shard.locals_(self.g_old))  # type: ignore[arg-type]
        self.shapes = list(map(_shape_of, self.params))
        self.dtypes = list(map(_dtype_of, self.params))
        self.ptrs = self.pick(opt._layout_key)  # the addresses P had when the layout was made
        self.interned: dict[tuple, tuple] = {}
        self.check_sparse = True

    def trust(self, all_ptrs: tuple[int, ...]) -> None:
        """Hand the addresses just read for every parameter to the next op on ``params`` (the
        Triton launcher then does not read them again; see fastsam.kernels.triton_plan)."""
        self.params.__dict__[TRUSTED_PTRS] = self.pick(all_ptrs)

    def untrust(self) -> None:
        self.params.__dict__.pop(TRUSTED_PTRS, None)

    def column(self, groups: list[dict[str, Any]], key: str) -> PerGroup:
        """A per-tensor column of the perturbing groups' current ``key`` values."""
        return PerGroup(tuple(groups[gi][key] for gi in self.groups), self.group_of)

    def intern(self, tensors: list[Tensor]) -> tuple[Tensor, ...]:
        """The same tuple object for the same tensors (F-SAM's two alternating buffer sets), so
        that the backends' cached launch plans are found again."""
        ids = tuple(map(id, tensors))
        t = self.interned.get(ids)
        if t is None:
            if len(self.interned) >= 4:  # two buffer sets in use; older ones were replaced
                self.interned.clear()
            t = self.interned[ids] = tuple(tensors)
        return t


def _option(name: str, check: Callable[[Any], Any], doc: str) -> property:
    """A SAM option that is validated whenever it is set (at construction and after), and that
    cannot change inside an open step; a change drops the cached layouts and plans."""
    attr = "_opt_" + name

    def get(self: SAM) -> Any:
        return self.__dict__[attr]

    def set_(self: SAM, value: Any) -> None:
        value = check(value)
        d = self.__dict__
        if d.get("_txn") is not None or d.get("_perturbed") is not None:
            raise RuntimeError(f"{name} cannot change while a SAM step is open: finish it (second_step() / "
                               "base_step()) or abandon it (restore()) first")
        old = d.get(attr, _UNSET)
        d[attr] = value
        if all("_opt_" + k in d for k in _FAMILY_KEYS):
            try:
                _check_family(self._options())
            except ValueError:
                if old is _UNSET:
                    del d[attr]
                else:
                    d[attr] = old
                raise
        if name == "perturb_from" and value == "momentum" and "base_optimizer" in d:
            try:
                self._check_momentum_base()
            except ValueError:
                d[attr] = old
                raise
        if "_layouts" in d:
            d["_layouts"].clear()
            d["_fused_plans"].clear()

    return property(get, set_, doc=doc)


def _check_p(v: Any) -> float:
    return check_real("p", v, lo=1.0, lo_open=True, allow_inf=True, what="2 for SAM, math.inf for sign perturbations")


def _check_aesam(v: Any) -> AESAMPolicy | None:
    if v is not None and not isinstance(v, AESAMPolicy):
        raise ValueError(f"aesam must be None or a fastsam.AESAMPolicy(total_steps=...), got {v!r}")
    return v


def _check_perturb_from(v: Any) -> str:
    if v not in PERTURB_FROM:
        raise ValueError(f"perturb_from must be one of {PERTURB_FROM}, got {v!r}")
    return v


def _check_family(o: dict[str, Any]) -> None:
    """The cheap-family choices that do not compose (one choice per axis; see fastsam.optim._cheap)."""
    if o["wsam_gamma"] is not None and o["gsam_alpha"] > 0:
        raise ValueError("wsam_gamma and gsam_alpha are two ways to combine the gradients at w and w + e: set one")
    if o["aesam"] is not None and o["sam_every"] > 1:
        raise ValueError("aesam and sam_every > 1 are two rules for when to perturb: set one")
    if o["perturb_from"] == "momentum" and (o["aesam"] is not None or o["sam_every"] > 1
                                            or o["looksam_alpha"] is not None):
        raise ValueError("perturb_from='momentum' (MSAM) perturbs every step with one pass and no gradient at w: "
                         "it does not combine with sam_every, aesam or looksam_alpha")


def _check_sigma(v: Any) -> float | None:
    return None if v is None else check_real("fsam_sigma", v, lo=0.0, what="None turns F-SAM off")


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
    accumulate in float32 (float64 for float64 parameters), scaled so that no finite gradient
    overflows them.

    Every step is a transaction (see "What fastsam guarantees" in the README): an exception in
    any step method, or in the body of :meth:`perturbed` / the closure of :meth:`step`, leaves the
    weights at ``w`` bit for bit and the optimizer state as before the step; :meth:`restore`
    abandons an open step the same way. The ESAM mask of a step is keyed by the number of
    completed steps (base updates through SAM), so every micro-batch of a step, and every DDP
    rank, draws the same mask, and a skipped or failed step changes no key.

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

    p = _option("p", _check_p, "The perturbation's p-norm (q = p / (p - 1) is the dual exponent).")
    fsam_sigma = _option("fsam_sigma", _check_sigma, "F-SAM's sigma (None: F-SAM off).")
    fsam_lambda = _option("fsam_lambda", lambda v: check_real("fsam_lambda", v, lo=0.0, hi=1.0, hi_open=True),
                          "F-SAM's EMA factor.")
    gsam_alpha = _option("gsam_alpha", lambda v: check_real("gsam_alpha", v, lo=0.0, what="0 disables GSAM"),
                         "GSAM's alpha (0: off).")
    swp_keep = _option("swp_keep", lambda v: check_real("swp_keep", v, lo=0.0, hi=1.0, lo_open=True,
                                                        what="1 disables ESAM weight masks"),
                       "ESAM's keep probability beta (1: off).")
    seed = _option("seed", lambda v: check_int("seed", v, lo=0, hi=2**32 - 1), "ESAM's mask seed.")
    sam_every = _option("sam_every", lambda v: check_int("sam_every", v, lo=1, what="1: every step perturbs"),
                        "Interval SAM / LookSAM: a perturbing step when step_count % sam_every == 0.")
    looksam_alpha = _option("looksam_alpha", lambda v: None if v is None else check_real(
        "looksam_alpha", v, lo=0.0, what="None: non-perturbing steps use g"), "LookSAM's alpha (None: off).")
    aesam = _option("aesam", lambda v: _check_aesam(v), "AE-SAM's policy (None: off).")
    perturb_from = _option("perturb_from", lambda v: _check_perturb_from(v),
                           "'gradient' (SAM) or 'momentum' (MSAM).")
    wsam_gamma = _option("wsam_gamma", lambda v: None if v is None else check_real(
        "wsam_gamma", v, lo=0.0, hi=1.0, hi_open=True, what="None: WSAM off"), "WSAM's gamma (None: off).")
    wsam_decouple = _option("wsam_decouple", lambda v: check_bool("wsam_decouple", v), "WSAM's decoupled form.")

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
        sam_every: int = 1,
        looksam_alpha: float | None = None,
        aesam: AESAMPolicy | None = None,
        perturb_from: str = "gradient",
        wsam_gamma: float | None = None,
        wsam_decouple: bool = True,
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        _check_group_options({"rho": rho, "eta": eta, "adaptive": adaptive})
        check_real("p", p, lo=1.0, lo_open=True, allow_inf=True, what="2 for SAM, math.inf for sign perturbations")
        if fsam_sigma is not None:
            check_real("fsam_sigma", fsam_sigma, lo=0.0, what="None turns F-SAM off")
        check_real("fsam_lambda", fsam_lambda, lo=0.0, hi=1.0, hi_open=True)
        check_real("gsam_alpha", gsam_alpha, lo=0.0, what="0 disables GSAM")
        check_real("swp_keep", swp_keep, lo=0.0, hi=1.0, lo_open=True, what="1 disables ESAM weight masks")
        check_int("seed", seed, lo=0, hi=2**32 - 1)
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        F.resolve_backend(backend)  # an explicitly requested but unavailable backend fails here

        self._init_transient()
        self.p = p
        self.fsam_sigma = fsam_sigma
        self.fsam_lambda = fsam_lambda
        self.gsam_alpha = gsam_alpha
        self.swp_keep = swp_keep
        self.seed = seed
        self.sam_every = sam_every
        self.looksam_alpha = looksam_alpha
        self.aesam = aesam
        self.perturb_from = perturb_from
        self.wsam_gamma = wsam_gamma
        self.wsam_decouple = wsam_decouple
        _check_family(self._options())
        self.backend = backend

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
        self.base_optimizer = base  # from here on param_groups is base.param_groups (one list)
        self.__dict__.pop("_own_param_groups", None)
        self.defaults = {**base.defaults, **self.defaults}
        self._check_params()
        if self.perturb_from == "momentum":
            self._check_momentum_base()

    def _check_momentum_base(self) -> None:
        """MSAM needs a momentum to perturb along: torch's SGD with momentum > 0, or an Adam-family
        base (its ``exp_avg``)."""
        base = self.base_optimizer
        if isinstance(base, torch.optim.SGD):
            if any(g.get("momentum", 0.0) == 0 for g in base.param_groups):
                raise ValueError("perturb_from='momentum' (MSAM) with torch.optim.SGD needs momentum > 0 in every "
                                 "param group (it perturbs along the momentum buffer)")
        elif not isinstance(base, (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam,
                                   torch.optim.Adamax)):
            raise ValueError(f"perturb_from='momentum' (MSAM) needs a base optimizer with a momentum: torch's SGD "
                             f"(momentum > 0), Adam, AdamW, NAdam, RAdam or Adamax (exp_avg); got "
                             f"{type(base).__name__}")

    def _init_transient(self) -> None:
        """Everything that is not saved: buffers of the open step, caches, the open transaction."""
        self._sam_step = 0  # completed steps (base updates through SAM): the ESAM mask key
        self._aesam_stats: tuple[float, float, int] = (0.0, 0.0, 0)  # AE-SAM's (mu, var, observations)
        self._perturbing_steps = 0  # completed steps that perturbed (the cheap family's SAM-step count)
        # this step's decision: (step_count, perturbs, AE-SAM statistics after it), made once per step
        self._decision: tuple[int, bool, tuple[float, float, int] | None] | None = None
        self._perturbed: tuple[Tensor, ...] | None = None  # the tensors perturbed by the open first step
        self._layout: _Layout | None = None  # ... and their layout (saved w, ...)
        self._layouts: OrderedDict[tuple, _Layout] = OrderedDict()  # recent layouts (a few: P may vary)
        self._fused_plans: OrderedDict[tuple, Any] = OrderedDict()  # fastsam.optim._fused plans
        self._mix_cache: dict[tuple, Tensor] = {}  # constant (c1, c2) device tensors of the fused mixes
        self._host_tried = False  # the C++ host helpers (fastsam._host) were tried for this optimizer
        # LookSAM's stored directions as the last fused reuse passed them (the same tuple while
        # they do not change, so the Triton launcher keeps its tables)
        self._gv_tuple: tuple[Tensor | None, ...] = ()
        self._closure_used = False  # step(closure) tracks which gradients are fresh from then on
        self._perturb_ok: Tensor | None = None
        # transient per-parameter buffers (w_old, g_old, partial sums, spare EMA buffers), never saved
        self._scratch: dict[Tensor, dict[str, Tensor]] = {}
        self._grad_marks: tuple[list[Tensor], list[int], list[int | None]] | None = None
        # ids of the parameters whose scratch "acc" buffer holds a partial sum (see accumulate())
        self._acc_live: set[int] = set()
        # LookSAM / decoupled WSAM with micro-batches or accumulation: the gradients at w summed
        # beside the perturbed ones (param -> sum), and the sums load_accumulated handed to the update
        self._acc_g: dict[Tensor, Tensor] = {}
        self._pair_g: dict[Tensor, Tensor] = {}
        self._txn: _Txn | None = None
        self._layout_key: tuple | None = None  # data pointers the aliasing check last passed
        # their sizes: p.data = ... can keep the address with another size (a view of the same storage:
        # p.data[:2], p.data.view(torch.complex64)), so the address alone is not enough; a view as
        # another dtype of the same element size (fp16 <-> bf16, float32 -> int32) is not seen
        self._layout_meta: tuple | None = None
        self._sharding: _shard.Sharding | None = None  # DTensor parameters (FSDP2): see fastsam._shard

    # ------------------------------------------------------------------ param_groups: one list
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        """The base optimizer's ``param_groups`` list itself: an LR scheduler (or anything else)
        on the SAM object and on the base optimizer see one object, whatever is assigned or loaded."""
        d = self.__dict__
        base = d.get("base_optimizer")
        if base is not None:
            return base.param_groups
        if "_own_param_groups" in d:
            return d["_own_param_groups"]
        # a framework wrapper that subclasses our class without our __dict__ (Lightning's
        # LightningOptimizer): AttributeError lets its __getattr__ forward to the SAM inside
        raise AttributeError("param_groups")

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is not None:
            base.param_groups = groups
        else:  # Optimizer.__init__, before the base optimizer exists
            self.__dict__["_own_param_groups"] = groups

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
        """Add a group (also to the base optimizer); validates ``rho``, ``adaptive``, ``eta`` and
        the parameters."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for q in params:
            check_param_tensor(q, "params")
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in params) or len({id(p) for p in params}) != len(params):
            raise ValueError("params: a parameter appears in more than one parameter group")
        param_group = {**param_group, "params": params}
        if "base_optimizer" not in self.__dict__:  # called by Optimizer.__init__
            super().add_param_group(param_group)
            _check_group_options(self.param_groups[-1])
            return
        for k in _GROUP_KEYS:
            param_group.setdefault(k, self.defaults[k])
        _check_group_options(param_group)
        check_group_hyper(param_group, "param_group")
        existing = self._all_params()
        pair = overlapping_pair(existing + params)
        if pair is not None:  # checked before anything is appended: a refused group changes nothing
            i, j = pair
            raise ValueError(
                f"param_group: a new parameter (shape {tuple((existing + params)[j].shape)}) would share memory with "
                f"{'another new one' if i >= len(existing) else 'a parameter already in the optimizer'}: it would be "
                "perturbed twice and could not be restored. Tie weights by using one Parameter object"
            )
        self.base_optimizer.add_param_group(param_group)  # appends to the shared list
        self._check_params()

    def _all_params(self) -> list[Tensor]:
        return list(itertools.chain.from_iterable(g["params"] for g in self.param_groups))

    def _check_params(self) -> list[Tensor]:
        """Real floating-point parameters with storage, and no two of them over the same memory
        (two Parameters of one storage would be perturbed twice and could not be restored).
        The checks run again when the parameters' addresses, sizes or dtypes changed since they
        last passed.
        Returns every parameter, in group order."""
        params = self._all_params()
        sh = self._sharding
        # DTensors report data_ptr 0: their local shards' addresses stand for them
        locs = params if sh is None else _shard.locals_(params)
        # addresses and sizes as the last check saw them (DTensors <-> plain tensors change them): one C loop
        if self._layout_key is not None and _host.layout_equal(locs, self._layout_key, self._layout_meta):
            return params
        key, meta = _host.layout(locs)  # type: ignore[arg-type]
        self._layouts.clear()
        self._fused_plans.clear()
        for i, w in enumerate(params):
            check_param_tensor(w, f"params[{i}]")
        self._sharding = sh = self._make_sharding(params)
        if sh is not None:
            locs = _shard.locals_(params)
            key, meta = _host.layout(locs)  # type: ignore[arg-type]
        pair = overlapping_pair(locs)  # type: ignore[arg-type]
        if pair is not None:
            i, j = pair
            raise ValueError(
                f"params[{i}] (shape {tuple(params[i].shape)}) and params[{j}] (shape {tuple(params[j].shape)}) share "
                "memory: two Parameter objects over one storage (hand-made weight tying, views of one tensor) would "
                "be perturbed twice and could not be restored. Tie weights by using one Parameter object in both "
                "places (e.g. decoder.weight = encoder.weight)"
            )
        self._layout_key = key
        self._layout_meta = meta
        return params

    def _make_sharding(self, params: list[Tensor]) -> _shard.Sharding | None:
        """The sharding of DTensor parameters (FSDP2), None for plain tensors; checks that the
        backend and the options support them."""
        if not params or not any(map(_shard.is_dtensor, params)):
            return None
        sh = _shard.Sharding(params)  # mixed lists, other placements, several meshes: errors
        if self.backend != "auto" and self.backend not in F.SHARDED_BACKENDS:
            raise NotImplementedError(
                f"backend={self.backend!r} does not support sharded (DTensor / FSDP2) parameters yet: use one of "
                f"{F.SHARDED_BACKENDS} ('auto' picks one for them)")
        return sh

    def _check_sharded_options(self) -> None:
        """The options a sharded step supports (checked whenever a layout is made: an option
        change drops the layouts)."""
        sh = self._sharding
        if sh is None:
            return
        if self.swp_keep < 1.0 and not sh.contiguous_shards():
            raise NotImplementedError(
                f"ESAM masks (swp_keep < 1) need each local shard to be a contiguous range of its parameter's "
                f"elements (Shard(0)); placements {sh.placements} shard tensor dim {sh.tensor_dim}")

    def _loc(self, ts: Any) -> Any:
        """Local shards of a list of DTensors (sharded parameters), the list itself otherwise."""
        return ts if self._sharding is None else _shard.locals_(ts)

    @property
    def _reduce(self) -> _shard.Reduce | None:
        sh = self._sharding
        return None if sh is None else sh.reduce

    def _layout_for(self, params: list[Tensor], grads: list[Tensor | None]) -> _Layout:
        """The layout of this step's P (cached: the same parameters with gradients in the same
        perturbing groups give the same object, and with it the backends' cached plans)."""
        groups = self.param_groups
        # (the layouts are dropped whenever the parameters' addresses change: see _check_params)
        # which parameters have no gradient: "none missing" (one C loop) on the usual step
        key = (() if not _host.count_none(grads) else tuple(map(_is_none, grads)), tuple(g["rho"] > 0 for g in groups),
               tuple(len(g["params"]) for g in groups))
        lay = self._layouts.get(key)
        if lay is None:
            self._check_sharded_options()
            lay = _Layout(self, key, params, grads)
            if any(map(_is_sparse, lay.pick(grads))):
                raise ValueError("SAM does not support sparse gradients (params: a parameter has one)")
            # the Triton launcher reports a sparse gradient itself (it reads every gradient's layout
            # anyway): the per-step scan is left to it; the other backends get it here
            lay.check_sparse = F.resolve_backend(self.backend, params[0].device if params else None) != "triton"
            self._layouts[key] = lay
            while len(self._layouts) > 4:  # P changes with frozen parts, rho = 0 groups, no-grad layers
                self._layouts.popitem(last=False)
        else:
            self._layouts.move_to_end(key)
        return lay

    def _own(self) -> None:
        """Step methods run on the SAM object itself: a framework wrapper that subclasses it with a
        __dict__ of its own (Lightning's self.optimizers()) would keep the step's state apart."""
        if "base_optimizer" not in self.__dict__:
            raise RuntimeError(
                f"a SAM method was called on {type(self).__name__}, a framework's wrapper around the SAM optimizer: "
                "the step's state would be written on the wrapper. Call it on the SAM object itself (Lightning: "
                "self.optimizers().optimizer), or let fastsam.sam_step(model, self.optimizers(), ...) drive the step"
            )

    # ------------------------------------------------------------------ transactions
    def _begin(self, outer: bool = False, params: list[Tensor] | None = None,
               grads: list[Tensor | None] | None = None) -> _Txn:
        txn = self._txn
        if txn is None:
            txn = self._txn = _Txn(self, outer, params, grads)
        return txn

    @contextlib.contextmanager
    def _step_scope(self) -> Iterator[_Txn]:
        """One transaction around a whole step made of several calls (sam_step, step(closure),
        perturbed()): the calls inside do not commit on their own; the scope commits when its
        body returns and rolls everything back when it raises."""
        if self._txn is not None and self._txn.outer:
            yield self._txn  # nested in an enclosing step: part of it
            return
        if self._txn is not None:
            raise RuntimeError(
                "a SAM step is open (first_step() or restore(apply_gsam=True) without second_step() / base_step()): "
                "finish it, or call restore() to abandon it, before starting another step"
            )
        txn = self._begin(outer=True)
        try:
            yield txn
        except BaseException:
            if self._txn is txn:
                self._rollback(txn)
            raise
        if self._txn is txn:
            self._commit(txn)

    def _end_call(self, txn: _Txn) -> None:
        """A public step method succeeded: it commits the step unless an outer scope holds it."""
        if not txn.outer and self._txn is txn:
            self._commit(txn)

    def _fail_call(self, txn: _Txn) -> None:
        """A public step method raised: undo the step unless an outer scope will."""
        if not txn.outer and self._txn is txn:
            self._rollback(txn)

    def _commit(self, txn: _Txn) -> None:
        self._txn = None
        if txn.updated:
            d = self._decision
            if d is not None and d[0] == self._sam_step and d[2] is not None:
                self._aesam_stats = d[2]  # AE-SAM's statistics move with the step they decided
            self._decision = None
            self._sam_step += 1
            self._perturbing_steps += txn.perturbed
        for w, old in txn.ema_old.items():  # the replaced EMA buffers become the next step's spares
            if old is not None:
                sc = self._scratch.setdefault(w, {})
                sc["ema_spare"], sc["ready_spare"] = old

    def _rollback(self, txn: _Txn) -> None:
        """Undo the open step: weights back to w, F-SAM EMA and flags, partial sums and the base
        optimizer's state entries created by the step as they were. Idempotent; raises only if
        the weights cannot be put back (then the step stays open with w kept in the optimizer)."""
        if self._perturbed is not None:
            self._restore_weights()
        self._txn = None
        for w, old in txn.ema_old.items():
            st = self.state.get(w)
            if st is None:
                continue
            if old is None:
                st.pop("fsam_ema", None)
                st.pop("fsam_ready", None)
                if not st:
                    self.state.pop(w, None)
            else:
                st["fsam_ema"], st["fsam_ready"] = old
        for w, old_acc in txn.acc_old.items():
            sc = self._scratch.setdefault(w, {})
            if old_acc is None:
                sc.pop("acc", None)
            else:
                sc["acc"] = old_acc
        if txn.acc_live0 is not None:
            self._acc_live = txn.acc_live0
        if txn.pair0 is not None:
            self._acc_g, self._pair_g = txn.pair0
        for w, g in zip(txn.params, txn.grads0):
            w.grad = g
        base_state = self.base_optimizer.state
        for w in txn.created:
            base_state.pop(w, None)
        extra = len(base_state) - txn.base_len0
        if extra > 0:  # entries the base optimizer's own step() added (dicts keep insertion order)
            for w in list(base_state)[-extra:]:
                del base_state[w]
        for w, old_gv in txn.gv_old.items():
            st = self.state.get(w)
            if st is not None:
                if old_gv is None:
                    st.pop("looksam_gv", None)
                    if not st:
                        self.state.pop(w, None)
                else:
                    st["looksam_gv"] = old_gv
        self._decision = None  # a retry decides again from its own gradient (AE-SAM's statistics did not move)
        self._perturb_ok = None

    # ------------------------------------------------------------------ the step
    def _buffer(self, w: Tensor, name: str) -> Tensor:
        bufs = self._scratch.setdefault(w, {})
        buf = bufs.get(name)
        if buf is None or buf.shape != w.shape or buf.dtype != w.dtype or buf.device != w.device:
            buf = torch.empty_like(w, memory_format=torch.preserve_format)
            bufs[name] = buf
        return buf

    def _fsam_lists(self, lay: _Layout, txn: _Txn) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...],
                                                            tuple[Tensor, ...], tuple[Tensor, ...], list[Tensor]]:
        """F-SAM inputs and outputs of a first step: a tensor's first write in a step goes to a
        spare buffer (its committed EMA is kept for a rollback), later ones in place. The lists
        come back as the layout's interned tuples (the same objects while the buffers are)."""
        ema, ready, ema_out, ready_out, forked = [], [], [], [], []
        state, scratch, ema_old = self.state, self._scratch, txn.ema_old
        for w in lay.params:
            st = state[w]
            if "fsam_ema" not in st:  # created now (zeros, not ready): part of the step
                st["fsam_ema"] = torch.zeros_like(w, memory_format=torch.preserve_format)
                st["fsam_ready"] = torch.zeros((), dtype=torch.float32, device=w.device)
                ema_old.setdefault(w, None)
            m, r = st["fsam_ema"], st["fsam_ready"]
            ema.append(m)
            ready.append(r)
            if ema_old.get(w) is not None:  # already written in this step
                ema_out.append(m)
                ready_out.append(r)
            else:
                ema_out.append(self._buffer(w, "ema_spare"))
                sc = scratch[w]
                rs = sc.get("ready_spare")
                if rs is None or rs.device != w.device:
                    rs = sc["ready_spare"] = torch.zeros((), dtype=torch.float32, device=w.device)
                ready_out.append(rs)
                forked.append(w)
        return lay.intern(ema), lay.intern(ready), lay.intern(ema_out), lay.intern(ready_out), forked

    def _check_shapes_unchanged(self) -> tuple[int, ...]:
        """The perturbed parameters still have the shapes and dtypes of their saved ``w``: a
        ``p.data`` replaced by another shape would get ``w`` broadcast into it."""
        lay = self._layout
        assert lay is not None
        params = lay.params
        # the same storages (a same-size view would keep its address: shapes are checked when the
        # addresses moved, which is what p.data = ... does); one C loop
        if _host.layout_equal(params, lay.ptrs):
            return lay.ptrs
        ptrs = _host.addresses(params)
        if list(map(_shape_of, params)) == lay.shapes and list(map(_dtype_of, params)) == lay.dtypes:
            return ptrs
        shapes, dtypes = lay.shapes, lay.dtypes
        idx = next(i for i, w in enumerate(params) if w.shape != shapes[i] or w.dtype != dtypes[i])
        w = params[idx]
        raise RuntimeError(
            f"a perturbed parameter (shape {tuple(shapes[idx])}, {dtypes[idx]}) was replaced by a tensor of shape "
            f"{tuple(w.shape)} and dtype {w.dtype} between first_step() and the end of the step; its unperturbed "
            "weights are kept in the optimizer: put back a tensor of the original shape and dtype (p.data = ...) "
            "and call restore()"
        )

    def _restore_weights(self) -> None:
        """``w <- w_old`` for the perturbed tensors (no GSAM, no state change)."""
        lay = self._layout
        if lay is None:
            return
        self._check_shapes_unchanged()
        F.sam_restore_(lay.lparams, lay.lw_old, backend=self.backend)
        self._set_perturbed(None)

    def _host_on(self, params: list[Tensor]) -> None:
        """On the first step of a fused backend (triton, cuda, cpp), load the C++ host helpers
        (:mod:`fastsam._host`: the per-tensor reads of every step as C loops; a one-time ~20 s
        build where not cached). Same results either way; foreach / reference never build them."""
        if self._host_tried:
            return
        self._host_tried = True
        try:
            fused = bool(params) and F.supports_fused_updates(self.backend, params[0].device)
        except ValueError:
            fused = False  # the step itself reports an unusable backend
        if fused:
            _host.activate()

    def _set_perturbed(self, lay: _Layout | None) -> None:
        self._layout = lay
        self._perturbed = None if lay is None else lay.params

    @_eager
    @no_grad
    def first_step(self, zero_grad: bool = False) -> None:
        """Perturb: ``w_old <- w``, ``w <- w + e(g)`` on every parameter of P (see class doc).

        A non-finite gradient norm perturbs nothing and changes no state (the step counter
        included); see :attr:`perturbation_skipped`. On an exception nothing changes.
        """
        self._own()
        if self._perturbed is not None:
            raise RuntimeError(
                "first_step() called twice: the weights are still perturbed; call second_step() "
                "(or restore()) before the next first_step()"
            )
        params = self._check_params()
        ptrs = self._layout_key  # every parameter's address, read by _check_params just now
        self._host_on(params)
        grads = _host.grads(params)
        txn = self._begin(params=params, grads=grads)
        try:
            groups = self.param_groups
            for gi, group in enumerate(groups):  # a scheduler or user code may have written them
                _check_group_options(group, str(gi))
            momentum = self.perturb_from == "momentum"
            # MSAM perturbs along the base optimizer's momentum v (w~ = w - rho v / |v|): v is the
            # direction and rho changes sign; nothing is perturbed while v does not exist yet
            dirs = self._momentum(params) if momentum else grads
            lay = self._layout_for(params, dirs)
            pgrads = lay.pick(dirs)
            if lay.check_sparse and any(map(_is_sparse, pgrads)):
                raise ValueError("SAM does not support sparse gradients (params: a parameter has one)")
            ema = ready = ema_out = ready_out = None
            forked: list[Tensor] = []
            if self.fsam_sigma is not None:
                ema, ready, ema_out, ready_out, forked = self._fsam_lists(lay, txn)
            lay.trust(ptrs)
            try:
                rho = lay.column(groups, "rho")
                if momentum:
                    rho = PerGroup(tuple(-r for r in rho.values), rho.group_of)
                loc = self._loc
                ok = F.sam_perturb_(
                    lay.lparams, loc(pgrads), lay.lw_old, loc(ema), loc(ready), lay.lg_old, rho,
                    lay.column(groups, "eta"), lay.column(groups, "adaptive"), lay.offsets,
                    p=self.p, fsam_sigma=self.fsam_sigma, fsam_lambda=self.fsam_lambda,
                    swp_keep=self.swp_keep, seed=self.seed, step=self._sam_step,
                    ema_out=loc(ema_out), ready_out=loc(ready_out), backend=self.backend, reduce=self._reduce,
                )
            finally:
                lay.untrust()
            self._set_perturbed(lay)
            self._perturb_ok = ok
            txn.perturbed = True
            for w in forked:  # the new EMA and flags become current; the replaced ones are kept
                st, sc = self.state[w], self._scratch[w]
                old = (st["fsam_ema"], st["fsam_ready"])
                st["fsam_ema"], st["fsam_ready"] = sc.pop("ema_spare"), sc.pop("ready_spare")
                if w in txn.ema_old and txn.ema_old[w] is None:  # created by this step: a rollback drops it
                    sc["ema_spare"], sc["ready_spare"] = old
                else:
                    txn.ema_old[w] = old
            if zero_grad:
                self.zero_grad()
        except BaseException:
            self._fail_call(txn)
            raise

    @_eager
    @no_grad
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` exactly, apply GSAM if enabled, then run the base optimizer step.

        With a fused backend and a torch SGD/Adam/AdamW base this is one pass over the weights.
        On an exception the weights are back at ``w`` and the optimizer state as before the step.
        """
        self._own()
        if self._perturbed is None:
            raise RuntimeError(
                "second_step() called without a matching first_step(): compute the gradient at w, "
                "call first_step(), compute the gradient at the perturbed point, then second_step()"
            )
        ptrs = self._check_shapes_unchanged()  # before anything: the step stays open, w kept
        txn = self._begin()
        params = self._all_params()
        try:
            self._check_base_hyper()
            lay = self._layout
            assert lay is not None
            mix = self._family_combine(lay, txn, defer_mix=True)
            grads = _host.grads(params)
            if fused_second_step(self, lay, txn, params, grads, ptrs, mix=mix):
                self._set_perturbed(None)  # WSAM's mix, if any, was the fused update's own
            else:
                if mix is not None:
                    self._wsam_unfused(lay, txn)
                self._restore_and_combine()
                self.base_optimizer.step()
                grads = None  # the base optimizer's step may have replaced them
            self._wsam_correct(txn)
            txn.updated = True
        except BaseException:
            self._fail_call(txn)
            raise
        self._end_call(txn)
        self._after_base_step(params, grads)
        if zero_grad:
            self.zero_grad()

    def _looksam_store(self, lay: _Layout, txn: _Txn) -> None:
        """LookSAM's SAM step: ``gv_hat`` from the gradients at w + e (``.grad``) and at w (``g_old``),
        into new tensors (the previous ones are kept by the transaction)."""
        assert lay.g_old is not None
        idx = [i for i, w in enumerate(lay.params) if w.grad is not None]
        ws = [lay.params[i] for i in idx]
        self._looksam_store_from(ws, [w.grad for w in ws], [lay.g_old[i] for i in idx], txn)

    def _looksam_store_from(self, ws: list[Tensor], gs: list[Tensor], g: list[Tensor], txn: _Txn) -> None:
        # sharded: the global <gs, g>, |g|, |gv| in one collective (DTensor ops would issue several)
        reduce = self._reduce
        outs = _cheap.looksam_project(gs, g) if reduce is None else _cheap.looksam_project_sharded(gs, g, reduce)
        for w, gv in zip(ws, outs):
            st = self.state[w]
            if w not in txn.gv_old:
                txn.gv_old[w] = st.get("looksam_gv")
            st["looksam_gv"] = gv

    def _family_combine(self, lay: _Layout, txn: _Txn, defer_mix: bool = False) -> _fused.Mix | None:
        """Before a perturbing step's update, with ``gs`` in ``.grad`` and ``g`` in ``g_old``:
        LookSAM keeps ``gv_hat``; WSAM writes the gradient the base optimizer steps with into
        ``.grad`` (``a gs + (1 - a) g``; decoupled: ``g``, with ``gs - g`` kept for the correction
        after the update). GSAM's combine is the fused update's own. ``defer_mix``: WSAM's
        ``a gs + (1 - a) g`` is returned as the fused update's mix instead of written here (the
        caller runs :meth:`_wsam_unfused` if the update is not fused); decoupled WSAM's too, as
        ``(0, 1, lr a)`` (the update with g, then ``w -= lr a (gs - g)``), when the perturbed
        groups share one float lr."""
        if lay.g_old is None or not lay.params or txn.combined:
            return None
        txn.combined = True
        if self.looksam_alpha is not None:
            self._looksam_store(lay, txn)
        if self.wsam_gamma is None:
            return None
        a = self.wsam_gamma / (1.0 - self.wsam_gamma)
        dev = lay.params[0].device
        if defer_mix and not self.wsam_decouple:
            return None, self._mix_coef(dev, a, 1.0 - a), True
        coef = self._decoupled_coef(dev) if defer_mix else None
        if coef is not None:
            return None, coef, True
        self._wsam_unfused(lay, txn)
        return None

    def _decoupled_coef(self, device: torch.device) -> Tensor | None:
        """Decoupled WSAM's fused mix ``(0, 1, lr a)``: the update with g, then ``w -= lr a (gs - g)``;
        None (foreach ops) unless the perturbed groups share one float lr."""
        assert self.wsam_gamma is not None
        lrs = {g["lr"] for g in self.param_groups if g["rho"] > 0}
        lr = next(iter(lrs)) if len(lrs) == 1 else None
        if not isinstance(lr, (int, float)) or isinstance(lr, bool):
            return None
        return self._mix_coef(device, 0.0, 1.0, float(lr) * self.wsam_gamma / (1.0 - self.wsam_gamma))

    def _wsam_decoupled_prep(self, ws: list[Tensor], g: list[Tensor], txn: _Txn) -> None:
        """Decoupled WSAM with foreach ops: ``.grad <- g`` (the base update's gradient), ``gs - g``
        kept for :meth:`_wsam_correct` after the update."""
        assert self.wsam_gamma is not None
        a = self.wsam_gamma / (1.0 - self.wsam_gamma)
        lr_of = {id(w): float(grp["lr"]) for grp in self.param_groups for w in grp["params"]}
        scales = [lr_of[id(w)] * a for w in ws]
        loc = self._loc  # sharded: elementwise on the local shards (DTensor has no foreach copy)
        gs = loc([w.grad for w in ws])
        g = loc(g)
        d = torch._foreach_sub(gs, g)
        torch._foreach_copy_(gs, g)
        txn.wsam_pending = (loc(ws), d, scales)

    def _wsam_unfused(self, lay: _Layout, txn: _Txn) -> None:
        """WSAM with foreach ops: ``.grad <- a gs + (1 - a) g`` (one lerp); decoupled: ``.grad <- g``
        with ``gs - g`` kept for :meth:`_wsam_correct` after the base update."""
        assert lay.g_old is not None and self.wsam_gamma is not None
        if not self.wsam_decouple:
            self._wsam_mix(lay)
            return
        ws = [(w, go) for w, go in zip(lay.params, lay.g_old) if w.grad is not None]
        self._wsam_decoupled_prep([w for w, _ in ws], [go for _, go in ws], txn)

    def _wsam_mix(self, lay: _Layout) -> None:
        """WSAM (not decoupled), unfused: ``.grad <- a gs + (1 - a) g`` (one lerp)."""
        assert lay.g_old is not None and self.wsam_gamma is not None
        a = self.wsam_gamma / (1.0 - self.wsam_gamma)
        ws = [(w, go) for w, go in zip(lay.params, lay.g_old) if w.grad is not None]
        gs = self._loc([w.grad for w, _ in ws])  # sharded: elementwise on the local shards
        _cheap.wsam_mix(gs, self._loc([go for _, go in ws]), a, gs)

    def _mix_coef(self, device: torch.device, *cs: float) -> Tensor:
        """``(c1, c2[, c3])`` as a float64 tensor on ``device``, kept for constant coefficients
        (WSAM's; decoupled WSAM's ``lr a`` changes with a scheduler: a few are kept)."""
        key = (device, *cs)
        t = self._mix_cache.get(key)
        if t is None:
            if len(self._mix_cache) > 8:
                self._mix_cache.clear()
            t = self._mix_cache[key] = torch.tensor(cs, dtype=torch.float64).to(device, non_blocking=True)
        return t

    def _wsam_correct(self, txn: _Txn) -> None:
        """Decoupled WSAM after the base update: ``w -= lr a (gs - g)``."""
        pending = txn.wsam_pending
        if pending is not None:
            txn.wsam_pending = None
            ws, d, scales = pending
            _cheap.wsam_decoupled(ws, d, scales)

    def _restore_and_combine(self) -> None:
        """Weights back to ``w`` and, with GSAM, ``.grad`` replaced by the combined gradient."""
        lay = self._layout
        if lay is None:
            return
        self._restore_weights()
        if self.gsam_alpha > 0 and lay.g_old is not None:
            pairs = [(w.grad, go) for w, go in zip(lay.params, lay.g_old) if w.grad is not None]
            if pairs:
                gs, go = (list(t) for t in zip(*pairs))
                F.gsam_combine_(self._loc(gs), self._loc(go), self.gsam_alpha, backend=self.backend,
                                reduce=self._reduce)

    @_eager
    @no_grad
    def restore(self, apply_gsam: bool = False) -> None:
        """Put the weights back to ``w_old`` (bit-exact) without a base step.

        ``restore()`` abandons the open step: the weights return to ``w``, and the F-SAM EMA,
        partial sums and step counter to where they were before it began, as if it never
        started. No-op when no step is open, so it is safe in any exception handler (and after
        a skipped perturbation).

        ``restore(apply_gsam=True)`` instead continues the step: weights back to ``w`` and, when
        ``gsam_alpha > 0``, ``.grad`` replaced by the GSAM combination (what :meth:`second_step`
        does before its base step), for a loop that does something between the restore and
        :meth:`base_step` (e.g. clipping), which then completes the step.
        """
        self._own()
        txn = self._txn
        if not apply_gsam:
            if txn is not None:
                self._rollback(txn)
            elif self._perturbed is not None:
                self._restore_weights()
            return
        if self._perturbed is None:
            return
        txn = self._begin()
        try:
            lay = self._layout
            assert lay is not None
            self._family_combine(lay, txn)  # LookSAM / WSAM (decoupled WSAM corrects after base_step)
            self._restore_and_combine()
        except BaseException:
            self._fail_call(txn)
            raise

    @_eager
    @no_grad
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
        not in :meth:`state_dict`, dropped by :meth:`load_state_dict`. The new sums are written
        to other buffers than the old ones, so an exception leaves the sums as they were.
        """
        self._own()
        check_real("weight", weight)
        check_real("scale", scale)
        if self._perturbed is not None:
            self._check_shapes_unchanged()
        txn = self._begin()
        try:
            lay = self._layout
            if self._needs_pair():
                self._accumulate_g(lay, txn, float(weight), float(scale))
            if lay is not None and lay.params and lay.g_old is not None:
                # WSAM per micro-batch: a gs + (1 - a) g, then summed
                if self.wsam_gamma is not None and not self.wsam_decouple:
                    a = self.wsam_gamma / (1.0 - self.wsam_gamma)
                    ws = [(w, go) for w, go in zip(lay.params, lay.g_old) if w.grad is not None]
                    gs = self._loc([w.grad for w, _ in ws])  # sharded: on the local shards
                    _cheap.wsam_mix(gs, self._loc([go for _, go in ws]), a, gs)
            perturbed = {} if lay is None else {id(w): i for i, w in enumerate(lay.params)}
            live = self._acc_live
            params: list[Tensor] = []
            grads: list[Tensor | None] = []
            w_old: list[Tensor | None] = []
            g_old: list[Tensor | None] = []
            acc: list[Tensor | None] = []
            acc_in: list[Tensor | None] = []
            reset: list[bool] = []
            gsam = self.gsam_alpha > 0 and bool(perturbed)
            forked: list[Tensor] = []
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
                    w_old.append(lay.w_old[perturbed[id(w)]] if in_p else None)  # type: ignore[union-attr]
                    g_old.append(lay.g_old[perturbed[id(w)]] if in_p and gsam else None)  # type: ignore[union-attr,index]
                    reset.append(not is_live)
                    if g is None and not is_live:
                        acc.append(None)
                        acc_in.append(None)
                        continue
                    cur = self._scratch.setdefault(w, {}).get("acc") if is_live else None
                    if w in txn.acc_old:  # written in this step already: in place
                        acc.append(cur)
                        acc_in.append(cur)
                    else:  # the step's first write: into another buffer, the committed sum kept
                        acc.append(self._buffer(w, "acc_spare"))
                        acc_in.append(cur)
                        forked.append(w)
            if params:
                loc = self._loc
                F.sam_restore_accumulate_(
                    loc(params), loc(grads), loc(w_old), loc(g_old) if gsam else None, loc(acc), reset,
                    weight=float(weight), scale=float(scale), gsam_alpha=self.gsam_alpha if gsam else 0.0,
                    acc_in=loc(acc_in), backend=self.backend, reduce=self._reduce,
                )
            self._set_perturbed(None)
            if txn.acc_live0 is None:
                txn.acc_live0 = set(live)
            for w, a in zip(params, acc):
                if a is not None:
                    live.add(id(w))
            for w in forked:
                sc = self._scratch[w]
                txn.acc_old[w] = sc.get("acc") if id(w) in txn.acc_live0 else None
                sc["acc"] = sc.pop("acc_spare")
        except BaseException:
            self._fail_call(txn)
            raise
        self._end_call(txn)

    def load_accumulated(self) -> None:
        """``.grad <- acc`` for every parameter with an accumulated sum (``None`` for the others)
        and start a new accumulation; see :meth:`accumulate`. The weights must be unperturbed."""
        if self._perturbed is not None:
            raise RuntimeError("load_accumulated() while the weights are perturbed; call accumulate() first")
        live = self._acc_live
        txn = self._txn
        if txn is not None and txn.acc_live0 is None:
            txn.acc_live0 = set(live)
        for group in self.param_groups:
            for w in group["params"]:
                # hand the buffer over: .grad must not alias the next step's running sum (an
                # in-place zero_grad(set_to_none=False) or a kept reference would corrupt it)
                if id(w) in live:
                    sc = self._scratch[w]
                    if txn is not None and w not in txn.acc_old:
                        txn.acc_old[w] = sc.get("acc")  # committed: put back if the step fails
                    w.grad = sc.pop("acc")
                else:
                    w.grad = None
        self._acc_live = set()
        if self._acc_g or self._pair_g:  # LookSAM / decoupled WSAM: the sums of g go with gs to the update
            self._save_pair(txn)
            self._pair_g, self._acc_g = self._acc_g, {}

    def clear_accumulated(self) -> None:
        """Drop the partial sums of :meth:`accumulate` (the next call starts from 0)."""
        txn = self._txn
        if txn is not None and txn.acc_live0 is None:
            txn.acc_live0 = set(self._acc_live)
        self._acc_live = set()
        if self._acc_g or self._pair_g:
            self._save_pair(txn)
            self._acc_g, self._pair_g = {}, {}

    def _needs_pair(self) -> bool:
        """LookSAM and decoupled WSAM combine the step's two gradients after the update's gradient is
        known: under accumulation the gradients at w are summed beside the perturbed ones."""
        return self.looksam_alpha is not None or (self.wsam_gamma is not None and self.wsam_decouple)

    def _save_pair(self, txn: _Txn | None) -> None:
        if txn is not None and txn.pair0 is None:
            txn.pair0 = (self._acc_g, self._pair_g)  # replaced, never written in place: references suffice

    def _accumulate_g(self, lay: _Layout | None, txn: _Txn, weight: float, scale: float) -> None:
        """``acc_g <- scale * (acc_g + weight * g)`` beside :meth:`accumulate`'s sum of gs, with ``g``
        the micro-batch's gradient at w (``g_old``) on the perturbed tensors, into new tensors (the
        old sums are kept for a rollback). A non-perturbed micro-batch adds nothing (its gradient is
        the sum's own: LookSAM's plain steps take the mean of g as it is)."""
        old = self._acc_g
        new = dict(old)
        hit: set[int] = set()
        if lay is not None and lay.params and lay.g_old is not None:
            pairs = [(w, go) for w, go in zip(lay.params, lay.g_old) if w.grad is not None]
            if pairs:
                ws = [w for w, _ in pairs]
                vals = torch._foreach_mul([go for _, go in pairs], weight)
                have = [i for i, w in enumerate(ws) if w in old]
                if have:
                    torch._foreach_add_([vals[i] for i in have], [old[ws[i]] for i in have])
                if scale != 1.0:
                    torch._foreach_mul_(vals, scale)
                for w, v in zip(ws, vals):
                    new[w] = v
                    hit.add(id(w))
        rest = [w for w in old if id(w) not in hit]
        if scale != 1.0 and rest:  # sums this micro-batch did not touch are scaled too, as accumulate() scales them
            for w, v in zip(rest, torch._foreach_mul([old[w] for w in rest], scale)):  # one op, new tensors
                new[w] = v
        if new or old:
            self._save_pair(txn)
            self._acc_g = new

    @property
    def has_accumulated(self) -> bool:
        """True if :meth:`accumulate` holds partial sums not yet loaded or cleared."""
        return bool(self._acc_live)

    @_eager
    @no_grad
    def base_step(self) -> None:
        """Run the base optimizer on the gradients in ``.grad`` (weights must be unperturbed).

        With a fused backend and a torch SGD/Adam/AdamW base this is the same fused update as
        :meth:`second_step` without the restore: one pass, torch's update formula computed in
        float32 (float64 for float64 parameters) and rounded once, base optimizer state kept
        where torch keeps it; otherwise ``base_optimizer.step()``. Completes the open step (if
        any) and counts one SAM step.
        """
        self._own()
        if self._perturbed is not None:
            raise RuntimeError("base_step() while the weights are perturbed; call restore() first")
        txn = self._begin()
        try:
            if self._pair_g:
                self._pair_update(txn)
            else:
                self._base_update(txn)
            self._wsam_correct(txn)
            txn.updated = True
        except BaseException:
            self._fail_call(txn)
            raise
        self._end_call(txn)
        self._after_base_step()

    def _pair_update(self, txn: _Txn) -> None:
        """The update of a LookSAM / decoupled WSAM step whose gradients were accumulated: ``gs``
        (the loaded sum) in ``.grad``, ``g`` in the loaded sums of the gradients at w. LookSAM keeps
        ``gv_hat`` from them (with GSAM the sums are GSAM's combined gs, whose part orthogonal to g
        is gs's own times ``1 + alpha cos |g| / |gs|``: the same direction); decoupled WSAM updates
        with g, then ``w -= lr a (gs - g)``."""
        pair = self._pair_g
        self._save_pair(txn)
        self._pair_g = {}
        ws = [w for w in pair if w.grad is not None]
        if self.looksam_alpha is not None:
            self._looksam_store_from(ws, [w.grad for w in ws], [pair[w] for w in ws], txn)
        if self.wsam_gamma is not None and self.wsam_decouple and ws:
            coef = self._decoupled_coef(ws[0].device)
            self._check_base_hyper()
            if coef is None or not fused_second_step(
                    self, None, txn, mix=(lambda us: tuple(pair.get(u) for u in us), coef, True)):
                self._wsam_decoupled_prep(ws, [pair[w] for w in ws], txn)
                self.base_optimizer.step()
            return
        self._base_update(txn)

    def _needs_g_old(self) -> bool:
        """The first step keeps the gradient at w (GSAM, LookSAM and WSAM combine it with gs)."""
        return self.gsam_alpha > 0 or self.looksam_alpha is not None or self.wsam_gamma is not None

    def _momentum(self, params: list[Tensor]) -> list[Tensor | None]:
        """MSAM's direction per parameter: the base optimizer's momentum (SGD ``momentum_buffer``,
        Adam/AdamW ``exp_avg``), None where it does not exist yet."""
        state = self.base_optimizer.state
        out: list[Tensor | None] = []
        for w in params:
            st = state.get(w)
            v = None if not st else st.get("momentum_buffer", st.get("exp_avg"))
            out.append(v if isinstance(v, Tensor) else None)
        return out

    @property
    def perturbs_next_step(self) -> bool | None:
        """Whether the next step perturbs (two passes), when that is known before its gradient:
        True for SAM and MSAM (whose one pass is at the perturbed point),
        ``step_count % sam_every == 0`` for interval SAM and LookSAM, None for AE-SAM until
        :meth:`wants_perturbation` has seen the step's gradient."""
        d = self._decision
        if d is not None and d[0] == self._sam_step:
            return d[1]
        if self.aesam is not None:
            return None
        return self._sam_step % self.sam_every == 0

    @no_grad
    def wants_perturbation(self, sq_norm: float | Tensor | None = None) -> bool:
        """Decide this step, after its first backward (``g`` in ``.grad``): True means a SAM step
        (:meth:`first_step`, the second pass, :meth:`second_step`), False a one-pass step
        (:meth:`plain_step`). Interval SAM / LookSAM decide from the step count; AE-SAM from
        ``q = |g|^2`` over the perturbed parameters (one host sync; ``sq_norm`` gives it instead,
        e.g. averaged over DDP ranks) and its statistics, which move when the step completes. The
        answer is kept for the step (a second call returns it)."""
        d = self._decision
        if d is not None and d[0] == self._sam_step:
            return d[1]
        policy = self.aesam
        if policy is None:
            perturb = self._sam_step % self.sam_every == 0
            self._decision = (self._sam_step, perturb, None)
            return perturb
        if sq_norm is None:
            gs = [w.grad for g in self.param_groups if g["rho"] > 0 for w in g["params"] if w.grad is not None]
            sq_norm = _cheap.sq_norm(gs)
        q = float(sq_norm)
        stats = policy.update(self._aesam_stats, q)
        perturb = policy.perturbs(stats, q, self._sam_step)
        self._decision = (self._sam_step, perturb, stats)
        return perturb

    @property
    def perturbing_steps(self) -> int:
        """Completed steps that perturbed (two passes; MSAM: every step). With
        :attr:`step_count`, the fraction of SAM steps interval SAM / LookSAM / AE-SAM took."""
        return self._perturbing_steps

    @_eager
    @no_grad
    def plain_step(self) -> None:
        """A non-perturbing step of interval SAM / LookSAM / AE-SAM: the base update with the
        gradient at ``w`` in ``.grad`` (LookSAM: with ``g + alpha |g| gv_hat`` on the perturbed
        parameters, ``|g|`` global over them). Counts as a step; on an exception nothing changes."""
        self._own()
        if self._perturbed is not None:
            raise RuntimeError("plain_step() while the weights are perturbed: finish the SAM step with second_step()")
        if self._pair_g:
            raise RuntimeError("plain_step() after load_accumulated() of perturbed micro-batches: LookSAM / decoupled "
                               "WSAM need both gradients of that step; finish it with base_step()")
        alpha = self.looksam_alpha
        if alpha is None:
            self.base_step()
            return
        txn = self._begin()
        try:
            params, gs, gvs = [], [], []
            for group in self.param_groups:
                if group["rho"] <= 0:
                    continue
                for w in group["params"]:
                    if w.grad is None:
                        continue
                    params.append(w)
                    gs.append(w.grad)
                    st = self.state.get(w)
                    gvs.append(None if not st else st.get("looksam_gv"))
            if any(v is not None for v in gvs) and self._fused_reuse(params, gs, gvs, alpha, txn):
                txn.updated = True
                self._end_call(txn)
                self._after_base_step()
                return
            outs = _cheap.looksam_reuse(gs, gvs, alpha, reduce=self._reduce)  # sharded: |g| in one collective
            for w, d in zip(params, outs):  # the reused gradient stands in for g during the update
                w.grad = d
            try:
                self._base_update(txn)
            finally:
                for w, g in zip(params, gs):
                    w.grad = g
            txn.updated = True
        except BaseException:
            self._fail_call(txn)
            raise
        self._end_call(txn)
        self._after_base_step()

    def _fused_reuse(self, params: list[Tensor], gs: list[Tensor], gvs: list[Tensor | None], alpha: float,
                     txn: _Txn) -> bool:
        """LookSAM's non-perturbing step as one fused update: ``g + alpha |g| gv_hat`` formed in the
        update kernel from the device scalar ``alpha |g|`` (one norm pass, then the update reads
        ``gv_hat`` beside ``g``; ``.grad`` keeps ``g``). False when the update is not fused (the
        caller then combines with foreach ops and runs the base optimizer)."""
        if self._sharding is not None or not F.supports_fused_updates(self.backend, params[0].device):
            return False  # sharded: no fused update (fused_second_step), and |g| needs the reduce hook
        c2 = alpha * _cheap.sq_norm(gs).sqrt()
        coef = torch.stack([torch.ones_like(c2), c2]).to(params[0].device)
        by_id = {id(w): v for w, v in zip(params, gvs)}

        def others(ws: Sequence[Tensor]) -> tuple[Tensor | None, ...]:
            out = tuple(by_id.get(id(w)) for w in ws)
            old = self._gv_tuple
            if len(old) == len(out) and all(map(operator.is_, old, out)):
                return old
            self._gv_tuple = out
            return out

        self._check_base_hyper()
        return fused_second_step(self, None, txn, mix=(others, coef, False))

    def _base_update(self, txn: _Txn) -> None:
        """The base optimizer's update with the gradients in ``.grad`` at unperturbed weights: the
        fused one where the backend has it, else ``base_optimizer.step()`` (base_step, plain_step)."""
        self._check_base_hyper()
        if not fused_second_step(self, None, txn):
            self.base_optimizer.step()

    def _check_base_hyper(self) -> None:
        """The base optimizer's hyper-parameters are finite before it updates (on every path: a
        NaN lr from a scheduler would otherwise write NaN into every weight of its group)."""
        for gi, group in enumerate(self.param_groups):
            check_group_hyper(group, f"param group {gi}")

    def _after_base_step(self, params: list[Tensor] | None = None, grads: list[Tensor | None] | None = None) -> None:
        self._opt_called = True  # tells torch's LR schedulers that an optimizer step happened
        if self._closure_used:
            self._mark_grads(params, grads)
        else:  # only step(closure) reads the marks: an optimizer that never used it saves the passes
            self._grad_marks = _UNMARKED

    @property
    def is_perturbed(self) -> bool:
        """True between :meth:`first_step` and :meth:`second_step` / :meth:`restore`."""
        return self._perturbed is not None

    @property
    def step_count(self) -> int:
        """Completed SAM steps (base updates through SAM): the key of the next step's ESAM mask."""
        return self._sam_step

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
        ``second_step`` (or, with ``step=False``, :meth:`restore`: the step is abandoned); on any
        exception, in the body or in the exit's ``second_step``, the whole step is undone
        (weights at ``w``, state as before) and the exception propagates.

        ::

            loss_fn(model(x), y).backward()
            with opt.perturbed():
                loss_fn(model(x), y).backward()
        """
        with self._step_scope():
            self.first_step(zero_grad=zero_grad)
            yield self
            if step:
                self.second_step()
            else:
                self.restore()

    def _mark_grads(self, params: list[Tensor] | None = None, grads: list[Tensor | None] | None = None) -> None:
        """Remember which gradient tensors are "stale" (already used by a SAM step): their ids and
        version counters (C-level passes). An id reused by a new gradient can only make a fresh
        gradient look stale, which costs step(closure) one more closure call, never a stale
        gradient look fresh (the marked tensor itself would have to change)."""
        if params is None or grads is None:
            params = self._all_params()
            grads = list(map(_grad_of, params))
        if any(map(_is_none, grads)):
            versions = [None if g is None else g._version for g in grads]
        else:
            versions = list(map(_version_of, grads))
        self._grad_marks = (params, list(map(id, grads)), versions)

    def _has_fresh_grads(self) -> bool:
        """True if some parameter got a gradient since the last second_step / zero_grad."""
        params = self._all_params()
        marked = self._grad_marks
        if marked is _UNMARKED:  # a step made without step(closure), which left its gradients in place
            present = any(w.grad is not None for w in params)
            if present:
                warnings.warn(
                    "SAM.step(closure) after a step made with first_step()/second_step() that left its gradients "
                    "in place: they are taken as this step's first-pass gradient (as after loss.backward()). If they "
                    "are the previous step's, call opt.zero_grad() (or second_step(zero_grad=True)) after each step",
                    stacklevel=3)
            return present
        if marked is None or len(marked[0]) != len(params) or not all(map(operator.is_, marked[0], params)):
            return any(w.grad is not None for w in params)
        for w, gid, version in zip(params, marked[1], marked[2]):
            grad = w.grad
            if grad is None:
                continue
            if id(grad) != gid or grad._version != version:
                return True
        return False

    @_eager
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Whole SAM step: [closure], first_step, closure, second_step.

        ``closure`` runs forward + backward and returns the loss (clearing gradients first, as
        torch's closure convention). If fresh gradients are already present (davda54/sam usage:
        ``loss.backward(); opt.step(closure)``) they are the first-pass gradient and the closure
        runs once; otherwise it runs twice. Returns the first closure call's loss. An exception
        anywhere (a closure call included) undoes the whole step before it propagates.
        """
        if closure is None:
            raise ValueError(
                "SAM.step requires closure (forward + backward returning the loss): a SAM step needs two "
                "forward/backward passes. Use fastsam.sam_step(model, opt, x, y, loss_fn), or first_step() / "
                "second_step() by hand; with Hugging Face transformers use "
                "fastsam.integrations.transformers.SAMTrainer instead of transformers.Trainer; with Lightning, "
                "manual optimization and fastsam.sam_step(model, self.optimizers(), ...) (automatic optimization "
                "under 16-mixed calls step() without the closure)"
            )
        if not callable(closure):
            raise ValueError(f"closure must be callable (forward + backward returning the loss), got {closure!r}")
        self._own()
        self._closure_used = True  # from now on every step records which gradients it used
        from ..integrations._wrappers import lightning_closure_problem  # stdlib + torch only

        problem = lightning_closure_problem(closure)
        if problem is not None:
            raise RuntimeError(problem)
        closure = torch.enable_grad()(closure)
        with self._step_scope():
            if self.perturb_from == "momentum":  # MSAM: one closure call, at the point perturbed along the momentum
                self.first_step(zero_grad=True)
                loss = closure()
                self.second_step()
                return loss
            loss = None
            if not self._has_fresh_grads():
                loss = closure()
            if not self.wants_perturbation():  # interval SAM / LookSAM / AE-SAM: a one-pass step
                self.plain_step()
                return loss
            self.first_step(zero_grad=True)
            loss2 = closure()
            self.second_step()
        return loss2 if loss is None else loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``; with ``set_to_none`` (the default) it runs no tensor op
        (not even the profiler marker), so it cannot fail inside a step that must not."""
        if set_to_none:
            for w in self._all_params():
                w.grad = None
            self._grad_marks = None  # none left: any gradient present later is fresh
        else:
            super().zero_grad(set_to_none=False)
            self._mark_grads()

    # ------------------------------------------------------------------ checkpoints
    def _check_no_open_step(self, what: str) -> None:
        if self._perturbed is not None or self._txn is not None:
            raise RuntimeError(
                f"{what} while a SAM step is open (the weights may be perturbed and the step's F-SAM EMA and "
                "partial sums are not final): finish the step with second_step() / base_step(), or abandon it "
                "with restore(), first"
            )

    def _options(self) -> dict[str, Any]:
        d = self.__dict__
        return {"p": self.p, "fsam_sigma": self.fsam_sigma, "fsam_lambda": self.fsam_lambda,
                "gsam_alpha": self.gsam_alpha, "swp_keep": self.swp_keep, "seed": self.seed,
                "sam_every": d.get("_opt_sam_every", 1), "looksam_alpha": d.get("_opt_looksam_alpha"),
                "aesam": d.get("_opt_aesam"), "perturb_from": d.get("_opt_perturb_from", "gradient"),
                "wsam_gamma": d.get("_opt_wsam_gamma"), "wsam_decouple": d.get("_opt_wsam_decouple", True)}

    def _saved_options(self) -> dict[str, Any]:
        """:meth:`_options` as a checkpoint holds them (AE-SAM's policy as a plain dict)."""
        o = self._options()
        if o["aesam"] is not None:
            o["aesam"] = o["aesam"].as_dict()
        return o

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """``{"base_optimizer": <the base's own state_dict, loadable by plain torch>,
        "sam": {"version", "step", "seed", "state": {param index: F-SAM EMA and flag}, "options"}}``.

        Transient buffers (``w_old``, ``g_old``, partial sums) are never saved. Raises a
        RuntimeError while a step is open (finish or abandon it first).
        """
        self._check_no_open_step("state_dict()")
        sam_state = {}
        for i, w in enumerate(self._all_params()):
            st = self.state.get(w)
            if st:
                sam_state[i] = dict(st)
        return {
            "base_optimizer": self.base_optimizer.state_dict(),
            "sam": {
                "version": 3,
                "step": self._sam_step,
                "seed": self.seed,
                "state": sam_state,
                "options": self._saved_options(),
                # AE-SAM's statistics (mu, var, observations) and the perturbing steps so far
                "aesam_stats": list(self._aesam_stats),
                "perturbing_steps": self._perturbing_steps,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:  # type: ignore[override]
        """Load a :meth:`state_dict`; continuing gives bit-identical results to an
        uninterrupted run (the ESAM step counter and seed are restored too).

        The whole checkpoint is checked before anything changes: its structure, the number of
        parameter groups and parameters, the shapes of every saved state tensor against its
        parameter, the saved per-group rho/eta/adaptive, and the SAM options it was saved with
        (p, F-SAM, GSAM, ESAM keep ratio and seed). A malformed or mismatched checkpoint raises a
        ValueError saying what differs and leaves the optimizer untouched.

        ``strict=False`` loads a checkpoint saved with other SAM options, keeping this
        optimizer's options (and seed) and warning about what differs; it also accepts a plain
        torch optimizer state dict (``{"state", "param_groups"}``) for the base optimizer, with a
        fresh SAM state (step 0, no F-SAM EMA).
        """
        self._check_no_open_step("load_state_dict()")
        plain = isinstance(state_dict, dict) and "state" in state_dict and "param_groups" in state_dict
        if plain:
            if strict:
                raise ValueError(
                    "state_dict is a plain torch optimizer state dict (keys 'state' and 'param_groups'), not "
                    "fastsam.SAM.state_dict() (keys 'base_optimizer' and 'sam'); pass strict=False to load it into "
                    "the base optimizer with a fresh SAM state (step 0, no F-SAM EMA)"
                )
            state_dict = {"base_optimizer": state_dict,
                          "sam": {"version": 3, "step": 0, "seed": self.seed, "state": {},
                                  "options": self._saved_options()}}
        if not isinstance(state_dict, dict) or "base_optimizer" not in state_dict or "sam" not in state_dict:
            raise ValueError(
                "state_dict must come from fastsam.SAM.state_dict() (keys 'base_optimizer' and 'sam'), got "
                f"{type(state_dict).__name__}" + (f" with keys {sorted(map(str, state_dict))}"
                                                   if isinstance(state_dict, dict) else "")
            )
        base_sd, sam = state_dict["base_optimizer"], state_dict["sam"]
        params = self._all_params()
        self._validate_base_state(base_sd, params)
        if plain:  # a plain torch state has no rho / adaptive / eta: the groups keep ours
            base_sd = {**base_sd, "param_groups": [
                {**{k: g[k] for k in (*_GROUP_KEYS, "initial_rho") if k in g}, **sg}
                for sg, g in zip(base_sd["param_groups"], self.param_groups)]}
        sam_state, step, seed, keep = self._validate_sam_state(sam, params, strict)
        family = self._validate_family_state(sam)
        # everything checked: load (torch's load_state_dict replaces groups and state as a whole). A
        # base optimizer can still refuse what no generic check sees (its own __setstate__ runs
        # after the replacement): then its previous state and groups are put back
        base = self.base_optimizer
        kept = {k: base.__dict__[k] for k in ("state", "param_groups", "defaults") if k in base.__dict__}
        groups0 = [dict(g) for g in base.param_groups]
        try:
            base.load_state_dict(base_sd)
        except Exception as e:
            base.__dict__.update(kept)
            for g, g0 in zip(base.param_groups, groups0):
                g.clear()
                g.update(g0)
            raise ValueError(f"state_dict['base_optimizer'] was refused by {type(base).__name__}.load_state_dict "
                             f"({type(e).__name__}: {e}); this optimizer is unchanged") from e
        self.state = defaultdict(dict)
        for i, st in sam_state.items():
            w = params[i]
            new = {}
            for k, v in st.items():
                if k in ("fsam_ema", "looksam_gv"):
                    new[k] = v.to(device=w.device, dtype=w.dtype).clone()
                else:
                    new[k] = v.to(device=w.device, dtype=torch.float32).clone()
            self.state[w] = new
        self._sam_step = step
        self._aesam_stats, self._perturbing_steps = family
        self._decision = None
        if not keep:
            self.seed = seed
        self._grad_marks = None
        # partial sums (SAM.accumulate, sam_step(update=False)) belong to the run being replaced
        self._acc_live = set()
        self._acc_g, self._pair_g = {}, {}
        self.__dict__.pop("_fastsam_accum", None)
        for sc in self._scratch.values():
            for k in ("ema_spare", "ready_spare", "acc", "acc_spare"):
                sc.pop(k, None)

    @staticmethod
    def _validate_family_state(sam: dict[str, Any]) -> tuple[tuple[float, float, int], int]:
        """AE-SAM's statistics and the count of perturbing steps (absent before version 3)."""
        stats = sam.get("aesam_stats", [0.0, 0.0, 0])
        if not isinstance(stats, (list, tuple)) or len(stats) != 3:
            raise ValueError(f"state_dict['sam']['aesam_stats'] must be [mu, var, observations], got {stats!r}")
        mu = check_real("state_dict['sam']['aesam_stats'][0] (mu)", stats[0], allow_inf=True)
        var = check_real("state_dict['sam']['aesam_stats'][1] (var)", stats[1], lo=0.0, allow_inf=True)
        n = check_int("state_dict['sam']['aesam_stats'][2] (observations)", stats[2], lo=0)
        perturbing = check_int("state_dict['sam']['perturbing_steps']", sam.get("perturbing_steps", 0), lo=0)
        return (mu, var, n), perturbing

    def _validate_base_state(self, base_sd: Any, params: list[Tensor]) -> None:
        if not isinstance(base_sd, dict) or not isinstance(base_sd.get("state"), dict) or not isinstance(
                base_sd.get("param_groups"), list):
            raise ValueError("state_dict['base_optimizer'] must be a torch optimizer state dict with 'state' (a dict) "
                             "and 'param_groups' (a list)")
        groups = self.param_groups
        saved = base_sd["param_groups"]
        if len(saved) != len(groups):
            raise ValueError(f"state_dict has {len(saved)} parameter groups, this optimizer {len(groups)}")
        index: dict[Any, Tensor] = {}
        for gi, (sg, g) in enumerate(zip(saved, groups)):
            if not isinstance(sg, dict) or not isinstance(sg.get("params"), list):
                raise ValueError(f"state_dict param group {gi} is malformed (a dict with a 'params' list expected)")
            if len(sg["params"]) != len(g["params"]):
                raise ValueError(f"state_dict param group {gi} has {len(sg['params'])} parameters, this optimizer's "
                                 f"{len(g['params'])}")
            for k in _GROUP_KEYS:
                if k in sg:
                    try:
                        _check_group_options({**g, k: sg[k]}, str(gi))
                    except ValueError as e:
                        raise ValueError(f"state_dict param group {gi}: {e}") from None
            check_group_hyper(sg, f"state_dict param group {gi}")
            for key, w in zip(sg["params"], g["params"]):
                index[key] = w
        for key, st in base_sd["state"].items():
            if key not in index:
                raise ValueError(f"state_dict['base_optimizer']['state'] has an entry for parameter {key!r}, which no "
                                 "saved param group lists")
            if not isinstance(st, dict):
                raise ValueError(f"state_dict base state of parameter {key!r} must be a dict, got {type(st).__name__}")
            w = index[key]
            for name, v in st.items():
                elementwise = name in _ELEMENTWISE_STATE
                if elementwise and not (isinstance(v, Tensor) or (v is None and name == "momentum_buffer")):
                    raise ValueError(f"state_dict base state '{name}' of parameter {key!r} must be a tensor of shape "
                                     f"{tuple(w.shape)}, got {type(v).__name__}")
                if isinstance(v, Tensor) and (v.dim() > 0 or elementwise) and tuple(v.shape) != tuple(w.shape):
                    raise ValueError(f"state_dict base state '{name}' of parameter {key!r} has shape {tuple(v.shape)}, "
                                     f"the parameter {tuple(w.shape)}")
                if isinstance(v, Tensor) and (v.is_complex() != w.is_complex()):
                    raise ValueError(f"state_dict base state '{name}' of parameter {key!r} has dtype {v.dtype}")
                if name == "step" and not (is_number(v) or (isinstance(v, Tensor) and v.numel() == 1
                                                           and not v.is_complex())):
                    raise ValueError(f"state_dict base state 'step' of parameter {key!r} must be a number or a "
                                     f"one-element tensor, got {v!r}")
            required = _REQUIRED_STATE.get(type(self.base_optimizer), ())
            if st and any(k not in st for k in required):
                raise ValueError(f"state_dict base state of parameter {key!r} lacks "
                                 f"{sorted(set(required) - set(st))} ({type(self.base_optimizer).__name__} keeps "
                                 f"{list(required)} for every parameter it has stepped)")

    def _validate_sam_state(self, sam: Any, params: list[Tensor], strict: bool) -> tuple[dict[int, dict], int, int,
                                                                                          bool]:
        """(state by parameter index, step, seed, keep this optimizer's options)."""
        if not isinstance(sam, dict):
            raise ValueError(f"state_dict['sam'] must be a dict, got {type(sam).__name__}")
        for k in ("step", "seed", "state"):
            if k not in sam:
                raise ValueError(f"state_dict['sam'] has no '{k}' entry (a fastsam.SAM.state_dict() has step, seed, "
                                 "state and options)")
        step = check_int("state_dict['sam']['step']", sam["step"], lo=0)
        seed = check_int("state_dict['sam']['seed']", sam["seed"], lo=0, hi=2**32 - 1)
        if not isinstance(sam["state"], dict):
            raise ValueError("state_dict['sam']['state'] must be a dict {parameter index: state}")
        state: dict[int, dict] = {}
        for i, st in sam["state"].items():
            if isinstance(i, bool) or not isinstance(i, int) and not (isinstance(i, str) and i.isdigit()):
                raise ValueError(f"state_dict['sam']['state'] keys must be parameter indices, got {i!r}")
            idx = int(i)
            if not 0 <= idx < len(params):
                raise ValueError(f"state_dict['sam']['state'] has parameter index {idx}, this optimizer has "
                                 f"{len(params)} parameters")
            if not isinstance(st, dict) or set(st) - {"fsam_ema", "fsam_ready", "looksam_gv"} or (
                    ("fsam_ema" in st) != ("fsam_ready" in st)):
                raise ValueError(f"state_dict['sam']['state'][{i!r}] must hold 'fsam_ema' and 'fsam_ready' (F-SAM) "
                                 "and/or 'looksam_gv' (LookSAM), got "
                                 f"{sorted(st) if isinstance(st, dict) else type(st).__name__}")
            w = params[idx]
            if "fsam_ema" in st:
                m, r = st.get("fsam_ema"), st.get("fsam_ready")
                if not isinstance(m, Tensor) or tuple(m.shape) != tuple(w.shape) or not m.is_floating_point():
                    raise ValueError(f"state_dict F-SAM EMA of parameter {idx} must be a float tensor of shape "
                                     f"{tuple(w.shape)}, got {getattr(m, 'shape', m)!r}")
                if not isinstance(r, Tensor) or r.numel() != 1 or r.is_complex():
                    raise ValueError(f"state_dict F-SAM flag of parameter {idx} must be a real one-element tensor")
            gv = st.get("looksam_gv", w)
            if not isinstance(gv, Tensor) or tuple(gv.shape) != tuple(w.shape) or not gv.is_floating_point():
                raise ValueError(f"state_dict LookSAM direction of parameter {idx} must be a float tensor of shape "
                                 f"{tuple(w.shape)}, got {getattr(gv, 'shape', gv)!r}")
            state[idx] = st
        saved = sam.get("options")
        mine = self._saved_options()
        if isinstance(saved, dict) and sam.get("version", 1) == 2:  # before the cheap family: its defaults
            saved = {**_V2_OPTIONS, **saved}
        if saved is None and sam.get("version", 1) >= 2:
            raise ValueError("state_dict['sam'] has no 'options' entry")
        if saved is not None and not isinstance(saved, dict):
            raise ValueError("state_dict['sam']['options'] must be a dict of the SAM options, got "
                             f"{type(saved).__name__}")
        saved = dict(saved or {})
        if "seed" in saved and saved["seed"] != seed:
            raise ValueError(f"state_dict['sam'] is inconsistent: seed {seed!r}, options['seed'] {saved['seed']!r}")
        saved.setdefault("seed", seed)
        missing = sorted(set(mine) - set(saved)) if sam.get("version", 1) >= 2 else []
        if missing and strict:
            raise ValueError(f"state_dict['sam']['options'] lacks {missing} (a fastsam.SAM.state_dict() saves "
                             f"{sorted(mine)}); pass strict=False to load it keeping this optimizer's options")
        diff = {k: (saved.get(k), v) for k, v in mine.items() if k in saved and saved.get(k) != v}
        keep = bool(missing)
        if missing:
            warnings.warn(f"load_state_dict(strict=False): the checkpoint's SAM options lack {missing}; keeping this "
                          "optimizer's options and seed", stacklevel=3)
        if diff:
            what = ", ".join(f"{k}: saved {a!r}, this optimizer {b!r}" for k, (a, b) in diff.items())
            if strict:
                raise ValueError(f"state_dict was saved with other SAM options ({what}); build the optimizer with the "
                                 "saved options, or pass strict=False to load it keeping this optimizer's options")
            warnings.warn(f"load_state_dict(strict=False): the checkpoint's SAM options differ ({what}); keeping this "
                          "optimizer's options and seed, loading the step counter, F-SAM EMA and base optimizer "
                          "state", stacklevel=3)
            keep = True
            drop = ({"fsam_ema", "fsam_ready"} if self.fsam_sigma is None else set()) | (
                {"looksam_gv"} if self.looksam_alpha is None else set())
            state = {i: {k: v for k, v in st.items() if k not in drop} for i, st in state.items()}
            state = {i: st for i, st in state.items() if st}
        return state, step, seed, keep

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy``, ``pickle`` and ``torch.save(opt)`` keep: the whole optimizer
        (base optimizer, options, seed, step counter, F-SAM state, partial sums); caches and
        buffers of an open step are not kept, so an open step is an error."""
        self._check_no_open_step("copying or pickling the optimizer")
        d = dict(self.__dict__)
        d["_scratch"] = {w: {"acc": sc["acc"]} for w, sc in self._scratch.items() if "acc" in sc and id(w) in
                         self._acc_live}
        d["_acc_live_params"] = [w for g in self.param_groups for w in g["params"] if id(w) in self._acc_live]
        for k in ("_acc_live", "_grad_marks", "_layout_key", "_layout_meta", "_perturb_ok", "_layouts", "_fused_plans",
                  "_layout", "_perturbed", "_decision", "_sharding", "_mix_cache", "_gv_tuple"):
            d.pop(k, None)
        # an LR scheduler wraps this instance's step (an attribute bound to this object): a copy
        # keeps the class's own (as torch.optim.Optimizer's copies do), or it would step the original
        d.pop("step", None)
        return d

    def __setstate__(self, state: dict[str, Any]) -> None:
        live = state.pop("_acc_live_params", [])
        self.__dict__.update(state)
        self._acc_live = {id(w) for w in live}
        self._grad_marks = None
        self._layout_key = None
        self._layout_meta = None
        self._sharding = None  # found again by the next step's parameter check
        self._perturb_ok = None
        self._layouts = OrderedDict()
        self._fused_plans = OrderedDict()
        self._mix_cache = {}
        self._gv_tuple = ()
        self.__dict__.setdefault("_host_tried", False)
        self.__dict__.setdefault("_acc_g", {})  # (pickles of an older fastsam)
        self.__dict__.setdefault("_pair_g", {})
        self._layout = None
        self._perturbed = None
        self._decision = None
        self.__dict__.setdefault("_txn", None)
        # torch.optim.Optimizer keeps these; re-created as its own __setstate__ would
        self.__dict__.setdefault("_optimizer_step_pre_hooks", {})
        self.__dict__.setdefault("_optimizer_step_post_hooks", {})
        self.__dict__.setdefault("_optimizer_state_dict_pre_hooks", {})
        self.__dict__.setdefault("_optimizer_state_dict_post_hooks", {})
        self.__dict__.setdefault("_optimizer_load_state_dict_pre_hooks", {})
        self.__dict__.setdefault("_optimizer_load_state_dict_post_hooks", {})
        self._patch_step_function()
