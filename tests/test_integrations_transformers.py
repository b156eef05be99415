"""fastsam.integrations.transformers.SAMTrainer on the real transformers.Trainer (issue #14):
tiny randomly initialized BERT / GPT-2 configs, nothing downloaded."""

from __future__ import annotations

import logging
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastsam

transformers = pytest.importorskip("transformers", reason="the [dev] extra installs transformers")
from fastsam.integrations.transformers import SAMBaseStep, SAMTrainer  # noqa: E402

N, T, V = 32, 10, 100


@pytest.fixture(autouse=True)
def _quiet_one_thread():
    # tiny models: one thread is faster than two on a shared machine and keeps timings steady
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    yield
    torch.set_num_threads(old)


def _bert(dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3,
                                  hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return transformers.BertForSequenceClassification(cfg)


def _gpt2(dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0,
                                  eos_token_id=0, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return transformers.GPT2LMHeadModel(cfg)


_G = torch.Generator().manual_seed(0)
IDS = torch.randint(1, V, (N, T), generator=_G)
CLS = torch.randint(0, 3, (N,), generator=_G)
LM_LABELS = IDS.clone()
LM_LABELS[:, :3] = -100  # a prompt that is not trained on


def _cls_data() -> list[dict]:
    return [{"input_ids": IDS[i], "labels": CLS[i]} for i in range(N)]


def _lm_data() -> list[dict]:
    return [{"input_ids": IDS[i], "labels": LM_LABELS[i]} for i in range(N)]


def _batches(data: list[dict], size: int):
    for lo in range(0, len(data), size):
        rows = data[lo:lo + size]
        yield {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


class _InOrder(SAMTrainer):
    """Batches in dataset order, so that a hand-written loop can see the same ones."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def _args(tmp_path, **kw) -> transformers.TrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], per_device_train_batch_size=8,
                learning_rate=1e-3, max_grad_norm=0.0, save_strategy="no", logging_steps=1, disable_tqdm=True,
                seed=0, dataloader_num_workers=0)
    return transformers.TrainingArguments(**{**base, **kw})


def _reference(model, tmp_path, steps: int, **sam_kw):
    """Trainer's own AdamW groups and linear schedule, in a fastsam.SAM driven by sam_step."""
    plain = transformers.Trainer(model=model, args=_args(tmp_path))
    sam = fastsam.SAM(None, plain.create_optimizer(), **sam_kw)
    sched = plain.create_scheduler(steps, optimizer=sam)
    return sam, sched


def _max_diff(a, b) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def test_samtrainer_equals_sam_step_loop(tmp_path):
    """Two forward passes per step, the SAM counter advancing, Trainer's logged loss = the
    pass-2 loss, and the weights of a sam_step loop on the same model (ModelOutput handled)."""
    model = _bert()
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    trainer = _InOrder(model=model, args=_args(tmp_path, max_steps=4), train_dataset=_cls_data(),
                       sam_kwargs={"rho": 0.05})
    out = trainer.train()
    assert out.global_step == 4 and len(forwards) == 8
    assert isinstance(trainer.optimizer.optimizer, SAMBaseStep)
    assert trainer.sam.state_dict()["sam"]["step"] == 4

    ref = _bert()
    sam, sched = _reference(ref, tmp_path, 4, rho=0.05)
    losses = []
    for batch in list(_batches(_cls_data(), 8))[:4]:
        labels = batch.pop("labels")
        res = fastsam.sam_step(ref, sam, batch, labels, F.cross_entropy)
        losses.append(res.loss)
        sched.step()
    assert _max_diff(model, ref) == 0.0
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged == pytest.approx(losses, abs=1e-6)


def _shifted(fn):
    """A causal LM's loss on sam_step's logits: position t predicts label t + 1."""
    def loss(logits, labels, reduction="mean"):
        return fn(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction=reduction)
    return loss


def test_samtrainer_accumulation_and_clipping(tmp_path):
    """gradient_accumulation_steps=2 with GSAM: each micro-batch gets its own perturbation and
    GSAM combination; Trainer clips the mean of the perturbed gradients. Equals
    sam_step(update=False) then sam_step(max_grad_norm=...). (GPT-2: its loss is normalized by
    Trainer's token count. transformers 5 sums, not averages, the micro-batch gradients of models
    that accept loss kwargs but ignore them, e.g. BertForSequenceClassification, plain Trainer
    included; SAMTrainer scales its losses exactly as Trainer does.)"""
    model = _gpt2()
    sam_kw = {"rho": 0.05, "gsam_alpha": 0.3}
    trainer = _InOrder(model=model, args=_args(tmp_path, max_steps=2, per_device_train_batch_size=4,
                                               gradient_accumulation_steps=2, max_grad_norm=0.5),
                       train_dataset=_lm_data(), sam_kwargs=sam_kw)
    trainer.train()
    assert trainer.state.global_step == 2

    def run(clip):
        ref = _gpt2()
        sam, sched = _reference(ref, tmp_path, 2, **sam_kw)
        for i, batch in enumerate(list(_batches(_lm_data(), 4))[:4]):
            labels = batch.pop("labels")
            fastsam.sam_step(ref, sam, batch, labels, _shifted(F.cross_entropy), update=i % 2 == 1,
                             max_grad_norm=clip)
            if i % 2 == 1:
                sched.step()
        return ref, sam

    ref, sam = run(0.5)
    assert _max_diff(model, ref) < 1e-6
    assert trainer.sam.state_dict()["sam"]["step"] == sam.state_dict()["sam"]["step"] > 0
    assert _max_diff(run(None)[0], ref) > 1e-5  # the clipping threshold was really active


def _lm_ascent(logits, labels, reduction="mean"):
    return fastsam.losses.obf_loss(logits, labels, reduction=reduction)


def test_samtrainer_ascent_loss_on_a_causal_lm(tmp_path):
    """ascent_loss_fn (OBF) in pass 1 on GPT-2's shifted logits; pass 2 Trainer's causal-LM loss
    (normalized by the token count): a sam_step loop with the same losses."""
    model = _gpt2()
    trainer = _InOrder(model=model, args=_args(tmp_path, max_steps=3), train_dataset=_lm_data(),
                       sam_kwargs={"rho": 0.05}, ascent_loss_fn=_lm_ascent)
    trainer.train()

    ref = _gpt2()
    sam, sched = _reference(ref, tmp_path, 3, rho=0.05)
    for batch in list(_batches(_lm_data(), 8))[:3]:
        labels = batch.pop("labels")
        fastsam.sam_step(ref, sam, batch, labels, _shifted(F.cross_entropy), ascent_loss_fn=_shifted(_lm_ascent))
        sched.step()
    assert _max_diff(model, ref) < 1e-6
    plain = _gpt2()
    sam, sched = _reference(plain, tmp_path, 3, rho=0.05)
    for batch in list(_batches(_lm_data(), 8))[:3]:
        labels = batch.pop("labels")
        fastsam.sam_step(plain, sam, batch, labels, _shifted(F.cross_entropy))
        sched.step()
    assert _max_diff(plain, ref) > 1e-5  # the ascent loss changed the step


def test_samtrainer_resume_is_bit_identical(tmp_path):
    """Dropout on, gradient accumulation, ascent loss, F-SAM + ESAM state: resuming from the
    step-2 checkpoint ends bit-identical to the uninterrupted run, and the checkpoint holds the
    SAM state (its step counter half the final one, the F-SAM EMA)."""
    kw = dict(sam_kwargs={"rho": 0.05, "fsam_sigma": 0.5, "swp_keep": 0.7, "seed": 3}, ascent_loss_fn=_lm_ascent)
    args = dict(max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=2, save_strategy="steps",
                save_steps=2, logging_steps=100)
    full = _gpt2(dropout=0.1)
    first = SAMTrainer(model=full, args=_args(tmp_path, **args), train_dataset=_lm_data(), **kw)
    first.train()
    final_step = first.sam.state_dict()["sam"]["step"]
    ckpt = tmp_path / "out" / "checkpoint-2"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert 2 * saved["sam"]["step"] == final_step > 0 and saved["sam"]["state"]  # F-SAM EMA saved

    resumed = _gpt2(dropout=0.1)
    trainer = SAMTrainer(model=resumed, args=_args(tmp_path, **args), train_dataset=_lm_data(), **kw)
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.sam.state_dict()["sam"]["step"] == final_step
    assert _max_diff(full, resumed) == 0.0
    assert _max_diff(full, _gpt2()) > 0  # it did train


def test_samtrainer_bf16(tmp_path):
    """bf16=True on CPU: accelerate runs the forward passes under bfloat16 autocast."""
    model = _bert()
    dtypes = []
    model.classifier.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    trainer = SAMTrainer(model=model, args=_args(tmp_path, max_steps=2, bf16=True), train_dataset=_cls_data(),
                         sam_kwargs={"rho": 0.05})
    trainer.train()
    assert dtypes == [torch.bfloat16] * 4
    assert trainer.sam.state_dict()["sam"]["step"] == 2
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert _max_diff(model, _bert()) > 0


def test_samtrainer_fp16_grad_scaler(tmp_path):
    """fp16 with a GradScaler. accelerate turns fp16 off on CPU (it trains in fp32 there), so the
    test switches on what its constructor sets on a GPU: native AMP and a GradScaler (here
    torch.amp.GradScaler("cpu")). A scale of 2**20 overflows fp16 now and then: those steps are
    skipped (weights, optimizer and LR schedule untouched, scale halved); the run matches
    sam_step with the same scaler, which skips the same steps (F-SAM on: a skipped step must
    leave its EMA alone)."""
    model = _bert()
    trainer = _InOrder(model=model, args=_args(tmp_path, max_steps=4, fp16=True), train_dataset=_cls_data(),
                       sam_kwargs={"rho": 0.05, "fsam_sigma": 0.5})
    acc = trainer.accelerator
    assert acc.scaler is None  # accelerate's CPU behaviour, which the two lines below replace
    acc.native_amp, acc.scaler = True, torch.amp.GradScaler("cpu", init_scale=2.0**20)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    skipped = [not math.isfinite(h["grad_norm"]) for h in logged]
    assert any(skipped) and not all(skipped)
    assert acc.scaler.get_scale() < 2.0**20

    ref = _bert()
    sam, sched = _reference(ref, tmp_path, 4, rho=0.05, fsam_sigma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    ref_skipped = []
    for batch in list(_batches(_cls_data(), 8))[:4]:
        labels = batch.pop("labels")
        res = fastsam.sam_step(ref, sam, batch, labels, F.cross_entropy, scaler=scaler, amp_dtype=torch.float16)
        ref_skipped.append(res.skipped)
        if not res.skipped:
            sched.step()
    assert skipped == ref_skipped
    assert scaler.get_scale() == acc.scaler.get_scale()
    assert trainer.lr_scheduler.get_last_lr() == sched.get_last_lr()
    assert _max_diff(model, ref) < 1e-5
    # a skipped step changes no SAM state (F-SAM EMA, step counter), as in sam_step
    assert trainer.sam.state_dict()["sam"]["step"] == sam.state_dict()["sam"]["step"] == skipped.count(False)


def test_plain_trainer_with_a_fastsam_optimizer_names_samtrainer(tmp_path):
    model = _bert()
    opt = fastsam.SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_cls_data(),
                                   optimizers=(opt, None))
    with pytest.raises(ValueError, match="fastsam.integrations.transformers.SAMTrainer"):
        trainer.train()


def test_samtrainer_wraps_the_optimizers_it_is_given(tmp_path):
    # a fastsam.SAM is used as it is (with its own scheduler)
    model = _bert()
    sam = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(sam, step_size=1, gamma=0.5)
    trainer = SAMTrainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=_cls_data(),
                         optimizers=(sam, sched))
    trainer.train()
    assert trainer.sam is sam and sam.state_dict()["sam"]["step"] == 2
    assert sam.param_groups[0]["lr"] == pytest.approx(0.025)
    # a plain optimizer becomes SAM's base, with sam_kwargs
    model = _bert()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = SAMTrainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_cls_data(),
                         optimizers=(adamw, None), sam_kwargs={"rho": 0.2, "adaptive": True})
    trainer.train()
    assert trainer.sam.base_optimizer is adamw and trainer.sam.param_groups[0]["rho"] == 0.2
    assert trainer.sam.param_groups[0]["adaptive"] is True
    with pytest.raises(ValueError, match="sam_kwargs"):
        SAMTrainer(model=_bert(), args=_args(tmp_path, max_steps=1), train_dataset=_cls_data(),
                   optimizers=(fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1), None),
                   sam_kwargs={"rho": 0.1}).train()


def test_samtrainer_continues_a_plain_trainer_checkpoint(tmp_path):
    """A transformers.Trainer checkpoint has no SAM state: SAMTrainer resumes it with a warning,
    its AdamW state in SAM's base optimizer and a fresh SAM state."""
    args = _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    transformers.Trainer(model=_bert(), args=args, train_dataset=_cls_data()).train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    plain = torch.load(ckpt / "optimizer.pt", weights_only=True)
    trainer = SAMTrainer(model=_bert(), args=_args(tmp_path, max_steps=4), train_dataset=_cls_data(),
                         sam_kwargs={"rho": 0.05})
    with pytest.warns(UserWarning, match="without SAM state"):
        trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.state.global_step == 4
    base = trainer.sam.base_optimizer.state_dict()["state"]
    assert all(int(base[i]["step"]) == int(plain["state"][i]["step"]) + 2 == 4 for i in plain["state"])
    assert trainer.sam.state_dict()["sam"]["step"] == 2  # SAM started fresh at the resume
    assert all(g["rho"] == 0.05 for g in trainer.sam.param_groups)

def _ddp_worker(out: Path) -> None:
    """One rank of test_samtrainer_ddp_is_per_rank_m_sharpness (run by torchrun)."""
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    model = _gpt2()
    trainer = _InOrder(model=model, args=_args(out, max_steps=3, per_device_train_batch_size=4, ddp_backend="gloo",
                                               logging_strategy="no"),
                       train_dataset=_lm_data(), sam_kwargs={"rho": 0.05, "gsam_alpha": 0.2})
    assert trainer.args.world_size == 2
    trainer.train()
    state = {"weights": [p.detach() for p in model.parameters()], "sam_step": trainer.sam.state_dict()["sam"]["step"]}
    torch.save(state, out / f"rank{os.environ['RANK']}.pt")


def test_samtrainer_ddp_is_per_rank_m_sharpness(tmp_path):
    """2 ranks (torchrun, gloo on CPU), 4 sequences each: every rank perturbs with its own
    gradient and the final gradient is averaged once: sam_step on the 8 sequences with
    micro_batch=4 (with GSAM per rank), not SAM on the whole batch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", __file__, "--ddp-worker", str(tmp_path)]
    # the ranks import the fastsam under test (the script's folder, tests/, is what Python puts on the path)
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    assert ranks[0]["sam_step"] == ranks[1]["sam_step"] == 3
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["weights"], ranks[1]["weights"]))

    def run(micro_batch):
        ref = _gpt2()
        sam, sched = _reference(ref, tmp_path, 3, rho=0.05, gsam_alpha=0.2)
        for batch in list(_batches(_lm_data(), 8))[:3]:
            labels = batch.pop("labels")
            fastsam.sam_step(ref, sam, batch, labels, _shifted(F.cross_entropy), micro_batch=micro_batch)
            sched.step()
        return [p.detach() for p in ref.parameters()]

    def diff(a, b):
        return max(float((p - q).abs().max()) for p, q in zip(a, b))

    assert diff(ranks[0]["weights"], run(4)) < 1e-6
    assert diff(ranks[0]["weights"], run(None)) > 1e-5


if __name__ == "__main__" and sys.argv[1:2] == ["--ddp-worker"]:
    _ddp_worker(Path(sys.argv[2]))


def test_readme_causal_lm_recipe_with_model_output():
    """The README's Hugging Face recipe: a ModelOutput's .logits reach the loss functions, the
    inputs go as a dict, next-token labels with padding ignored; BiSAM as the ascent loss."""
    model = _gpt2()
    opt = fastsam.SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3)
    mask = torch.ones_like(IDS)
    mask[:, -2:] = 0  # padding, as a tokenizer's batch has
    batch = {"input_ids": IDS, "attention_mask": mask}  # what tokenizer(texts, return_tensors="pt", padding=True) gives

    def ce(out, tgt, reduction="mean"):
        return F.cross_entropy(out.flatten(0, 1), tgt.flatten(), ignore_index=-100, reduction=reduction)

    def ascent(out, tgt, reduction="mean"):
        return fastsam.losses.bisam_loss(out.flatten(0, 1), tgt.flatten(), ignore_index=-100, reduction=reduction)

    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    w0 = [p.detach().clone() for p in model.parameters()]
    res = fastsam.sam_step(model, opt, dict(batch), targets, ce, ascent_loss_fn=ascent, keep_outputs=False)
    assert not res.skipped and math.isfinite(res.loss) and res.outputs is None
    assert any(not torch.equal(a, b) for a, b in zip(w0, model.parameters()))
