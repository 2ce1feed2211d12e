"""What the training stages ask their Ray Train workers to do: typed, frozen and torch-free.

The driver (``pipeline/stages``) builds a job; the loops (``workers/train_classifier.py``,
``workers/train_on_pool.py``) read it. A field misspelt on either side fails at once instead of
falling back to a default, and MID's step defaults live in one place
(``workers/mid_settings.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workers.mid_settings import MetaSettings


@dataclass(frozen=True)
class Augmentation:
    """The workers' training augmentation (``workers.augment.crop_and_flip``)."""

    mode: str = "none"  # none, crop or crop_flip
    crop_padding: int = 0


@dataclass(frozen=True)
class WorkerGroup:
    """What ``pipeline.training.train_with_ray`` tells every loop besides its job."""

    rows_in_memory: bool  # each worker keeps its rows across epochs (workers.reproducible.WorkerRows)
    checkpoint_interval_s: float  # an epoch checkpoint at most this often
    stop_record: str  # where a loop says why it stopped without committing (workers.training_health)


@dataclass(frozen=True)
class ClassifierJob:
    """One classifier to train and commit under ``checkpoint_key``."""

    root: str  # the store
    checkpoint_key: str
    kind: str  # baseline, teacher, substitute or a classifier row's kind (workers/defenses)
    spec: dict[str, Any]  # ModelSpec.as_dict()
    seed: int
    settings: dict[str, Any]  # models.<kind> as its key holds it, the training attack resolved
    augmentation: Augmentation = field(default_factory=Augmentation)
    pretrained: str | None = None  # a state dict file that initialises it (checked on the driver)

    @property
    def epochs(self) -> int:
        return self.settings["epochs"]

    @property
    def batch_size(self) -> int:
        return self.settings["batch_size"]

    def epoch_settings(self, epoch: int) -> dict[str, Any]:
        """The settings of ``epoch``: the training attack's ε and step ramp up linearly over
        the first ``eps_warmup_epochs`` epochs (ε/W, 2ε/W, ..., ε), then stay."""
        attack, warmup = self.settings.get("attack"), self.settings.get("eps_warmup_epochs", 0)
        if attack is None or epoch >= warmup:
            return self.settings
        scale = (epoch + 1) / warmup
        return {**self.settings, "attack": {**attack, "eps": attack["eps"] * scale,
                                            "eps_iter": attack["eps_iter"] * scale}}


@dataclass(frozen=True, kw_only=True)
class PoolJob:
    """A model to train on the pool's views, aligned by sample, and commit under
    ``checkpoint_key``: MID's student (``MIDJob``) or a whole classifier trained with its
    row's loss on every view (``PoolClassifierJob``, ATTA)."""

    root: str  # the store
    checkpoint_key: str
    row: str  # its row (workers/defenses): its name in bars and messages, its checkpoint's kind
    spec: dict[str, Any]  # ModelSpec.as_dict()
    seed: int
    attacks: tuple[str, ...]  # the pool's attacks: the views of every step
    variants: int  # pool variants; epoch e reads variant e mod K
    epochs: int
    batch_size: int
    lr: float  # Adam's learning rate (MID's outer γ)
    bf16: bool  # autocast on GPU workers
    augmentation: Augmentation = field(default_factory=Augmentation)
    # A row trained on a refreshed pool (pipeline/stages/refresh.py) trains epochs
    # [first_epoch, epochs) from the checkpoint ``init_checkpoint`` (the last committed
    # round's, or round 0's starting model) in the rounds ``refreshed`` names.
    first_epoch: int = 0
    init_checkpoint: str | None = None
    refreshed: "RefreshedRounds | None" = None


@dataclass(frozen=True, kw_only=True)
class MIDJob(PoolJob):
    """A student encoder E_s meta-trained with MID's step (``workers/mid.py``, one view held
    out per step) against the frozen teacher ``teacher_key``."""

    teacher_key: str
    init_student: str  # teacher (a copy of E_t) or random, when no init_checkpoint is given
    step: MetaSettings  # the meta step, batch_views resolved for the workers' device
    row: str = "MID"


@dataclass(frozen=True, kw_only=True)
class PoolClassifierJob(PoolJob):
    """A whole classifier C ∘ E trained with its row's ``RefreshedDefense.loss`` on every
    view (ATTA); it starts from ``init_checkpoint`` (round 0: the baseline)."""

    init_checkpoint: str


@dataclass(frozen=True)
class RefreshedRounds:
    """The rounds a refreshed row's workers train, one worker group for them all. The
    driver publishes round r (its pool keys and checkpoint key) on ``channel`` once its pool
    version is in the store; the workers wait for it there, read their rows of that version
    through Ray Data, train the round's epochs, commit its checkpoint and report the commit
    on the channel."""

    dataset_key: str
    first_round: int  # the index of rounds[0]
    rounds: tuple[tuple[int, int], ...]  # epochs [first, stop) of each round still to train
    channel: Any  # the driver's RoundChannel actor (pipeline/stages/round_channel.py): round(r), committed(r, key)
    rows_in_memory: bool  # each worker keeps its rows of a round in memory across its epochs
    in_step: "InStepRefresh | None" = None  # pool.refresh.every 0: views continued in the step

    def round_of(self, epoch: int) -> int:
        return self.first_round + next(i for i, (lo, hi) in enumerate(self.rounds) if lo <= epoch < hi)

    def is_last_epoch_of_round(self, epoch: int) -> bool:
        return any(hi - 1 == epoch for _, hi in self.rounds)


@dataclass(frozen=True)
class RefreshedAttack:
    name: str
    eps: float
    step_size: float
    targeted: bool


@dataclass(frozen=True)
class InStepRefresh:
    """Staleness zero (workers/refresh_in_step.py): before each step, the batch's views of
    ``attacks`` are continued by ``steps`` steps against the live model, stored on the
    pool's ``delta_step`` grid, and carried to the next round through its checkpoint."""

    attacks: tuple[RefreshedAttack, ...]
    steps: int
    delta_step: int
    # ATTA takes AT's ε warm-up (models.at.eps_warmup_epochs): in epoch e < W the views are
    # continued inside the ball of (e+1)/W · ε, step (e+1)/W · step_size, as AT's attack ramps.
    eps_warmup_epochs: int = 0

    def eps_scale(self, epoch: int) -> float:
        return 1.0 if epoch >= self.eps_warmup_epochs else (epoch + 1) / self.eps_warmup_epochs
