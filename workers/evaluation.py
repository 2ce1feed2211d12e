"""Evaluation actors: accuracy of each defense on clean test images, on stored test attacks
(the source and transfer protocols: images crafted once against a fixed model), and under
attacks crafted against the defense itself (the adaptive protocol)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from storage.datasets import DatasetReader
from storage.pools import PoolReader
from workers.attacks import make_attack, make_targets, seed_attack_randomness
from workers.device import actor_device
from workers.loading import load_classifier, load_defended
from workers.models import to_float


def batch_seed(seed: int, attack: str, start: int) -> int:
    return int(hashlib.sha256(f"{seed}:{attack}:{start}".encode()).hexdigest()[:15], 16)


class Evaluator:
    """Holds every defense's model; scores one batch per call."""

    def __init__(self, root: str, dataset_key: str, defenses: dict[str, dict[str, str]],
                 family_settings: dict[str, dict[str, Any]], num_classes: int, seed: int,
                 target: str | int = "random", threads: int = 1):
        torch.set_num_threads(threads)
        self.root = root
        self.dataset = DatasetReader.open(root, dataset_key)
        self.device = actor_device()
        self.models = {}
        for name, spec in defenses.items():
            if spec["kind"] == "classifier":
                model = load_classifier(root, spec["key"])
            else:
                model = load_defended(root, spec["student_key"], spec["teacher_key"])
            self.models[name] = model.to(self.device).requires_grad_(False)
        self.family_settings = family_settings
        self.num_classes = num_classes
        self.seed = seed
        self.target = target
        self.pools: dict[str, PoolReader] = {}

    def _test_samples(self, start: int, stop: int, indices: list[int] | None):
        if indices is None:
            return self.dataset.load("test", start, stop)
        return self.dataset.load_indices("test", np.asarray(indices))

    def _correct(self, defense: str, x: torch.Tensor, labels: torch.Tensor) -> int:
        with torch.no_grad():
            return int((self.models[defense](x.to(self.device)).argmax(1).cpu() == labels.cpu()).sum())

    def benign(self, defense: str, start: int, stop: int) -> dict[str, Any]:
        images, labels = self.dataset.load("test", start, stop)
        return {"correct": self._correct(defense, to_float(torch.from_numpy(images)), torch.from_numpy(labels)),
                "total": len(labels)}

    def adaptive(self, defense: str, attack_name: str, start: int, stop: int,
                 indices: list[int] | None = None) -> dict[str, Any]:
        """Correct predictions under ``attack_name`` crafted against the defense itself, end to
        end, on test samples [start, stop) (or the subset's samples ``indices``)."""
        model = self.models[defense]
        images, labels_np = self._test_samples(start, stop, indices)
        x, labels = to_float(torch.from_numpy(images)), torch.from_numpy(labels_np)
        generator = torch.Generator().manual_seed(batch_seed(self.seed, attack_name + "/targets", start))
        targets = make_targets(labels, self.num_classes, generator, self.target)
        seed_attack_randomness(batch_seed(self.seed, attack_name, start))
        x = make_attack(attack_name, self.family_settings).perturb(model, x.to(self.device), labels.to(self.device),
                                                                   targets.to(self.device))
        return {"correct": self._correct(defense, x, labels), "total": len(labels_np)}

    def stored(self, defense: str, pool_key: str, start: int, stop: int) -> dict[str, Any]:
        """Correct predictions on the stored test attack ``pool_key``, samples [start, stop)."""
        reader = self.pools.get(pool_key) or self.pools.setdefault(pool_key, PoolReader.open(self.root, pool_key))
        indices = reader.sample_indices(start, stop)
        clean, labels_np = self.dataset.load_indices(reader.attrs["split"], indices)
        adv = reader.adv(0, start, stop, clean_u8=clean)
        return {"correct": self._correct(defense, to_float(torch.from_numpy(adv)), torch.from_numpy(labels_np)),
                "total": len(labels_np)}
