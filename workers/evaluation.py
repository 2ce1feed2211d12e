"""White-box evaluation: every attack runs against each defended model itself."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from storage.datasets import DatasetReader
from workers.attacks import make_attack, random_targets
from workers.loading import load_classifier, load_defended
from workers.models import to_float


def batch_seed(seed: int, attack: str, start: int) -> int:
    return int(hashlib.sha256(f"{seed}:{attack}:{start}".encode()).hexdigest()[:15], 16)


class Evaluator:
    """Holds the test split and every defense's model; evaluates one batch per call."""

    def __init__(self, root: str, dataset_key: str, defenses: dict[str, dict[str, str]],
                 family_settings: dict[str, dict[str, Any]], num_classes: int, seed: int, threads: int = 1):
        torch.set_num_threads(threads)
        self.dataset = DatasetReader.open(root, dataset_key)
        self.models = {}
        for name, spec in defenses.items():
            if spec["kind"] == "classifier":
                model = load_classifier(root, spec["key"])
            else:
                model = load_defended(root, spec["student_key"], spec["teacher_key"])
            self.models[name] = model.requires_grad_(False)
        self.family_settings = family_settings
        self.num_classes = num_classes
        self.seed = seed

    def evaluate(self, defense: str, attack_name: str | None, start: int, stop: int) -> dict[str, Any]:
        """Correct predictions on test samples [start, stop), clean or under one attack."""
        model = self.models[defense]
        images, labels_np = self.dataset.load("test", start, stop)
        x, labels = to_float(torch.from_numpy(images)), torch.from_numpy(labels_np)
        if attack_name is not None:
            generator = torch.Generator().manual_seed(batch_seed(self.seed, attack_name + "/targets", start))
            targets = random_targets(labels, self.num_classes, generator)
            torch.manual_seed(batch_seed(self.seed, attack_name, start))
            x = make_attack(attack_name, self.family_settings).perturb(model, x, labels, targets)
        with torch.no_grad():
            correct = int((model(x).argmax(1) == labels).sum())
        return {"defense": defense, "attack": attack_name, "correct": correct, "total": len(labels_np)}
