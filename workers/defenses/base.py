"""What every row of the tables shares: its name, its model's kind, what it is.

A row is trained as a classifier C ∘ E by ``workers/train_classifier.py``
(``ClassifierDefense``: a loss, a settings section ``models.<kind>``, a cost per sample for
``mid plan``), as MID's student on the stored pool (``PoolStudentDefense``) or in rounds on
a refreshed pool (``RefreshedDefense``); the stage each base class names is in
``pipeline/rows.py``. The config, the driver, the
export, the sweeps and ``mid plan`` read rows from the registry (``workers/defenses/__init__.py``),
so a new row is its file and one line there (docs/extending.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, Field, PositiveFloat, PositiveInt

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch loads on first use, not on import: the config reads every row's Settings
# (pipeline/config.py), and `mid validate` stays a second.


class TrainSettings(BaseModel):
    """A classifier's training: what its ``models.<kind>`` section holds, and the fields
    every other section there shares (the config builds the sections from these)."""

    epochs: PositiveInt = 20
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 1e-3


class AdversarialTrainSettings(TrainSettings):
    """Training on an attack generated online against the model being trained; the attack
    is attacks.PGD with the section's ``attack`` overrides (``RunConfig.training_attack``),
    resolved into the worker's job and the model's key."""

    attack: dict[str, Any] = Field(
        default_factory=dict,
        description="overrides of attacks.PGD for the training attack, e.g. {nb_iter: 10}")
    eps_warmup_epochs: int = Field(
        0, ge=0, description="ramp the training attack's ε and step linearly up to their values over this many "
                             "epochs (0: full ε from the start); large ε on a small network needs it to train")


class RefreshedSettings(BaseModel):
    """A refreshed row's schedule, its section ``models.<section>``: a field left unset is
    taken from the section of the step the row takes (``mid`` for MID's, ``models.at`` and
    ``models.num_workers`` for cross-entropy), its epochs from ``pool.refresh.epochs`` first."""

    epochs: PositiveInt | None = Field(None, description="epochs (none: pool.refresh.epochs, else the base section's)")
    batch_size: PositiveInt | None = Field(None, description="batch size per worker (none: the base section's)")
    lr: PositiveFloat | None = Field(None, description="Adam's learning rate (none: the base section's)")
    num_workers: PositiveInt | None = Field(None, description="Ray Train workers (none: the base section's)")


# The kind a student encoder's checkpoint records (MID, MID-R): C_t ∘ E_s, read with its teacher.
STUDENT_CHECKPOINT = "mid_student"


class Defense:
    """A row of the tables. Its base class says which stage trains it (pipeline/rows.py):
    ``ClassifierDefense``, ``PoolStudentDefense`` or ``RefreshedDefense``."""

    row: ClassVar[str]  # its name in the tables, in eval.defenses, sweeps' row and export's --row
    kind: ClassVar[str]  # its model's stage, the label a run's ref claims it under
    description: ClassVar[str]  # one sentence: the export card's "what", the config section's description
    exportable: ClassVar[bool] = True  # `mid export --row` offers it
    reads_teacher_classifier: ClassVar[bool] = False  # its model is a student encoder E_s read by the teacher's C_t

    @classmethod
    def section(cls) -> str:
        """Its settings section's name under ``models`` (its kind, a Python name)."""
        return cls.kind.replace("-", "_")

    @classmethod
    def checkpoint_kind(cls) -> str:
        """The kind its checkpoints' manifests record."""
        return STUDENT_CHECKPOINT if cls.reads_teacher_classifier else cls.kind


class ClassifierDefense(Defense):
    """A row whose model is a classifier C ∘ E, trained with its own ``loss`` on the clean
    training split, in the classifiers' worker group (``workers.train_classifier``)."""

    Settings: ClassVar[type[TrainSettings]] = TrainSettings  # models.<kind>: names, defaults, bounds

    @classmethod
    def attacks_online(cls) -> bool:
        """Whether it trains against an attack (its section then has ``attack`` overrides)."""
        return issubclass(cls.Settings, AdversarialTrainSettings)

    @staticmethod
    def loss(model: nn.Module, plain: nn.Module, x: torch.Tensor, y: torch.Tensor,
             settings: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits to count training accuracy on) of one batch. ``model`` may be the
        DDP wrapper (its backward all-reduces); ``plain`` is the module inside it, for
        attacks, whose backward passes must not be all-reduced. ``settings``: the job's,
        the training attack resolved (and ramped, epoch by epoch)."""
        import torch.nn.functional as F

        logits = model(x)
        return F.cross_entropy(logits, y), logits

    @classmethod
    def step_macs(cls, settings: dict[str, Any], units: dict[str, float]) -> float:
        """Multiply-accumulates per training sample, from ``mid plan``'s measured units
        (``workers.flops.unit_costs``: forward, attack_step, train_step)."""
        return units["train_step"]

    @classmethod
    def summary(cls, settings: dict[str, Any]) -> str:
        """What ``mid plan`` says about its training."""
        return f"{settings['epochs']} epochs"


class PoolStudentDefense(Defense):
    """A student encoder E_s meta-trained on the stored attacker pool by the MID stage
    (``workers/train_on_pool.py``, settings in the config's ``mid`` section), read by the frozen
    teacher's classifier C_t."""

    reads_teacher_classifier = True


class RefreshedDefense(Defense):
    """A row trained in rounds on a refreshed pool (``pipeline/stages/refresh.py``,
    docs/design.md §4.1): round r trains on pool r; pool r+1 is pool r continued by
    ``pool.refresh.steps`` attack steps against round r's model, the row's own model
    (ATTA, Zheng et al. 2020, with the stored pool as its carried perturbations)."""

    # "mid": MID's meta step (workers/mid.py) on a student encoder, read by the teacher's
    # classifier; "cross_entropy": the row's ``loss`` on every view, on a whole classifier.
    objective: ClassVar[str]
    init_from: ClassVar[str]
    Settings: ClassVar[type[RefreshedSettings]] = RefreshedSettings  # models.<section>: its schedule  # the model round 0 starts from: "teacher" (mid.init_student) or "baseline"

    @staticmethod
    def loss(model: nn.Module, views: list[torch.Tensor],
             labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """A ``cross_entropy`` row's loss of one batch (its views of every pool attack, in
        the pool's order) and the metrics its epochs average; ATTA's: the mean cross-entropy
        over the adversarial views, in one forward pass. The backward pass is the worker's
        (its gradient is averaged across workers)."""
        import torch
        import torch.nn.functional as F

        logits = model(torch.cat(views))
        targets = labels.repeat(len(views))
        loss = F.cross_entropy(logits, targets)
        return loss, {"loss": loss.item(), "adversarial_accuracy": (logits.argmax(1) == targets).float().mean().item()}
