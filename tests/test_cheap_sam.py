"""The cheaper SAM family (issue #17) against plain float64 loops written from the formulas.

Each variant runs through fastsam.sam_step on every CPU backend with float32 weights and is
compared, step by step, with a float64 loop that writes the variant's rule by hand (the
perturbation itself from fastsam.reference in float64, so ASAM / F-SAM / ESAM masks compose), over
7 steps with SGD-momentum and AdamW bases. Also: forward passes counted, k = 1 is SAM exactly,
combinations across the axes, checkpoint resume, a skipped (non-finite) step, options that do not
compose, and the manual API (wants_perturbation / plain_step).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import fastsam
from fastsam import functional as Fn
from fastsam import reference as R

BACKENDS = [b for b in ("reference", "foreach", "cpp", "triton") if b in Fn.available_backends("cpu")]
STEPS = 7
BASES = {
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.05}),
}


def _model(seed: int = 0, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4)).to(dtype)


def _batches(n: int = STEPS, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(12, 6, generator=g), torch.randint(0, 4, (12,), generator=g)) for _ in range(n)]


def _grad(model, x, y) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x.to(next(model.parameters()).dtype)), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _sq(ts) -> float:
    return float(sum((t.double() ** 2).sum() for t in ts))


def _dot(a, b) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def _perturb64(params, grads, t: int, opts: dict, rho: float, fsam: dict | None) -> list[torch.Tensor]:
    """fastsam.reference's perturbation in float64 (w_old returned; params moved to w + e)."""
    w_old = [torch.empty_like(p) for p in params]
    offsets, off = [], 0
    for p in params:
        offsets.append(off)
        off += p.numel()
    n = len(params)
    ema = ready = None
    if opts.get("fsam_sigma") is not None:
        ema, ready = fsam["ema"], fsam["ready"]
    with torch.no_grad():
        R.sam_perturb_(list(params), grads, w_old, ema, ready, None, [rho] * n, [opts.get("eta", 0.0)] * n,
                       [opts.get("adaptive", False)] * n, offsets, p=opts.get("p", 2.0),
                       fsam_sigma=opts.get("fsam_sigma"), fsam_lambda=opts.get("fsam_lambda", 0.9),
                       swp_keep=opts.get("swp_keep", 1.0), seed=opts.get("seed", 0), step=t)
    return w_old


def _mean_grads(model, x, y, micro: int | None) -> tuple[list[torch.Tensor], list[tuple]]:
    """The batch's gradient at the current weights: one pass, or the size-weighted mean over
    micro-batches of ``micro`` examples; also the micro-batches."""
    chunks = [(x, y)] if micro is None else [(x[i:i + micro], y[i:i + micro]) for i in range(0, len(y), micro)]
    gs = [_grad(model, a, b) for a, b in chunks]
    n = len(y)
    return [sum(g[j] * (len(c[1]) / n) for g, c in zip(gs, chunks)) for j in range(len(gs[0]))], chunks


def reference_run(variant: str, base: str, opts: dict, rho: float = 0.1, micro: int | None = None,
                  **v) -> tuple[list[torch.Tensor], int]:
    """The variant's rule, by hand, in float64. Returns (weights, forward passes). ``micro``:
    m-sharpness over micro-batches of that size (each perturbed from its own gradient; the SAM
    step's ``gs`` and ``g`` are the size-weighted means over them, a plain step's ``g`` too)."""
    model = _model(dtype=torch.float64)
    params = list(model.parameters())
    cls, kw = BASES[base]
    opt = cls(params, **kw)
    fsam = {"ema": [torch.zeros_like(p) for p in params], "ready": [torch.zeros((), dtype=torch.float32)
                                                                    for _ in params]}
    gv_hat = None
    stats = (0.0, 0.0, 0)
    passes = 0
    for t, (x, y) in enumerate(_batches()):
        if variant == "msam":
            st = [opt.state.get(p, {}) for p in params]
            vs = [s.get("momentum_buffer", s.get("exp_avg")) for s in st]
            with torch.no_grad():
                w_old = [p.detach().clone() for p in params]
                if all(v is not None for v in vs):
                    w_old = _perturb64(params, vs, t, opts, -rho, fsam)
            gs = _grad(model, x, y)
            passes += 1
            with torch.no_grad():
                for p, w in zip(params, w_old):
                    p.copy_(w)
            for p, gg in zip(params, gs):
                p.grad = gg
            opt.step()
            continue
        g, chunks = _mean_grads(model, x, y, micro)
        passes += len(chunks)
        if variant in ("interval", "looksam"):
            perturb = t % v["k"] == 0
        elif variant == "aesam":
            q = _sq(g)
            mu, var, nobs = stats
            if nobs == 0:
                mu, var = q, 0.0
            else:
                d = v["delta"]
                mu = d * mu + (1 - d) * q
                var = d * var + (1 - d) * (q - mu) ** 2
            stats = (mu, var, nobs + 1)
            c = v["c_start"] + (v["c_end"] - v["c_start"]) * min(t, v["total_steps"]) / v["total_steps"]
            perturb = q >= mu + c * math.sqrt(var)
        else:
            perturb = True
        if not perturb:
            d = g
            if variant == "looksam" and gv_hat is not None:
                n = math.sqrt(_sq(g))
                d = [x_ + v["alpha"] * n * h for x_, h in zip(g, gv_hat)]
            for p, dd in zip(params, d):
                p.grad = dd
            opt.step()
            continue
        if micro is None:
            w_old = _perturb64(params, g, t, opts, rho, fsam)
            gs = _grad(model, x, y)
            passes += 1
            with torch.no_grad():
                for p, w in zip(params, w_old):
                    p.copy_(w)
        else:  # every micro-batch perturbed from its own gradient at w
            gs = [torch.zeros_like(p) for p in params]
            for a, b in chunks:
                w_old = _perturb64(params, _grad(model, a, b), t, opts, rho, fsam)
                for acc, gk in zip(gs, _grad(model, a, b)):
                    acc += gk * (len(b) / len(y))
                passes += 1
                with torch.no_grad():
                    for p, w in zip(params, w_old):
                        p.copy_(w)
        if variant == "looksam":
            coef = _dot(gs, g) / _sq(g)
            gv = [a - coef * b for a, b in zip(gs, g)]
            nv = math.sqrt(_sq(gv))
            gv_hat = [x_ / nv for x_ in gv]
        upd = gs
        if variant == "wsam":
            a = v["gamma"] / (1 - v["gamma"])
            upd = g if v["decouple"] else [a * x_ + (1 - a) * y_ for x_, y_ in zip(gs, g)]
        for p, gg in zip(params, upd):
            p.grad = gg
        opt.step()
        if variant == "wsam" and v["decouple"]:
            a = v["gamma"] / (1 - v["gamma"])
            with torch.no_grad():
                for p, x_, y_ in zip(params, gs, g):
                    p -= kw["lr"] * a * (x_ - y_)
    return [p.detach() for p in params], passes


PRESETS = {
    "interval": (lambda params, base, rho, **o: fastsam.SAM(params, base, rho, sam_every=3, **o), {"k": 3}),
    "looksam": (lambda params, base, rho, **o: fastsam.LookSAM(params, base, rho, k=3, alpha=0.7, **o),
                {"k": 3, "alpha": 0.7}),
    "aesam": (lambda params, base, rho, **o: fastsam.AESAM(params, base, rho, total_steps=STEPS, **o),
              {"delta": 0.9, "c_start": -1.0, "c_end": 1.0, "total_steps": STEPS}),
    "msam": (lambda params, base, rho, **o: fastsam.MSAM(params, base, rho, **o), {}),
    "wsam": (lambda params, base, rho, **o: fastsam.WSAM(params, base, rho, gamma=0.8, decouple=True, **o),
             {"gamma": 0.8, "decouple": True}),
    "wsam-mixed": (lambda params, base, rho, **o: fastsam.WSAM(params, base, rho, gamma=0.8, decouple=False, **o),
                   {"gamma": 0.8, "decouple": False}),
}
PASSES = {"interval": 10, "looksam": 10, "msam": 7, "wsam": 14, "wsam-mixed": 14}


def fastsam_run(variant: str, base: str, backend: str, opts: dict, rho: float = 0.1, micro: int | None = None,
                accumulate: bool = False):
    """``accumulate``: each step as sam_step calls of ``micro`` examples, all but the last with
    update=False (the same m-sharpness as ``micro_batch=micro`` in one call)."""
    model = _model()
    cls, kw = BASES[base]
    make, _ = PRESETS[variant]
    opt = make(model.parameters(), cls, rho, backend=backend, **opts, **kw)
    passes = [0]
    model.register_forward_hook(lambda *a: passes.__setitem__(0, passes[0] + 1))
    for x, y in _batches():
        if accumulate:
            assert micro is not None
            for i in range(0, len(y), micro):
                r = fastsam.sam_step(model, opt, x[i:i + micro], y[i:i + micro], F.cross_entropy,
                                     update=i + micro >= len(y))
        else:
            r = fastsam.sam_step(model, opt, x, y, F.cross_entropy, micro_batch=micro)
        assert not r.skipped
    return model, opt, passes[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("variant", sorted(PRESETS))
def test_variant_matches_its_formula(variant, base, backend):
    model, opt, passes = fastsam_run(variant, base, backend, {})
    ref, ref_passes = reference_run(variant.split("-")[0], base, {}, **PRESETS[variant][1])
    assert passes == ref_passes
    if variant in PASSES:
        assert passes == PASSES[variant]
    for a, b in zip(model.parameters(), ref):
        torch.testing.assert_close(a.detach().double(), b, rtol=2e-5, atol=2e-6)
    assert opt.step_count == STEPS


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["micro_batch", "accumulate"])
@pytest.mark.parametrize("variant", ["looksam", "wsam", "wsam-mixed", "interval"])
def test_micro_batches_and_accumulation_match_their_formula(variant, how, backend):
    """m-sharpness (micro-batches of 4 out of 12, each perturbed from its own gradient) and
    accumulation over sam_step calls: LookSAM's direction from the means of gs and g, decoupled
    WSAM's update with the mean of g and correction with the means' difference."""
    base = "adamw" if variant == "looksam" else "sgd"
    model, opt, passes = fastsam_run(variant, base, backend, {}, micro=4, accumulate=how == "accumulate")
    ref, ref_passes = reference_run(variant.split("-")[0], base, {}, micro=4, **PRESETS[variant][1])
    assert passes == ref_passes
    for a, b in zip(model.parameters(), ref):
        torch.testing.assert_close(a.detach().double(), b, rtol=2e-5, atol=2e-6)
    assert opt.step_count == STEPS and not opt.has_accumulated and not opt._pair_g


def test_accumulated_perturbing_step_must_end_in_base_step():
    """The sums of a LookSAM SAM step's micro-batches are for base_step(): plain_step() is refused
    before anything changes, base_step() then completes the step."""
    m = _model()
    opt = fastsam.LookSAM(m.parameters(), torch.optim.SGD, 0.1, k=2, lr=0.1)
    x, y = _batches(1)[0]
    for lo in (0, 6):
        opt.zero_grad()
        F.cross_entropy(m(x[lo:lo + 6]), y[lo:lo + 6]).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(m(x[lo:lo + 6]), y[lo:lo + 6]).backward()
        opt.accumulate(0.5)
    opt.zero_grad()
    opt.load_accumulated()
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(RuntimeError, match="finish it with base_step"):
        opt.plain_step()
    assert all(torch.equal(p, b) for p, b in zip(m.parameters(), before)) and opt.step_count == 0
    opt.base_step()
    assert opt.step_count == 1 and not opt._pair_g
    assert all(opt.state[p].get("looksam_gv") is not None for p in m.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant,opts", [
    ("looksam", {"adaptive": True, "eta": 0.01}),  # LookSAM + ASAM
    ("msam", {"swp_keep": 0.6, "seed": 3}),  # MSAM + ESAM masks
    ("wsam", {"fsam_sigma": 0.5, "fsam_lambda": 0.7}),  # WSAM + F-SAM
    ("interval", {"p": 3.0}),  # interval + p-norm
])
def test_combinations_match_their_formula(variant, opts, backend):
    model, _, passes = fastsam_run(variant, "sgd", backend, opts)
    ref, ref_passes = reference_run(variant, "sgd", opts, **PRESETS[variant][1])
    assert passes == ref_passes
    for a, b in zip(model.parameters(), ref):
        torch.testing.assert_close(a.detach().double(), b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_interval_with_gsam_runs_gsam_steps_and_plain_steps(backend):
    """interval + GSAM: every third step is the GSAM step (equal to GSAM's on that step), the
    others plain base steps."""
    m1, m2 = _model(), _model()
    o1 = fastsam.SAM(m1.parameters(), torch.optim.SGD, 0.1, sam_every=3, gsam_alpha=0.3, backend=backend, lr=0.1)
    o2 = fastsam.SAM(m2.parameters(), torch.optim.SGD, 0.1, gsam_alpha=0.3, backend=backend, lr=0.1)
    plain = torch.optim.SGD(m2.parameters(), lr=0.1)
    for t, (x, y) in enumerate(_batches()):
        fastsam.sam_step(m1, o1, x, y, F.cross_entropy)
        if t % 3 == 0:
            fastsam.sam_step(m2, o2, x, y, F.cross_entropy)
        else:
            plain.zero_grad()
            F.cross_entropy(m2(x), y).backward()
            plain.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert o1.perturbing_steps == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_k1_is_sam_exactly(backend):
    """LookSAM and interval SAM with k = 1 perturb every step: bit for bit SAM."""
    runs = []
    for make in (lambda ps: fastsam.SAM(ps, torch.optim.AdamW, 0.1, backend=backend, lr=1e-2),
                 lambda ps: fastsam.LookSAM(ps, torch.optim.AdamW, 0.1, k=1, backend=backend, lr=1e-2),
                 lambda ps: fastsam.SAM(ps, torch.optim.AdamW, 0.1, sam_every=1, backend=backend, lr=1e-2)):
        m = _model()
        opt = make(m.parameters())
        for x, y in _batches():
            fastsam.sam_step(m, opt, x, y, F.cross_entropy)
        runs.append([p.detach().clone() for p in m.parameters()])
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.parametrize("variant", ["looksam", "aesam", "msam", "wsam"])
def test_resume_is_bit_identical(variant):
    """state_dict after 3 steps (LookSAM's direction, AE-SAM's statistics, the counters), loaded
    into a new optimizer: the remaining steps equal the uninterrupted run's."""
    backend = "foreach"
    make, _ = PRESETS[variant]
    data = _batches()
    m1 = _model()
    o1 = make(m1.parameters(), torch.optim.AdamW, 0.1, backend=backend, lr=1e-2)
    for x, y in data:
        fastsam.sam_step(m1, o1, x, y, F.cross_entropy)
    m2 = _model()
    o2 = make(m2.parameters(), torch.optim.AdamW, 0.1, backend=backend, lr=1e-2)
    for x, y in data[:3]:
        fastsam.sam_step(m2, o2, x, y, F.cross_entropy)
    sd = copy.deepcopy((m2.state_dict(), o2.state_dict()))
    m3 = _model(seed=9)
    o3 = make(m3.parameters(), torch.optim.AdamW, 0.1, backend=backend, lr=1e-2)
    m3.load_state_dict(sd[0])
    o3.load_state_dict(sd[1])
    for x, y in data[3:]:
        fastsam.sam_step(m3, o3, x, y, F.cross_entropy)
    assert (o3.step_count, o3.perturbing_steps) == (o1.step_count, o1.perturbing_steps)
    for a, b in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("variant", ["interval", "aesam", "msam"])
def test_a_skipped_step_moves_no_counter_or_statistic(variant):
    """A non-finite loss skips the step: weights, step counters and AE-SAM's statistics unchanged."""
    make, _ = PRESETS[variant]
    m = _model()
    opt = make(m.parameters(), torch.optim.SGD, 0.1, backend="foreach", lr=0.1, momentum=0.9)
    data = _batches()
    for x, y in data[:2]:
        fastsam.sam_step(m, opt, x, y, F.cross_entropy)
    before = (copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in m.parameters()])

    def nan_loss(out, tgt, reduction="mean"):
        return F.cross_entropy(out, tgt, reduction=reduction) * float("nan")

    r = fastsam.sam_step(m, opt, *data[2], nan_loss)
    assert r.skipped
    after = opt.state_dict()
    assert after["sam"]["step"] == before[0]["sam"]["step"]
    assert after["sam"]["aesam_stats"] == before[0]["sam"]["aesam_stats"]
    assert after["sam"]["perturbing_steps"] == before[0]["sam"]["perturbing_steps"]
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), before[1]))


def test_manual_api_decides_and_counts():
    m = _model()
    opt = fastsam.LookSAM(m.parameters(), torch.optim.SGD, 0.1, k=2, backend="foreach", lr=0.1)
    decisions = []
    for x, y in _batches(4):
        assert opt.perturbs_next_step == (opt.step_count % 2 == 0)
        F.cross_entropy(m(x), y).backward()
        if opt.wants_perturbation():
            decisions.append(True)
            opt.first_step(zero_grad=True)
            F.cross_entropy(m(x), y).backward()
            opt.second_step(zero_grad=True)
        else:
            decisions.append(False)
            opt.plain_step()
            opt.zero_grad()
    assert decisions == [True, False, True, False] and opt.perturbing_steps == 2
    ae = fastsam.AESAM(_model().parameters(), torch.optim.SGD, total_steps=10, lr=0.1)
    assert ae.perturbs_next_step is None  # decided from the gradient


@pytest.mark.parametrize("kwargs,match", [
    ({"wsam_gamma": 0.9, "gsam_alpha": 0.1}, "set one"),
    ({"sam_every": 2, "aesam": fastsam.AESAMPolicy(total_steps=5)}, "set one"),
    ({"perturb_from": "momentum", "sam_every": 3}, "does not combine"),
    ({"perturb_from": "weights"}, "perturb_from must be one of"),
    ({"sam_every": 0}, "sam_every"),
    ({"looksam_alpha": -1.0}, "looksam_alpha"),
    ({"wsam_gamma": 1.0}, "wsam_gamma"),
    ({"aesam": {"total_steps": 5}}, "AESAMPolicy"),
])
def test_options_that_do_not_compose_are_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastsam.SAM(_model().parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **kwargs)


def test_msam_needs_a_momentum_and_sam_step_refuses_what_one_pass_cannot_do():
    with pytest.raises(ValueError, match="momentum > 0"):
        fastsam.MSAM(_model().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="needs a base optimizer with a momentum"):
        fastsam.MSAM(_model().parameters(), torch.optim.RMSprop, lr=0.1)
    m = _model()
    opt = fastsam.MSAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    x, y = _batches(1)[0]
    with pytest.raises(ValueError, match="sds_keep"):
        fastsam.sam_step(m, opt, x, y, F.cross_entropy, sds_keep=0.5)
    with pytest.raises(ValueError, match="ascent_loss_fn"):
        fastsam.sam_step(m, opt, x, y, F.cross_entropy, ascent_loss_fn=F.cross_entropy)


def test_msam_keeps_w_between_steps():
    """Evaluation and checkpoints between MSAM steps see w, not the perturbed point."""
    m = _model()
    opt = fastsam.MSAM(m.parameters(), torch.optim.SGD, 0.5, lr=0.1, momentum=0.9)
    ref = _model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for x, y in _batches(3):
        fastsam.sam_step(m, opt, x, y, F.cross_entropy)
        assert not opt.is_perturbed
    # the first step perturbs nothing (no momentum yet): it is a plain SGD step
    m0 = _model()
    o0 = fastsam.MSAM(m0.parameters(), torch.optim.SGD, 0.5, lr=0.1, momentum=0.9)
    x, y = _batches(1)[0]
    fastsam.sam_step(m0, o0, x, y, F.cross_entropy)
    ref_opt.zero_grad()
    F.cross_entropy(ref(x), y).backward()
    ref_opt.step()
    for a, b in zip(m0.parameters(), ref.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("variant,calls,perturbing", [("interval", 7 + 3, 3), ("msam", 7, 7), ("looksam", 7 + 3, 3)])
def test_step_closure_follows_the_when_choice(variant, calls, perturbing):
    """step(closure) (Lightning's automatic optimization, SAMTrainer's path): one closure call on
    non-perturbing steps and for MSAM, two on SAM steps; the same weights as sam_step."""
    make, _ = PRESETS[variant]
    m1, m2 = _model(), _model()
    o1 = make(m1.parameters(), torch.optim.SGD, 0.1, backend="foreach", lr=0.1, momentum=0.9)
    o2 = make(m2.parameters(), torch.optim.SGD, 0.1, backend="foreach", lr=0.1, momentum=0.9)
    n = [0]
    for x, y in _batches():
        def closure(x=x, y=y):
            n[0] += 1
            o1.zero_grad()
            loss = F.cross_entropy(m1(x), y)
            loss.backward()
            return loss

        o1.step(closure)
        fastsam.sam_step(m2, o2, x, y, F.cross_entropy)
    assert n[0] == calls and o1.perturbing_steps == perturbing
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_perturb_from_set_later_is_checked_against_the_base():
    opt = fastsam.SAM(_model().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="momentum > 0"):
        opt.perturb_from = "momentum"
    assert opt.perturb_from == "gradient"


# ----------------------------------------------------------------------------- faults (#13's guarantee)
class _Boom(RuntimeError):
    pass


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().view(torch.int32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["looksam", "wsam_decoupled", "wsam"])
def test_a_failed_family_step_changes_nothing_and_a_retry_matches(backend, variant):
    """An exception in the base update of a LookSAM plain step, a LookSAM SAM step (after its
    projection) or a WSAM step (after its mix / before its correction) leaves the weights, the
    LookSAM direction, the base state and the step counter as they were, and a retry of the same
    step equals a run without the exception."""
    opts = {"looksam": dict(sam_every=2, looksam_alpha=0.7), "wsam_decoupled": dict(wsam_gamma=0.8),
            "wsam": dict(wsam_gamma=0.8, wsam_decouple=False)}[variant]
    torch.manual_seed(0)
    shapes = [(5, 3), (7,)]
    grads = [[torch.randn(s) for s in shapes] for _ in range(12)]

    def make():
        torch.manual_seed(1)
        ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        return ps, fastsam.SAM(ps, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend=backend, **opts)

    def step(ps, opt, k, fail=False):
        for p, g in zip(ps, grads[2 * k]):
            p.grad = g.clone()
        boom = None
        if fail:
            def hook(*_):
                raise _Boom("injected")
            boom = opt.base_optimizer.register_step_pre_hook(hook)
        try:
            if opt.wants_perturbation():
                opt.first_step()
                for p, g in zip(ps, grads[2 * k + 1]):
                    p.grad = g.clone()
                opt.second_step()
            else:
                opt.plain_step()
        finally:
            if boom is not None:
                boom.remove()

    ref_ps, ref = make()
    for k in range(6):
        step(ref_ps, ref, k)
    ps, opt = make()
    for k in range(6):
        w0 = [_bits(p) for p in ps]
        st0 = copy.deepcopy({i: dict(opt.state[p]) for i, p in enumerate(ps)})
        base0 = copy.deepcopy({i: dict(opt.base_optimizer.state[p]) for i, p in enumerate(ps)})
        count0 = opt.step_count
        with pytest.raises(_Boom):
            step(ps, opt, k, fail=True)
        assert not opt.is_perturbed and opt.step_count == count0
        assert all(torch.equal(_bits(p), w) for p, w in zip(ps, w0)), k
        for i, p in enumerate(ps):
            for name, v in st0[i].items():
                if torch.is_tensor(v):
                    assert torch.equal(opt.state[p][name], v), (k, name)
            assert set(opt.state[p]) == set(st0[i]), k
            for name, v in base0[i].items():
                assert torch.equal(opt.base_optimizer.state[p][name], v), (k, name)
        step(ps, opt, k)  # the retry
    for p, r in zip(ps, ref_ps):
        assert torch.equal(p.detach(), r.detach())
