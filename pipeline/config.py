"""The run configuration's schema: one pydantic tree, every section and its checks.

Everything is validated before Ray starts. Unknown keys are errors (a typo must not
silently fall back to a default), and every error names the field and what is allowed.
Reading a file into this tree is ``pipeline.config_loader``; what a run of it trains, in
what order, is ``pipeline.run_plan``.
"""

from __future__ import annotations

import re
import typing
from dataclasses import asdict
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError,
                      ValidationInfo, create_model, field_validator, model_validator)

from storage.pools import INT8_MAX_EPS
from storage.store import StoreError, check_url
from storage.readers import READERS
from workers.attacks import FAMILIES, attack_class, parse_attack_name
from workers.defenses import DEFENSES, classifier_rows, defense_class, refreshed_rows
from workers.defenses.base import TrainSettings
from workers.mid_settings import LossWeights, MetaSettings
from workers.models import ARCHITECTURES, has_decoder


def _types_in(annotation: Any) -> set[Any]:
    """The plain types an annotation admits (through Optional, unions, Annotated, Literal values)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return {type(v) for v in typing.get_args(annotation)}
    if origin is None:
        return {annotation}
    if origin is typing.Annotated:
        return _types_in(typing.get_args(annotation)[0])
    return set().union(*(_types_in(a) for a in typing.get_args(annotation))) | {origin}


def unknown_key(section: type[BaseModel] | None, key: str) -> str:
    """The one wording of an unknown key: with the keys ``section`` allows, when it is known."""
    allowed = f" (allowed: {', '.join(section.model_fields)})" if section is not None else ""
    return f"unknown key {key!r}{allowed}"


def section_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section ``loc`` (a pydantic error's location) names inside ``model``; None where
    it leads into something that is not a section (a mapping's key, a list's index)."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        sections = [t for t in _types_in(field.annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
        if len(sections) != 1:
            return None
        model = sections[0]
    return model


class Section(BaseModel):
    """A config section: unknown keys are rejected (``extra="forbid"``; the loader's message
    lists the allowed ones, ``unknown_key``)."""

    # allow_inf_nan: YAML reads .inf and .nan as floats; a learning rate or loss weight of
    # either trains a model of NaN weights that would still be committed.
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1 for a number; `epochs: true` is a mistake, not one epoch.
        if isinstance(value, bool):
            admitted = _types_in(cls.model_fields[info.field_name].annotation)
            if admitted & {int, float} and bool not in admitted:
                raise ValueError(f"{str(value).lower()} is a boolean; a number is expected")
        return value


class DataConfig(Section):
    source: Literal[tuple(READERS)] = Field(
        "digits", description=", ".join(f"{name} ({entry.description})" for name, entry in READERS.items()))
    path: str | None = Field(None, description="the dataset's file or folder (every source but digits)")
    image_size: PositiveInt | None = Field(
        None, description="resize images to this side (bilinear); image_folder: resize the shorter side, then "
                          "centre-crop (required there)")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="digits only: share held out for test")
    train_limit: PositiveInt | None = Field(None, description="use a seeded subset of the train split")
    test_limit: PositiveInt | None = Field(None, description="use a seeded subset of the test split")
    augment: Literal["auto", "none", "crop", "crop_flip"] = Field(
        "auto", description="training augmentation on the workers: random crop after zero padding (crop), plus "
                            "horizontal flips (crop_flip); auto: the source's own (" +
                            ", ".join(f"{name}: {entry.augment}" for name, entry in READERS.items()) + ")")
    crop_padding: PositiveInt = Field(4, description="zero padding of the random crop, in pixels")

    @model_validator(mode="after")
    def _path_for_files(self):
        if self.source != "digits" and not self.path:
            raise ValueError(f"data.path is required for source {self.source!r}: {READERS[self.source].path}, e.g. "
                             f"--set data.path=../shared/data/{self.source}")
        if self.source == "image_folder" and not self.image_size:
            raise ValueError("data.image_size is required for source 'image_folder': its images have many sizes "
                             "(e.g. 64 for Tiny-ImageNet, 224 for ImageNet)")
        return self

    def augmentation(self) -> str:
        """The augmentation actually applied (``auto`` resolved by source)."""
        if self.augment != "auto":
            return self.augment
        return READERS[self.source].augment


def _section(settings: type[BaseModel], name: str) -> type[Section]:
    """A config section made of settings a worker-side file declares (an attack family's,
    a defense row's), validated like every section."""
    return type(name, (Section, settings), {"__module__": __name__, "__doc__": settings.__doc__})


TrainConfig = _section(TrainSettings, "TrainConfig")


class TeacherConfig(TrainConfig):
    lambda_rec: float = Field(1.0, ge=0.0, description="weight of the L1 reconstruction loss")


class SubstituteConfig(TrainConfig):
    seed: int = Field(1, ge=0, description="its own seed; must differ from the run's seed")


class _ModelsConfig(Section):
    arch: Literal[tuple(ARCHITECTURES)] = Field(
        "lenet", description=", ".join(f"{name} ({entry.description})" for name, entry in ARCHITECTURES.items()))
    feature_dim: PositiveInt = Field(84, description="lenet only: the feature vector's size")
    mean: list[float] | None = Field(None, description="per-channel input mean, subtracted inside the model "
                                                       "(attacks and ε stay in [0, 1] pixels)")
    std: list[float] | None = Field(None, description="per-channel input std, divided inside the model")
    pretrained: str | None = Field(
        None, description="a torchvision / timm state dict file (.pth, .pt or .safetensors) that initialises the "
                          "baseline and the teacher; never downloaded")

    @model_validator(mode="after")
    def _mean_with_std(self):
        if (self.mean is None) != (self.std is None):
            raise ValueError("models.mean and models.std go together: give both or neither")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise ValueError(f"models.std: every value must be positive, got {self.std}")
        return self
    num_workers: PositiveInt = 2


def _row_sections() -> dict[str, tuple[type[Section], Any]]:
    """``models.<section>`` of every classifier row and every refreshed row, typed by the
    row's own settings (workers/defenses/<file>.py: ``Settings``)."""
    sections = {}
    for row in [*classifier_rows(), *refreshed_rows()]:
        defense = defense_class(row)
        section = _section(defense.Settings, f"{row.replace('-', '')}Section")
        sections[defense.section()] = (section, Field(section(), description=f"{defense.description} (row {row})"))
    return sections


# The classifiers' sections: the rows' (the baseline's first), the teacher's, the substitute's.
_ROWS = _row_sections()
ModelsConfig = create_model(
    "ModelsConfig", __base__=_ModelsConfig, __module__=__name__,
    baseline=_ROWS.pop("baseline"),
    teacher=(TeacherConfig, TeacherConfig(epochs=30)),
    **_ROWS,
    substitute=(SubstituteConfig, Field(
        SubstituteConfig(), description="the transfer protocol's plain classifier, trained independently")))


# attacks.<FAMILY>: the settings the family's own file declares (workers/attacks/<file>.py: Settings).
FAMILY_SECTIONS: dict[str, type[Section]] = {family: _section(attack_class(family).Settings, f"{family}Settings")
                                             for family in FAMILIES}
PGDSettings = FAMILY_SECTIONS["PGD"]  # also the AT and TRADES training attack's settings


class _AttackSettings(Section):
    """Settings per attack family; ``_N`` and ``_T`` variants of a family share them."""

    # The fields: one per family of the registry, then ``target`` (below, create_model).

    @field_validator("target", mode="before", check_fields=False)
    @classmethod
    def _random_or_a_label(cls, v: Any) -> Any:
        if v == "random" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        raise ValueError(f"{v!r} is not allowed (allowed: random, or a class label 0, 1, ...)")

    def family_settings(self) -> dict[str, dict[str, Any]]:
        return {family: getattr(self, family).model_dump() for family in FAMILIES}

    def linf_eps(self, attack: str) -> float | None:
        """ε of an L∞ attack; None for CW (L2) and JSMA (L0)."""
        family, _ = parse_attack_name(attack)
        return getattr(getattr(self, family), "eps", None)


# One field per family of the registry (workers/attacks), typed by the family's own settings.
AttackSettings = create_model("AttackSettings", __base__=_AttackSettings, __module__=__name__,
                              **{family: (section, section()) for family, section in FAMILY_SECTIONS.items()},
                              target=(str | int, Field(
                                  "random", description="targets of _T attacks: random (a seeded label ≠ y, stored) "
                                                        "or one label for every sample (the authors' code: 0)")))


def _check_attack_names(names: list[str]) -> list[str]:
    for name in names:
        parse_attack_name(name)  # raises "unknown attack 'X' (allowed: ...)"
    if len(set(names)) != len(names):
        raise ValueError(f"attack names repeat: {names}")
    return names


class RefreshConfig(Section):
    """How the rows trained on a refreshed pool (MID-R, ATTA: workers/defenses) refresh it
    (docs/design.md §4.1). Read only when eval.defenses has such a row."""

    # The defaults are the recipe measured best on MNIST fast and digits (docs/results.md §1.4, §1.7).
    every: NonNegativeInt = Field(
        0, description="epochs per round: a pool is at most this many epochs stale; 0 (default): staleness zero, "
                       "each batch's views continued against the live model just before its step (rounds of 1 "
                       "epoch)")
    steps: PositiveInt = Field(2, description="attack steps per refresh, continuing the stored perturbation")
    step_size: PositiveFloat | None = Field(None, description="L∞ step of a refresh; default: each attack's ε / 4")
    attacks: list[str] | None = Field(None, description="the pool attacks refreshed (L∞ ones); default: every "
                                                        "L∞ attack of pool.attacks; the others stay pool 0")
    reset_every: PositiveInt | None = Field(
        None, description="every this many rounds, regenerate the refreshed attacks from a fresh random start "
                          "against the current model, with their full settings (none: never)")
    start: Literal["pool", "random"] = Field(
        "random", description="version 0 of each refreshed attack: the stored training pool (pool), or a uniform "
                            "random point of its ε-ball made without attack steps, as published ATTA starts "
                            "(random: the rows then pay no attack steps before their first round)")
    epochs: PositiveInt | None = Field(
        None, description="the refreshed rows' epochs (none: mid.epochs for MID-R, models.at.epochs for ATTA); "
                          "a moving pool is not overfitted as MID overfits a fixed one, so it may train longer")
    eps_warmup_epochs: NonNegativeInt | None = Field(
        None, description="at staleness zero, continue the views inside a ball ramped from ε/W to ε over the "
                          "first W epochs, as AT ramps its attack (none: models.at.eps_warmup_epochs, for both rows)")

    success_samples: PositiveInt | None = Field(
        None, description="at staleness zero, measure each carried version's success against its round's model on "
                          "a seeded sample of this many training samples (none: every sample): a statistic for "
                          "the record, whose forward passes count in the rows' attack MACs; the views are the same")

    overlap: bool = Field(
        False, description="make pool version r+1 against round r-1's model while round r trains (one round "
                           "staler, the pool actors working beside the Train workers) instead of after it")

    @model_validator(mode="after")
    def _overlap_between_rounds(self):
        if self.overlap and self.every == 0:
            raise ValueError("pool.refresh.overlap: at staleness zero (every: 0) the views are continued in the "
                             "training step itself, so there is no refresh to overlap; set every ≥ 1")
        return self

    @model_validator(mode="after")
    def _warmup_at_staleness_zero(self):
        if self.eps_warmup_epochs and self.every != 0:
            raise ValueError(f"pool.refresh.eps_warmup_epochs: a warm-up ramps the ball of the views continued in "
                             f"the step, at staleness zero only (pool.refresh.every: 0, not {self.every})")
        return self


class PoolConfig(Section):
    attacks: list[str] = ["PGD_N", "PGD_T", "MIM_N", "MIM_T"]
    source_model: Literal["baseline", "teacher"] = "baseline"
    shard_size: PositiveInt = 256
    batch_size: PositiveInt = 256
    variants: PositiveInt = Field(1, description="random-start variants per sample; epoch e reads e mod K")
    encoding: Literal["int8_delta", "uint8"] = Field(
        "int8_delta", description="int8 deltas against the clean image (1/255 units), or uint8 images")
    delta_step: PositiveInt = Field(
        1, le=16, description="store deltas on a grid of this many grey levels (1 = exact uint8 rounding)")
    compressor: Literal["zstd", "lzma", "blosc", "none"] = "zstd"
    num_actors: PositiveInt = 2
    bf16: bool = Field(False, description="run the attacks under bfloat16 autocast (fast on GPUs; the stored "
                                          "success rate is still measured in float32 and reported)")
    refresh: RefreshConfig = Field(RefreshConfig(), description="the refreshed pool of the MID-R and ATTA rows")

    @field_validator("attacks")
    @classmethod
    def _known_attacks(cls, v: list[str]) -> list[str]:
        _check_attack_names(v)
        if not v:
            raise ValueError("empty: the pool needs at least one attack")
        return v


class LossWeightsConfig(Section):
    ac: float = Field(LossWeights.ac, ge=0.0)
    cc: float = Field(LossWeights.cc, ge=0.0)
    lc: float = Field(LossWeights.lc, ge=0.0)
    rc: float = Field(LossWeights.rc, ge=0.0, description="TRADES' robustness term KL(clean prediction || view's "
                      "prediction), not the paper's: an option for MID on a refreshed pool (docs/design.md §4.1)")


# MID's step defaults live with the step (workers/mid.py); the config shows and validates them.
_STEP = MetaSettings()


class MIDConfig(Section):
    epochs: PositiveInt = 30
    batch_size: PositiveInt = 64
    lr: PositiveFloat = Field(1e-3, description="outer learning rate γ (Adam)")
    inner_lr: PositiveFloat = Field(_STEP.inner_lr, description="inner step size α of the fast weights")
    beta: float = Field(_STEP.beta, ge=0.0, description="weight of the meta-test loss")
    temperature: PositiveFloat = _STEP.temperature
    second_order: bool = _STEP.second_order
    batch_views: bool | Literal["auto"] = Field(
        "auto", description="meta-train views in one forward pass; auto: on GPU yes, on CPU no (faster there)")
    init_student: Literal["teacher", "random"] = "teacher"
    meta_train_weights: LossWeightsConfig = LossWeightsConfig(**asdict(_STEP.meta_train))
    meta_test_weights: LossWeightsConfig = LossWeightsConfig(**asdict(_STEP.meta_test))
    num_workers: PositiveInt = 2
    bf16: bool = Field(False, description="autocast forward passes to bfloat16 (GPU workers, ray.use_gpu)")
    meta: bool = Field(_STEP.meta, description="false: the ablation without meta-learning (Table 8): every pool attack "
                                         "is a training view each step; no held-out attack, no inner step")
    distill: bool = Field(_STEP.distill, description="false: the ablation without distillation (Table 8): no teacher-feature "
                                            "targets (AC and CC off in both phases); the student starts from random "
                                            "weights (mid.init_student: random) and learns through C_t from labels")
    classifier: Literal["teacher", "trainable"] = Field(
        "teacher", description="the classifier of the label term: the teacher's, frozen (the paper), or a copy of "
                               "it trained with the student, so the defended model is C_s ∘ E_s (docs/design.md §4.1)")

    def step(self, on_gpu: bool) -> MetaSettings:
        """The meta step a worker takes (``workers.mid``); ``batch_views: auto`` resolved for
        the workers' device."""
        return MetaSettings(inner_lr=self.inner_lr, beta=self.beta, temperature=self.temperature,
                            second_order=self.second_order,
                            batch_views=on_gpu if self.batch_views == "auto" else self.batch_views,
                            meta_train=LossWeights(**self.meta_train_weights.model_dump()),
                            meta_test=LossWeights(**self.meta_test_weights.model_dump()),
                            meta=self.meta, distill=self.distill,
                            trainable_classifier=self.classifier == "trainable")

    @model_validator(mode="after")
    def _nothing_distilled_without_distillation(self):
        if not self.distill and self.init_student == "teacher":
            raise ValueError("mid.distill: false trains a student that inherits nothing from the teacher's "
                             "encoder; set mid.init_student: random")
        return self


PROTOCOLS = ("source", "transfer", "adaptive")


class EvalConfig(Section):
    defenses: list[Literal[tuple(DEFENSES)]] = Field(
        ["None", "AT", "MID"], description="rows of the table, in order (workers/defenses: the registry)")
    known: list[str] = ["PGD_N", "PGD_T", "MIM_N", "MIM_T"]
    unknown: list[str] = ["FGSM_N", "FGSM_T", "BIM_N", "BIM_T", "CW_N", "CW_T", "AA_N", "JSMA_T"]
    protocols: list[Literal["source", "transfer", "adaptive"]] = Field(
        list(PROTOCOLS), description="source: attacks crafted once against eval.source_model (the paper's Table 2); "
                                     "transfer: against models.substitute (Table 3); adaptive: against each defense")
    source_model: Literal["pool", "baseline", "teacher"] = Field(
        "pool", description="the source protocol's model; pool: the one the training pool was generated against")
    adaptive_attacks: list[str] | None = Field(
        None, description="attacks of the adaptive table (default: all); the others show as not run")
    subset: dict[str, PositiveInt] = Field(
        {}, description="attack -> samples of a seeded subset of the test split it runs on (for slow attacks); "
                        "an attack not in the table is ignored, so a config can keep its subsets when --set "
                        "narrows the table")
    batch_size: PositiveInt = 256
    num_actors: PositiveInt = 2

    @field_validator("protocols")
    @classmethod
    def _some_protocols(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"needs at least one protocol and no repeats, got {v}")
        return v

    @field_validator("subset")
    @classmethod
    def _subset_attacks_exist(cls, v: dict[str, int]) -> dict[str, int]:
        _check_attack_names(list(v))
        return v

    @field_validator("adaptive_attacks")
    @classmethod
    def _attacks_of_the_table(cls, v, info: ValidationInfo):
        table = [*info.data.get("known", []), *info.data.get("unknown", [])]
        for name in v or []:
            if name not in table:
                raise ValueError(f"{name!r} is not an attack of the table (eval.known + eval.unknown: "
                                 f"{', '.join(table)})")
        return v

    @field_validator("defenses")
    @classmethod
    def _unique_defenses(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"needs at least one defense and no repeats, got {v}")
        return v

    @field_validator("known", "unknown")
    @classmethod
    def _known_attacks(cls, v: list[str]) -> list[str]:
        return _check_attack_names(v)

    @property
    def attacks(self) -> list[str]:
        return [*self.known, *self.unknown]


class StoreConfig(Section):
    url: str = Field("store", description="local folder or fsspec URL (file://, s3://, gs://)")

    @field_validator("url")
    @classmethod
    def _usable_location(cls, v: str) -> str:
        try:
            check_url(v)
        except StoreError as e:
            raise ValueError(str(e).removeprefix("store: ")) from None
        return v


class RayConfig(Section):
    address: str | None = Field(None, description="an existing cluster ('auto'); none starts a local one")
    num_cpus: PositiveInt | None = None
    cpus_per_worker: PositiveFloat = Field(0.5, description="CPUs per Ray Train worker (leave some for Ray Data)")
    cpus_per_actor: PositiveFloat = Field(1.0, description="CPUs per pool-generation or evaluation actor")
    use_gpu: bool = Field(False, description="one GPU per Ray Train worker (NCCL between them)")
    gpus_per_actor: float = Field(0.0, ge=0.0, description="GPUs per pool-generation or evaluation actor; fractions "
                                                           "share one GPU between actors (e.g. 0.25: four per GPU)")
    max_failures: int = Field(2, ge=-1, description="restarts of a training run from its last epoch "
                                                     "checkpoint after a worker or node dies (-1: no limit)")
    checkpoint_interval_s: float = Field(
        60.0, ge=0.0, description="seconds between a training stage's epoch checkpoints, the points a restarted "
                                  "or rerun stage resumes from (checked at each epoch's end; 0: every epoch)")


class PlanConfig(Section):
    """The dataset's size for ``mid plan`` where it cannot be read (an image folder, or data
    that is not at hand): the plan multiplies per-sample costs by these counts."""

    train_samples: PositiveInt | None = Field(None, description="images in the train split (before data.train_limit)")
    test_samples: PositiveInt | None = Field(None, description="images in the test split (before data.test_limit)")
    num_classes: PositiveInt | None = None
    channels: PositiveInt = Field(3, description="colour channels of the images")


# A pool shard is one Zarr chunk per attack, written and held in memory whole by its actor.
MAX_SHARD_BYTES = 1 << 30
# One batch of float32 inputs; the activations and gradients of a step are many times that.
MAX_BATCH_BYTES = 4 << 30


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} bytes"


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class RunConfig(Section):
    name: str = Field("run", description="names the run's ref in the store and its folder under runs/")
    seed: int = Field(0, ge=0)
    data: DataConfig = DataConfig()
    models: ModelsConfig = ModelsConfig()
    attacks: AttackSettings = AttackSettings()
    pool: PoolConfig = PoolConfig()
    mid: MIDConfig = MIDConfig()
    eval: EvalConfig = EvalConfig()
    store: StoreConfig = StoreConfig()
    ray: RayConfig = RayConfig()
    plan: PlanConfig = Field(PlanConfig(), description="dataset sizes for `mid plan` (image folders)")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not SAFE_NAME.fullmatch(v) or ".." in v:
            raise ValueError(f"{v!r} is not a safe name: up to 64 letters, digits, '.', '_' or '-', starting "
                             f"with a letter or digit (it names files in the store and the folder runs/<name>)")
        return v

    @model_validator(mode="after")
    def _encoding_holds_eps(self):
        if self.pool.encoding == "int8_delta":
            for attack in self.pool.attacks:
                family, _ = parse_attack_name(attack)
                eps = self.attacks.linf_eps(attack)  # CW and JSMA pools are always stored as uint8 images
                if eps is not None and eps > INT8_MAX_EPS * self.pool.delta_step:
                    raise ValueError(f"pool.encoding: int8_delta holds deltas up to 127/255, but "
                                     f"attacks.{family}.eps is {eps}; use pool.encoding: uint8")
        return self

    @model_validator(mode="after")
    def _an_attack_to_hold_out(self):
        # Only MID's meta step holds one out; ATTA alone may train on a pool of one attack.
        held_out = [row for row in self.eval.defenses if defense_class(row).reads_teacher_classifier]
        if self.mid.meta and held_out and len(self.pool.attacks) < 2:
            raise ValueError(f"pool.attacks: {' and '.join(held_out)} {'holds' if len(held_out) == 1 else 'hold'} one "
                             f"attack out per step (mid.meta): the "
                             f"pool needs at least 2 attacks, not {len(self.pool.attacks)}")
        return self

    @model_validator(mode="after")
    def _refreshed_attacks_valid(self):
        chosen = self.pool.refresh.attacks
        if chosen is None:
            return self
        _check_attack_names(chosen)
        for attack in chosen:
            if attack not in self.pool.attacks:
                raise ValueError(f"pool.refresh.attacks: {attack} is not a pool attack "
                                 f"(allowed: {', '.join(self.pool.attacks)})")
            if self.attacks.linf_eps(attack) is None:
                raise ValueError(f"pool.refresh.attacks: {attack} is not an L∞ attack; a refresh continues the "
                                 f"stored perturbation with L∞ steps (allowed: "
                                 f"{', '.join(a for a in self.pool.attacks if self.attacks.linf_eps(a) is not None)})")
        if not chosen:
            raise ValueError("pool.refresh.attacks: empty; leave it out to refresh every L∞ pool attack")
        return self

    @model_validator(mode="after")
    def _training_attacks_valid(self):
        for kind in self.adversarial_kinds():
            try:
                self.training_attack(kind)
            except ValidationError as e:
                first = e.errors()[0]
                loc, message = ["models", kind, "attack", *(str(p) for p in first["loc"])], first["msg"]
                if first["type"] == "extra_forbidden":
                    loc, message = loc[:-1], unknown_key(PGDSettings, loc[-1])
                raise ValueError(f"{'.'.join(loc)}: {message.removeprefix('Value error, ')}") from None
        return self

    @model_validator(mode="after")
    def _no_decoder_no_cyclic_consistency(self):
        arch = self.models.arch
        if has_decoder(arch):
            return self
        for where, value in (("mid.meta_train_weights.cc", self.mid.meta_train_weights.cc),
                             ("mid.meta_test_weights.cc", self.mid.meta_test_weights.cc),
                             ("models.teacher.lambda_rec", self.models.teacher.lambda_rec)):
            if value != 0:
                raise ValueError(f"{where}: {value}, but {arch} has no decoder, so there is no reconstruction or "
                                 f"cyclic-consistency term; set it to 0")
        return self

    @model_validator(mode="after")
    def _substitute_is_independent(self):
        if "transfer" in self.eval.protocols and self.models.substitute.seed == self.seed:
            raise ValueError(f"models.substitute.seed: {self.seed} is the run's seed; the transfer protocol's "
                             f"substitute must be trained independently of the baseline (another seed)")
        return self

    def image_shape(self) -> tuple[int, int]:
        """(channels, side) of the images the stages see: the source's, resized to data.image_size."""
        source = READERS[self.data.source]
        return source.channels, self.data.image_size or source.side

    @model_validator(mode="after")
    def _sizes_fit_in_memory(self):
        # Without these a typo such as shard_size: 1e9 passes and dies in a Ray worker that
        # asks for hundreds of GiB.
        channels, side = self.image_shape()
        arch, pixels = self.models.arch, channels * side * side
        bound = ARCHITECTURES[arch].max_side
        if side > bound:
            raise ValueError(f"data.image_size: {side} is above the {bound} pixels {arch} is run at (one "
                             f"{channels}x{side}x{side} image is {_size(pixels * 4)} as float32); use at most {bound}")
        shard = self.pool.shard_size * pixels
        if shard > MAX_SHARD_BYTES:
            raise ValueError(f"pool.shard_size: {self.pool.shard_size:,} samples x {pixels:,} bytes "
                             f"({channels}x{side}x{side} uint8) = {_size(shard)} per shard, above the "
                             f"{_size(MAX_SHARD_BYTES)} a shard may take (an actor holds it whole); use at most "
                             f"{MAX_SHARD_BYTES // pixels:,}")
        batches = {**{f"models.{kind}.batch_size": getattr(self.models, kind).batch_size
                      for kind in self.classifier_kinds()},
                   **{f"models.{defense_class(row).section()}.batch_size":
                      getattr(self.models, defense_class(row).section()).batch_size
                      for row in refreshed_rows() if getattr(self.models, defense_class(row).section()).batch_size},
                   "mid.batch_size": self.mid.batch_size, "pool.batch_size": self.pool.batch_size,
                   "eval.batch_size": self.eval.batch_size, "attacks.AA.batch_size": self.attacks.AA.batch_size}
        for field, batch in batches.items():
            if batch * pixels * 4 > MAX_BATCH_BYTES:
                raise ValueError(f"{field}: {batch:,} samples x {pixels * 4:,} bytes ({channels}x{side}x{side} "
                                 f"float32) = {_size(batch * pixels * 4)} per batch, above the "
                                 f"{_size(MAX_BATCH_BYTES)} a batch may take; use at most "
                                 f"{MAX_BATCH_BYTES // (pixels * 4):,}")
        return self

    @staticmethod
    def classifier_kinds() -> list[str]:
        """Every classifier the config has a section for (``models.<kind>``)."""
        rows = [defense_class(row).kind for row in classifier_rows()]
        return ["baseline", "teacher", *[kind for kind in rows if kind != "baseline"], "substitute"]

    @staticmethod
    def adversarial_kinds() -> list[str]:
        """The classifiers trained against an online attack (their sections have ``attack``)."""
        return [defense_class(row).kind for row in classifier_rows() if defense_class(row).attacks_online()]

    def training_attack(self, kind: str) -> PGDSettings:
        """The PGD settings of ``models.<kind>``: attacks.PGD with that section's overrides."""
        overrides = getattr(self.models, kind).attack
        return PGDSettings.model_validate({**self.attacks.PGD.model_dump(), **overrides})
