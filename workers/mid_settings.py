"""MID's step settings (``workers.mid``): what the config's ``mid`` section sets, with the
defaults the config shows. No torch here: the config imports this file to validate a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LossWeights:
    ac: float = 1.0
    cc: float = 1.0
    lc: float = 1.0
    rc: float = 0.0     # TRADES' robustness term, not the paper's (workers/mid.py)


@dataclass(frozen=True)
class MetaSettings:
    """MID's step settings. Their defaults are the config's (``mid.*`` in pipeline/config.py
    takes them from here), so a step built here and a run of the default config agree."""

    inner_lr: float = 1e-3              # α
    beta: float = 1.0                   # β
    temperature: float = 1.0            # τ
    second_order: bool = True
    batch_views: bool = True            # one forward pass for all meta-train views
    meta_train: LossWeights = field(default_factory=lambda: LossWeights(1.5, 0.8, 1.0))
    meta_test: LossWeights = field(default_factory=LossWeights)
    meta: bool = True                   # False: the ablation without meta-learning (module docstring)
    distill: bool = True                # False: the ablation without distillation: AC and CC off
    # True: LC reads a copy of C_t trained with the student (``StudentWithClassifier``); the
    # defended model is then C_s ∘ E_s. False: the paper's frozen C_t.
    trainable_classifier: bool = False

    def weights(self, phase: LossWeights) -> LossWeights:
        """A phase's weights as the step uses them: without distillation no teacher-feature term."""
        return phase if self.distill else LossWeights(ac=0.0, cc=0.0, lc=phase.lc, rc=phase.rc)
