"""Build the models of a run from the checkpoint store."""

from __future__ import annotations

import copy

import torch
from torch import nn

from storage.checkpoints import load_checkpoint, read_manifest
from workers.defenses import is_student_checkpoint
from workers.models import (Autoencoding, EncoderClassifier, ModelSpec, build_classifier_model,
                            build_encoder, build_teacher)


def _spec(manifest: dict) -> ModelSpec:
    return ModelSpec(**manifest["spec"])


def load_classifier(root: str, key: str) -> EncoderClassifier:
    state, manifest = load_checkpoint(root, key)
    model = build_classifier_model(_spec(manifest))
    model.load_state_dict(state)
    return model.eval()


def load_teacher(root: str, key: str) -> Autoencoding:
    state, manifest = load_checkpoint(root, key)
    model = build_teacher(_spec(manifest))
    model.load_state_dict(state)
    return model.eval()


def load_defended(root: str, student_key: str, teacher_key: str) -> EncoderClassifier:
    """MID's final model C_t ∘ E_s: the teacher's classifier reading the student's features
    (or, trained with ``mid.classifier: trainable``, the student's own classifier: C_s ∘ E_s)."""
    teacher = load_teacher(root, teacher_key)
    state, manifest = load_checkpoint(root, student_key)
    if manifest.get("classifier") == "trainable":
        model = EncoderClassifier(build_encoder(_spec(manifest)), copy.deepcopy(teacher.classifier))
        model.load_state_dict(state)
        return model.eval()
    student = build_encoder(_spec(manifest))
    student.load_state_dict(state)
    return EncoderClassifier(student, teacher.classifier).eval()


def load_source_model(root: str, kind: str, key: str) -> nn.Module:
    """The model a pool is generated against: the teacher's C ∘ E, a classifier (the
    baseline, the transfer protocol's substitute, an ATTA round's), or a MID-R round's
    C_t ∘ E_s (a refreshed pool)."""
    if kind == "teacher":
        teacher = load_teacher(root, key)
        return EncoderClassifier(teacher.encoder, teacher.classifier).eval()
    manifest = read_manifest(root, key) or {}
    if is_student_checkpoint(manifest):
        return load_defended(root, key, manifest["teacher_key"])
    return load_classifier(root, key)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel, for a state dict with plain names."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
