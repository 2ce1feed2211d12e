"""The jobs the training stages hand to their Ray Train workers (workers/jobs.py): built
from the config by the stages' own functions, on a real store with the digits dataset."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest

from pipeline.config_loader import load_config
from pipeline.context import RunContext
from pipeline.stages import ingest, mid, models
from workers.jobs import ClassifierJob, MIDJob
from workers.mid_settings import MetaSettings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def run(tmp_path):
    def open_run(*overrides: str):
        cfg = load_config(REPO / "configs/digits.yaml", list(overrides), store=str(tmp_path / "store"))
        ctx = RunContext(cfg, tmp_path / "out").open()
        return ctx, ingest.run(ctx)
    return open_run


def test_the_substitute_trains_from_a_seed_of_its_own(run):
    ctx, dataset = run()
    spec = models.model_spec(ctx, dataset)
    baseline, substitute = (models.model_job(ctx, dataset, spec, kind) for kind in ("baseline", "substitute"))
    assert baseline.seed == ctx.cfg.seed
    assert substitute.seed == ctx.cfg.models.substitute.seed != ctx.cfg.seed
    ctx.close("finished")


def test_a_classifier_job_ramps_its_training_attack_up_over_the_warm_up(run):
    ctx, dataset = run("models.at.eps_warmup_epochs=4", "models.at.attack={eps: 0.2, eps_iter: 0.04}",
                       "data.augment=crop")
    job = models.model_job(ctx, dataset, models.model_spec(ctx, dataset), "at")
    assert isinstance(job, ClassifierJob) and job.epochs == ctx.cfg.models.at.epochs
    assert [round(job.epoch_settings(e)["attack"]["eps"], 6) for e in range(6)] == [0.05, 0.1, 0.15, 0.2, 0.2, 0.2]
    assert job.epoch_settings(1)["attack"]["eps_iter"] == pytest.approx(0.02)
    assert job.augmentation.mode == "crop" and job.augmentation.crop_padding == ctx.cfg.data.crop_padding
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.seed = 7  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(job)) == job  # what Ray does to it on the way to the workers
    ctx.close("finished")


@pytest.mark.parametrize("use_gpu, batch_views", [(False, False), (True, True)])
def test_the_mid_job_takes_the_config_step_with_views_batched_on_gpu_only(run, use_gpu, batch_views):
    ctx, dataset = run(f"ray.use_gpu={str(use_gpu).lower()}", "mid.inner_lr=0.01", "mid.meta_test_weights.lc=2")
    job = mid.mid_job(ctx, dataset, {"key": "teacher-x"}, {"PGD_N": "pool-a", "FGSM_N": "pool-b"}, "mid-x")
    assert isinstance(job, MIDJob) and job.attacks == ("PGD_N", "FGSM_N") and job.teacher_key == "teacher-x"
    assert job.step == dataclasses.replace(MetaSettings(), inner_lr=0.01, batch_views=batch_views,
                                           meta_test=dataclasses.replace(MetaSettings().meta_test, lc=2.0))
    ctx.close("finished")
