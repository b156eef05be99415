"""fastsam inside Lightning (issue #14), on the real library: manual optimization with
``sam_step(model, self.optimizers(), ...)`` counted as Lightning steps, automatic optimization
(``SAM.step(closure)``) with LR scheduler dicts and gradient clipping, accumulation, Fabric."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fastsam
from fastsam.integrations._wrappers import lightning_closure_problem

pl = pytest.importorskip("lightning.pytorch", reason="the [dev] extra installs lightning")

# The models are tiny: one thread is faster than two fighting over a shared machine, and keeps
# the timings of the suite steady.
@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        # Lightning's advice for real runs (num_workers, a logger, small batches) is noise here
        warnings.filterwarnings("ignore", module="lightning")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        yield
    torch.set_num_threads(old)


def _net(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


_G = torch.Generator().manual_seed(0)
X, Y = torch.randn(64, 6, generator=_G), torch.randint(0, 3, (64,), generator=_G)


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(X, Y), batch_size=16)  # 4 batches per epoch, fixed order


def _batches(n: int):
    """The first n batches Lightning sees (epochs repeat the same order)."""
    out = []
    while len(out) < n:
        out.extend(_loader())
    return out[:n]


def _trainer(**kw) -> pl.Trainer:
    # max_epochs bounds every run: with steps that Lightning does not count, max_steps alone would
    # never stop it (the bug this file guards against); 3 epochs = 12 batches, more than any test needs
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, max_epochs=3)
    return pl.Trainer(**{**base, **kw})


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def _make_sam(params, **kw) -> fastsam.SAM:
    return fastsam.SAM(params, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, **kw)


class Manual(pl.LightningModule):
    """The documented manual-optimization form."""

    def __init__(self, accumulate: int = 1):
        super().__init__()
        self.net, self.automatic_optimization, self.accumulate = _net(), False, accumulate

    def configure_optimizers(self):
        return _make_sam(self.parameters())

    def training_step(self, batch, batch_idx):
        x, y = batch
        res = fastsam.sam_step(self.net, self.optimizers(), x, y, F.cross_entropy,
                               update=(batch_idx + 1) % self.accumulate == 0)
        self.log("loss", res.loss_tensor)


class Auto(pl.LightningModule):
    """Automatic optimization: Lightning calls SAM.step(closure), training_step runs twice."""

    def __init__(self, opt_cls=fastsam.SAM, sched: bool = False, **sam_kw):
        super().__init__()
        self.net, self.opt_cls, self.sched, self.sam_kw = _net(), opt_cls, sched, sam_kw
        self.calls: list[tuple[int, bool, float]] = []

    def configure_optimizers(self):
        opt = self.opt_cls(self.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, **self.sam_kw)
        if not self.sched:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.calls.append((batch_idx, self.optimizers().optimizer.is_perturbed, float(loss.detach())))
        self.log("loss", loss, on_step=True, on_epoch=True)
        return loss


def test_manual_sam_step_counts_lightning_steps_and_checkpoints(tmp_path):
    """max_steps stops the run, global_step and ModelCheckpoint(every_n_train_steps) follow the
    SAM steps, checkpoints hold the SAM step counter, and the weights are a sam_step loop's."""
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1,
                                        filename="{step}")
    model = Manual()
    trainer = _trainer(max_steps=6, enable_checkpointing=True, callbacks=[ckpt])
    trainer.fit(model, _loader())
    assert trainer.global_step == 6
    sam = trainer.optimizers[0]
    assert type(sam) is fastsam.SAM and sam.state_dict()["sam"]["step"] == 6

    ref = _net()
    opt = _make_sam(ref.parameters())
    for x, y in _batches(6):
        fastsam.sam_step(ref, opt, x, y, F.cross_entropy)
    assert _same(model.net, ref)

    saved = sorted(tmp_path.glob("*.ckpt"))
    assert [p.name for p in saved] == ["step=2.ckpt", "step=4.ckpt", "step=6.ckpt"]
    for p, step in zip(saved, (2, 4, 6)):
        state = torch.load(p, weights_only=False)
        assert state["global_step"] == step
        assert state["optimizer_states"][0]["sam"]["step"] == step

    # resuming from step 4 continues bit-identically to the uninterrupted run
    resumed = Manual()
    trainer = _trainer(max_steps=6)
    trainer.fit(resumed, _loader(), ckpt_path=str(tmp_path / "step=4.ckpt"))
    assert trainer.global_step == 6 and trainer.optimizers[0].state_dict()["sam"]["step"] == 6
    assert _same(resumed.net, model.net)


def test_manual_accumulation_counts_one_step_per_update():
    model = Manual(accumulate=2)
    trainer = _trainer(max_steps=3)
    trainer.fit(model, _loader())
    assert trainer.global_step == 3  # 6 batches, one step per 2

    ref = _net()
    opt = _make_sam(ref.parameters())
    for i, (x, y) in enumerate(_batches(6)):
        fastsam.sam_step(ref, opt, x, y, F.cross_entropy, update=i % 2 == 1)
    assert _same(model.net, ref)
    assert trainer.optimizers[0].state_dict()["sam"]["step"] == opt.state_dict()["sam"]["step"] > 0


def test_manual_fp16_uses_lightnings_grad_scaler():
    """precision 16-mixed: sam_step takes the precision plugin's GradScaler (no scaler= needed).
    Lightning refuses "16-mixed" on CPU by name, so the test hands it the plugin a GPU run would
    build (MixedPrecision("16-mixed") with a GradScaler), on CPU. A scale of 2**20 overflows fp16
    now and then: the same steps are skipped as by sam_step with its own scaler."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    class Fp16(Manual):
        def training_step(self, batch, batch_idx):
            x, y = batch
            res = fastsam.sam_step(self.net, self.optimizers(), x, y, F.cross_entropy)
            self.skipped.append(res.skipped)
            assert res.outputs.dtype == torch.float16  # Lightning's autocast around training_step

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    model = Fp16()
    model.skipped = []
    trainer = _trainer(max_steps=6, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(model, _loader())
    assert trainer.global_step == 6 and any(model.skipped) and not all(model.skipped)

    ref = _net()
    opt = _make_sam(ref.parameters())
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    skipped = [fastsam.sam_step(ref, opt, x, y, F.cross_entropy, scaler=ref_scaler, amp_dtype=torch.float16).skipped
               for x, y in _batches(6)]
    assert skipped == model.skipped and ref_scaler.get_scale() == scaler.get_scale()
    assert _same(model.net, ref)


def test_automatic_optimization_with_scheduler_dict_equals_sam_step_loop():
    """SAM returned from configure_optimizers (with an LR scheduler dict, interval "step"):
    training_step runs twice per step (at w, then at w + e); the logged step value is the
    second call's loss, the epoch value the mean of both calls."""
    model = Auto(sched=True)
    trainer = _trainer(max_steps=4, max_epochs=1)
    trainer.fit(model, _loader())
    assert trainer.global_step == 4

    ref = _net()
    opt = _make_sam(ref.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    losses = []
    for x, y in _batches(4):
        res = fastsam.sam_step(ref, opt, x, y, F.cross_entropy)
        losses.append((res.ascent_loss, res.loss))
        sched.step()
    assert _same(model.net, ref)
    assert trainer.optimizers[0].param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(0.1 / 5)

    assert [(b, p) for b, p, _ in model.calls] == [(b, p) for b in range(4) for p in (False, True)]
    got = [loss for _, _, loss in model.calls]
    assert got == pytest.approx([v for pair in losses for v in pair], abs=1e-6)
    assert float(trainer.logged_metrics["loss_step"]) == pytest.approx(losses[-1][1], abs=1e-6)
    assert float(trainer.logged_metrics["loss_epoch"]) == pytest.approx(sum(got) / len(got), abs=1e-6)


def test_automatic_gradient_clipping_clips_both_passes():
    """Lightning clips after every closure call: the first-pass gradient (before the
    perturbation) and the second (before second_step's GSAM combination and base step). With
    GSAM that differs from sam_step(max_grad_norm), which clips the final gradient only."""
    opts = dict(gsam_alpha=0.5)
    model = Auto(**opts)
    trainer = _trainer(max_steps=4, gradient_clip_val=0.05)
    trainer.fit(model, _loader())

    ref, ref2 = _net(), _net()
    opt, opt2 = _make_sam(ref.parameters(), **opts), _make_sam(ref2.parameters(), **opts)
    for x, y in _batches(4):
        F.cross_entropy(ref(x), y).backward()
        torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.05)
        opt.first_step(zero_grad=True)
        F.cross_entropy(ref(x), y).backward()
        torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.05)
        opt.second_step(zero_grad=True)
        fastsam.sam_step(ref2, opt2, x, y, F.cross_entropy, max_grad_norm=0.05)
    assert _same(model.net, ref)
    assert not _same(ref, ref2)  # the clipping points are really different


def test_proportional_rho_callback_and_second_pass_flag():
    """ProportionalRhoCallback: each step perturbs with rho = max_rho * lr / max_lr under a
    OneCycleLR scheduler dict; is_second_pass tells training_step's two calls apart."""
    from fastsam.integrations.lightning import ProportionalRhoCallback, is_second_pass

    class Cycle(Auto):
        def configure_optimizers(self):
            opt = fastsam.SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=8)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def training_step(self, batch, batch_idx):
            group = self.optimizers().optimizer.param_groups[0]
            self.seen.append((group["lr"], group["rho"], is_second_pass(self)))
            return super().training_step(batch, batch_idx)

    model = Cycle()
    model.seen = []
    _trainer(max_steps=8, callbacks=[ProportionalRhoCallback()]).fit(model, _loader())
    assert [second for _, _, second in model.seen] == [False, True] * 8
    lrs = [lr for lr, _, second in model.seen if not second]
    assert len(set(lrs)) == 8  # the lr really moved
    for lr, rho, _ in model.seen:
        assert rho == pytest.approx(0.05 * lr / 0.1, rel=1e-12)


class _CheckedSAM(fastsam.SAM):
    """SAM with the closure check called explicitly (SAM.step runs it too: see below)."""

    def step(self, closure=None):
        problem = lightning_closure_problem(closure)
        if problem is not None:
            raise RuntimeError(problem)
        return super().step(closure)


def test_closure_check_recognizes_lightning_accumulation():
    """lightning_closure_problem on the real closures of Lightning's automatic loop: an error
    with the manual-optimization recipe under accumulate_grad_batches > 1, nothing otherwise."""
    with pytest.raises(RuntimeError, match=r"accumulate_grad_batches=2.*automatic_optimization = False.*"
                                           r"update=\(batch_idx \+ 1\) % 2 == 0"):
        _trainer(max_steps=2, accumulate_grad_batches=2).fit(Auto(opt_cls=_CheckedSAM), _loader())
    model = Auto(opt_cls=_CheckedSAM)
    trainer = _trainer(max_steps=2)
    trainer.fit(model, _loader())
    assert trainer.global_step == 2
    assert lightning_closure_problem(lambda: None) is None and lightning_closure_problem(None) is None


def test_automatic_accumulation_fails_with_the_manual_recipe():
    try:
        _trainer(max_steps=2, accumulate_grad_batches=2).fit(Auto(), _loader())
    except RuntimeError as e:
        assert "automatic_optimization = False" in str(e)
        return
    raise AssertionError("Lightning's automatic optimization with accumulate_grad_batches=2 ran silently")


def test_param_groups_through_lightnings_wrapper():
    """self.optimizers().param_groups (e.g. to log the lr) reads the SAM object's groups."""
    class LogLr(Manual):
        def training_step(self, batch, batch_idx):
            self.lrs.append(self.optimizers().param_groups[0]["lr"])
            return super().training_step(batch, batch_idx)

    model = LogLr()
    model.lrs = []
    _trainer(max_steps=2).fit(model, _loader())
    assert model.lrs == [0.1, 0.1]


def test_fabric_optimizer_is_unwrapped():
    """fabric.setup's optimizer wrapper: the SAM object inside steps (its counter is what
    fabric.save stores), bit-identical to the raw optimizer."""
    fabric = pytest.importorskip("lightning.fabric").Fabric(accelerator="cpu", devices=1)
    net = _net()
    sam = _make_sam(net.parameters())
    fnet, fopt = fabric.setup(net, sam)
    ref = _net()
    opt = _make_sam(ref.parameters())
    for x, y in _batches(3):
        fastsam.sam_step(fnet, fopt, x, y, F.cross_entropy)
        fastsam.sam_step(ref, opt, x, y, F.cross_entropy)
    assert _same(net, ref)
    assert sam.state_dict()["sam"]["step"] == fopt.state_dict()["sam"]["step"] == 3


def test_non_sam_inside_lightning_wrapper_says_how_to_build_one():
    class Plain(Manual):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    with pytest.raises(ValueError, match=r"LightningAdamW wrapping AdamW: build fastsam\.SAM\(model\.parameters\(\), "
                                         r"torch\.optim\.AdamW"):
        _trainer(max_steps=1).fit(Plain(), _loader())
