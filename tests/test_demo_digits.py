"""Part (b) of the demo, piece by piece: the splits, the label noise, the pass counter, the choice
of rho on held-out data, the variant registry and its guard for variants fastsam lacks, and the
machine facts (the C++ extension's first build)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

import fastsam
from fastsam.demo import labelnoise, machine
from fastsam.demo.digits import DigitsConfig, corrupt_labels, load_digits_data, train_digits
from fastsam.demo.variants import REGISTRY, VARIANTS, BaseRecipe, Variant

TINY = DigitsConfig(max_steps=2, timing_warmup_steps=0)


@pytest.fixture(scope="module")
def data():
    pytest.importorskip("sklearn")
    return load_digits_data(DigitsConfig())


# ------------------------------------------------------------------------------------ data and noise
def test_splits_are_disjoint_and_sized(data) -> None:
    assert data.sizes() == {"train": 1400, "fit": 1120, "held_out": 280, "test": 397}
    rows = lambda x: {tuple(r) for r in x.tolist()}
    train, fit, held, test = rows(data.train[0]), rows(data.fit[0]), rows(data.held_out[0]), rows(data.test[0])
    assert fit | held == train and not fit & held  # held out from the training images, none in fit
    assert len(train & test) < 5  # scikit-learn's digits hold a few duplicate images, nothing more
    # stratified: every class in every split, in proportion
    for _, y in (data.fit, data.held_out, data.test):
        counts = torch.bincount(y, minlength=10).float()
        assert counts.min() > 0.8 * counts.mean()


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.4, 0.85])
def test_corrupt_labels_is_exact_symmetric_noise(rate: float) -> None:
    y = torch.arange(1000) % 10
    before = y.clone()
    noisy = corrupt_labels(y, rate, torch.Generator().manual_seed(0))
    assert torch.equal(y, before)  # a copy
    wrong = noisy != y
    assert int(wrong.sum()) == round(rate * 1000)  # exactly that many labels, each now another class
    assert noisy.min() >= 0 and noisy.max() <= 9
    if rate >= 0.4:  # the wrong classes spread over all 9 others
        shift = (noisy[wrong] - y[wrong]) % 10
        assert set(shift.tolist()) == set(range(1, 10))
    assert torch.equal(noisy, corrupt_labels(y, rate, torch.Generator().manual_seed(0)))  # seeded


def test_corrupt_labels_rejects_bad_rates() -> None:
    with pytest.raises(ValueError, match="noise rate"):
        corrupt_labels(torch.zeros(3, dtype=torch.long), 1.5, torch.Generator())


def test_noise_reaches_training_labels_only(data, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss sees noisy training labels; the evaluation set keeps its labels."""
    seen = []
    real = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy",
                        lambda z, y, *a, **k: seen.append(y.clone()) or real(z, y, *a, **k))
    x, y = data.train
    ev = (data.test[0], data.test[1].clone())
    out = train_digits(VARIANTS["base"], None, 0, 0.4, (x, y), ev, DigitsConfig(max_steps=22))
    assert torch.equal(ev[1], data.test[1]) and out["noise"] == 0.4
    # the 22 training batches (one epoch and a step): ~40% of their labels differ from the clean ones
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(1400, generator=g)[:21 * 64]
    assert len(seen) == 23  # 22 steps + the evaluation's loss
    epoch = torch.cat(seen[:21])
    frac = float((epoch != y[perm]).float().mean())
    assert 0.35 < frac < 0.45
    assert torch.equal(seen[-1], data.test[1])  # evaluation on clean labels


# ------------------------------------------------------------------------------------ passes and runs
@pytest.mark.parametrize("name,backward,forward,calls", [
    ("base", 1.0, 1.0, 1.0),
    ("sam", 2.0, 2.0, 2.0),
    ("esam", 1.5, 2.5, 3.0),  # SDS: a no-grad scoring pass at w + e, then half the batch
    ("msam", 2.0, 2.0, 4.0),  # two micro-batches of 32, two passes each
])
def test_passes_per_step_are_counted(data, name: str, backward: float, forward: float, calls: float) -> None:
    out = train_digits(VARIANTS[name], VARIANTS[name].rho, 0, 0.0, data.train, data.test, TINY)
    assert out["steps"] == 2 and out["skipped_steps"] == 0
    assert out["backward_per_step"] == pytest.approx(backward)
    assert out["forward_per_step"] == pytest.approx(forward)
    assert out["forward_calls_per_step"] == pytest.approx(calls)


def test_a_run_is_a_pure_function_of_its_seed(data) -> None:
    a = train_digits(VARIANTS["sam"], 0.1, 3, 0.4, data.fit, data.held_out, TINY)
    b = train_digits(VARIANTS["sam"], 0.1, 3, 0.4, data.fit, data.held_out, TINY)
    c = train_digits(VARIANTS["sam"], 0.1, 4, 0.4, data.fit, data.held_out, TINY)
    assert (a["acc"], a["eval_loss"], a["final_train_loss"]) == (b["acc"], b["eval_loss"], b["final_train_loss"])
    assert a["final_train_loss"] != c["final_train_loss"]


def test_choose_rho_by_held_out_accuracy_then_loss_then_size() -> None:
    runs = [{"rho": 0.05, "acc": 0.90, "eval_loss": 0.3}, {"rho": 0.1, "acc": 0.93, "eval_loss": 0.4},
            {"rho": 0.2, "acc": 0.93, "eval_loss": 0.35}]
    assert labelnoise.choose_rho(runs) == 0.2  # tie on accuracy: lower cross-entropy
    runs[2]["eval_loss"] = 0.4
    assert labelnoise.choose_rho(runs) == 0.1  # full tie: the smaller rho
    with pytest.raises(ValueError):
        labelnoise.choose_rho([])


def test_rho_is_chosen_on_held_out_runs_never_on_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """The selection runs train on fit and score on held-out with their own seed; the reported runs
    train on the whole training set and score on test, at the chosen rho."""
    pytest.importorskip("sklearn")
    calls = []

    def fake_train(variant, rho, seed, noise, train, evaluate, cfg):
        n_train, n_eval = int(train[1].numel()), int(evaluate[1].numel())
        calls.append((variant.name, rho, seed, noise, n_train, n_eval))
        acc = {0.05: 0.5, 0.1: 0.7, 0.2: 0.6}.get(rho, 0.4) if n_eval == 280 else 0.9
        return {"seed": seed, "noise": noise, "rho": rho, "acc": acc, "eval_loss": 1.0, "final_train_loss": 1.0,
                "steps": 1, "skipped_steps": 0, "ms_per_step": 1.0, "forward_per_step": 2.0,
                "backward_per_step": 2.0, "forward_calls_per_step": 2.0, "train_s": 0.0}

    monkeypatch.setattr(labelnoise, "train_digits", fake_train)
    res = labelnoise.run_digits(["base", "sam"], [0, 1], [0.0, 0.4], DigitsConfig(), torch.device("cpu"))
    select = [c for c in calls if c[5] == 280]
    report = [c for c in calls if c[5] == 397]
    assert len(select) + len(report) == len(calls)
    assert sorted(select) == sorted(("sam", r, labelnoise.SELECT_SEED, n, 1120, 280)
                                    for r in (0.05, 0.1, 0.2) for n in (0.0, 0.4))
    assert labelnoise.SELECT_SEED not in (0, 1)
    assert {(c[0], c[1]) for c in report} == {("base", None), ("sam", 0.1)}  # the held-out winner
    assert all(c[4] == 1400 for c in report) and len(report) == 2 * 2 * 2
    sam = next(v for v in res["variants"] if v["name"] == "sam")
    assert [c["rho"] for c in sam["conditions"]] == [0.1, 0.1]
    assert sam["conditions"][1]["held_out"][1] == {"rho": 0.1, "acc": 0.7, "eval_loss": 1.0}


# ------------------------------------------------------------------------------------ registry
def test_registry_entries_run_or_say_what_fastsam_lacks(data) -> None:
    assert list(VARIANTS) == [v.name for v in REGISTRY] and VARIANTS["base"].is_base
    for v in REGISTRY:
        # the default rho (--quick) is one of the held-out choices; the base optimizer has neither
        assert (v.rho is None and v.rho_grid == ()) if v.is_base else (v.rho in v.rho_grid), v.name
        why = v.unavailable()
        if why is not None:
            assert v.preset in why or any(k in why for k in v.options), (v.name, why)
            continue
        # every available entry builds and takes one real step with its sam_step arguments
        out = train_digits(v, v.rho, 0, 0.0, data.train, data.test, DigitsConfig(max_steps=1, timing_warmup_steps=0))
        assert out["steps"] == 1 and out["skipped_steps"] == 0, v.name
    # the variants of the library today are all in the table
    for name in ("base", "sam", "asam", "gsam", "fsam", "esam", "sam+obf", "sam+bisam", "msam"):
        assert VARIANTS[name].unavailable() is None, name


def test_variant_guards() -> None:
    missing = Variant("x", "X", "", preset="NoSuchSAM")
    assert missing.unavailable() == "fastsam has no NoSuchSAM yet"
    assert "no option no_such" in Variant("x", "X", "", options={"no_such": 1}).unavailable()
    assert "sam_step has no argument" in Variant("x", "X", "", step={"no_such": 1}).unavailable()
    assert "losses has no" in Variant("x", "X", "", step={"ascent_loss": "no_such_loss"}).unavailable()
    # the step's loss function is resolved with its options; the spec is JSON-able
    v = VARIANTS["sam+bisam"]
    fn = v.step_kwargs()["ascent_loss_fn"]
    z, y = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(fn(z, y), fastsam.losses.bisam_loss(z, y, phi="log"))
    assert v.spec()["step"] == {"ascent_loss": "bisam_loss", "ascent_loss_kwargs": {"phi": "log"}}


def test_gsam_rho_follows_the_learning_rate(data) -> None:
    v = VARIANTS["gsam"]
    assert v.rho_follows_lr
    params = [torch.nn.Parameter(torch.ones(2))]
    opt = v.build(params, 0.1, BaseRecipe("AdamW", {"lr": 1e-3}))
    assert isinstance(opt, fastsam.GSAM) and opt.param_groups[0]["rho"] == 0.1


# ------------------------------------------------------------------------------------ machine
def test_extension_build_pending_reads_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from fastsam.kernels import _ext

    cpu = torch.device("cpu")
    monkeypatch.delenv("FASTSAM_DISABLE_EXT", raising=False)
    monkeypatch.setenv("FASTSAM_EXT_DIR", str(tmp_path))
    if not _ext.could_build("cpu")[0] or _ext._aot_library("cpu") is not None:
        pytest.skip("no JIT build possible here, or an ahead-of-time build: nothing to announce")
    assert machine.extension_build_pending(cpu)  # an empty cache: the first SAM step compiles
    name = _ext._build_name("cpu")
    lib = tmp_path / name / f"{name}.so"
    lib.parent.mkdir()
    lib.write_bytes(b"")
    assert not machine.extension_build_pending(cpu)  # built after the sources were last changed
    src = max(p.stat().st_mtime for p in _ext.csrc_dir().iterdir())
    os.utime(lib, (src - 10, src - 10))
    assert machine.extension_build_pending(cpu)  # a source changed since: ninja rebuilds
    monkeypatch.setenv("FASTSAM_DISABLE_EXT", "1")
    assert not machine.extension_build_pending(cpu)
    assert not machine.extension_build_pending(torch.device("meta"))


def test_step_seconds_and_environment() -> None:
    t0 = time.perf_counter()
    s = machine.step_seconds(torch.device("cpu"), steps=2)
    assert 0 < s < time.perf_counter() - t0
    env = machine.environment(torch.device("cpu"))
    assert env["fastsam"] == fastsam.__version__ and env["cpu_count"] == os.cpu_count()
