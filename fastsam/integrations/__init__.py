"""fastsam inside the training frameworks people already use.

- Lightning: no module needed. :func:`fastsam.sam_step` accepts ``self.optimizers()`` (Lightning's
  ``LightningOptimizer``) in manual optimization and tells Lightning that a step happened
  (``global_step``, ``max_steps``, checkpoint callbacks). A ``fastsam.SAM`` returned from
  ``configure_optimizers`` also works in automatic optimization (``SAM.step(closure)``).
  :mod:`fastsam.integrations.lightning` has helpers for that mode.
- Hugging Face ``transformers``: :class:`fastsam.integrations.transformers.SAMTrainer`, a drop-in
  ``transformers.Trainer``.
- ``accelerate`` (and Lightning Fabric): :func:`fastsam.sam_step` accepts the optimizer returned by
  ``accelerator.prepare`` (``fabric.setup``) and keeps its step accounting.

Nothing here is imported by ``import fastsam``; each submodule imports its framework when it is
imported itself, and says which package to install when that fails. docs/integrations.md has a
complete example per framework.
"""

from __future__ import annotations

__all__: list[str] = []
