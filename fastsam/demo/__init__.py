"""``python -m fastsam.demo`` (console script ``fastsam-demo``): why SAM, and what each variant
costs, in about 3 minutes on 2 CPU cores.

Nothing is downloaded: part (a) generates its data, part (b) uses the 8x8 digits that ship
inside scikit-learn (``pip install fastsam[demo]`` for scikit-learn and matplotlib).

(a) The two-feature toy of Springer et al. (ICLR 2024, "SAM Enhances Feature Quality via
    Balanced Learning", section 5.1; :mod:`fastsam.demo.toy`, swept by :mod:`fastsam.demo.lsam`):
    a linear "easy" feature and a spiral "hard" feature, each fully predictive of the label, a
    disentangled network, and LSAM (only the last layer is perturbed: :class:`fastsam.SAM` with
    ``rho = 0`` on every other parameter group, trained with :func:`fastsam.sam_step`) against
    SGD (``rho = 0``). Reported: the hard feature's probing error against rho; the paper
    (Figure 2) shows it decreasing as rho grows.

    Kept from the paper: the data distribution (appendix E, a_easy = 2, a_hard = 0.25, the
    U([0, 0.5]^2) noise), the network (appendix B: Linear-LayerNorm-ReLU x 2 of width 100, then
    Linear to 1, shared by both features; last layer ``v`` without bias), 300 training points,
    plain SGD without momentum or weight decay, a constant learning rate, the probing error of
    section 5.1 (0-1 error of ``sign(v_hard * Phi_hard(x))``; we multiply by ``v_hard`` so that a
    feature learned with the opposite sign is not counted as wrong).

    Changed, and why:

    - one spiral complexity, 360 degrees, instead of several: at 180 degrees SGD already learns
      the spiral about as well as a network trained on the spiral alone (the noise sets the
      floor), leaving nothing to improve; at 540-720 degrees neither method learns much of it at
      this budget;
    - batch 20 and learning rate 0.05 instead of 5 and 0.01 (learning rate scaled with the
      batch) and 25 epochs (the paper does not give its epoch count): 375 steps. Longer runs let
      ``|v|`` grow, which shrinks a fixed rho's relative effect (at 100 epochs we saw none);
    - a rho grid of 0, 0.25, 0.5, 1 (the paper does not list its grid) with 12 seeds: the effect
      is a few points of error against a larger seed-to-seed spread, so the table also gives the
      paired difference with SGD on the same seed (same data, initialization and batch order)
      and its standard error;
    - a second measure next to the paper's: section 3's linear probe specialized to a scalar
      feature (a fitted sign and threshold, :func:`fastsam.demo.toy.threshold_probe_error`),
      which does not count the offset that ``Phi``'s output bias (shared by both features) adds.

(b) scikit-learn's 8x8 digits with :class:`fastsam.models.TinyViT` (18k parameters), on clean
    training labels and on training labels of which a fraction (``--noise``, default 40%) was
    replaced by a wrong class; test labels are always clean (:mod:`fastsam.demo.labelnoise`,
    :mod:`fastsam.demo.digits`). SAM is natively robust to label noise (Foret et al. 2021,
    section 3.3), and the cheaper variants trade some of that for time. Every variant of
    :data:`fastsam.demo.variants.REGISTRY` runs through :func:`fastsam.sam_step` next to the base
    optimizer alone, with one recipe (AdamW, warmup + cosine) and each paper's defaults; its rho
    is chosen once per label condition on a clean held-out part of the training set. Reported
    per variant: test accuracy (mean and std over seeds, and the paired difference with the base
    optimizer), the rho chosen, milliseconds per step, forward/backward passes per step (counted
    with hooks on the model) and the backend that ran the SAM step.

On CPU the runs are spread over worker processes of one thread each when cores are idle
(``--workers``); every run is a pure function of its seed, so the numbers do not depend on how
they were scheduled (the ms/step do: they are per process, one thread each).

Outputs (``--out``, default ``fastsam_demo_out/``): ``results.json`` (every number, every run),
``demo.png`` (the three panels); the tables go to stdout, the progress bar to stderr. The
README's demo section, ``docs/demo.png`` and ``docs/demo_results.json`` come from a default run
through :mod:`fastsam.demo.readme`.

Modules: :mod:`~fastsam.demo.cli` (command line), :mod:`~fastsam.demo.variants` (the registry),
:mod:`~fastsam.demo.digits` (data, noise, one run), :mod:`~fastsam.demo.labelnoise` (part (b)),
:mod:`~fastsam.demo.toy` and :mod:`~fastsam.demo.lsam` (part (a)), :mod:`~fastsam.demo.jobs`
(worker processes, progress), :mod:`~fastsam.demo.machine` (machine facts, the extension's
build), :mod:`~fastsam.demo.report` (tables), :mod:`~fastsam.demo.plot` (the figure),
:mod:`~fastsam.demo.readme` (the committed outputs).
"""

from __future__ import annotations

from .cli import main
from .variants import REGISTRY, VARIANTS, Variant

__all__ = ["REGISTRY", "VARIANTS", "Variant", "main"]
