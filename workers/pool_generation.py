"""The pool-generation actor: attacks a fixed model (the training pool's source, or the
source / substitute of the stored test attacks) one shard at a time and writes each shard
to the pool store, where it is checked and committed. It also refreshes a pool: continues
its stored perturbations against a newer model (``refresh``, docs/design.md §4.1)."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np
import torch

from storage.checkpoints import read_carried
from storage.datasets import DatasetReader
from storage.pools import PoolReader, quantize, write_shard
from workers.attacks import make_attack, make_targets, seed_attack_randomness
from workers.device import actor_device, bf16_autocast
from workers.loading import load_source_model
from workers.models import to_float


def shard_seed(seed: int, attack: str, shard: int, variant: int) -> int:
    """A seed per (attack, shard, variant): a shard's content never depends on which
    worker made it or in what order, so resumed pools equal uninterrupted ones."""
    digest = hashlib.sha256(f"{seed}:{attack}:{shard}:{variant}".encode()).hexdigest()
    return int(digest[:15], 16)


def success(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
            targeted: bool) -> int:
    with torch.no_grad():
        pred = model(x).argmax(1)
    return int((pred == targets).sum() if targeted else (pred != labels).sum())


class PoolGenerator:
    def __init__(self, root: str, dataset_key: str, source_kind: str, source_key: str,
                 num_classes: int, threads: int = 1, bf16: bool = False, device: torch.device | None = None):
        torch.set_num_threads(threads)
        self.root = root
        self.dataset = DatasetReader.open(root, dataset_key)
        # A pool actor computes where Ray put it; the GPU check compares both on one machine.
        self.device = device or actor_device()
        self.model = load_source_model(root, source_kind, source_key).to(self.device)
        self.model.requires_grad_(False)
        self.num_classes = num_classes
        self.bf16 = bf16  # attacks run under bf16 autocast; success is always measured in float32
        self._carried, self._carried_key = None, None  # a round's carried views (``carry``)

    def load_source(self, source_kind: str, source_key: str) -> None:
        """Attack another model from now on (a refreshed row's newest round)."""
        self.model = load_source_model(self.root, source_kind, source_key).to(self.device)
        self.model.requires_grad_(False)

    def generate(self, pool_key: str, attack_name: str, split: str, variants: int, shard: int, start: int,
                 stop: int, *, family_settings: dict[str, dict[str, Any]], batch_size: int, seed: int,
                 delta_step: int = 1, indices: list[int] | None = None,
                 target: str | int = "random", random_start: bool = False) -> dict[str, Any]:
        """Shard ``shard``: the pool's samples [start, stop), which are the split's samples
        ``indices`` when the pool holds a subset of it. ``random_start``: a uniform random
        point of the attack's ε-ball instead of the attack (a refreshed row's version 0)."""
        started = time.perf_counter()
        attack = make_attack(attack_name, family_settings)
        if indices is None:
            clean_u8, labels_np = self.dataset.load(split, start, stop)
        else:
            clean_u8, labels_np = self.dataset.load_indices(split, np.asarray(indices))
        clean = to_float(torch.from_numpy(clean_u8)).to(self.device)
        labels = torch.from_numpy(labels_np).to(self.device)
        adv_u8 = np.empty((variants, *clean_u8.shape), dtype=np.uint8)
        targets_all = np.full((variants, len(labels_np)), -1, dtype=np.int64)
        hits_float = hits_stored = 0
        for variant in range(variants):
            seed_attack_randomness(shard_seed(seed, attack_name, shard, variant))
            generator = torch.Generator().manual_seed(shard_seed(seed, attack_name + "/targets", shard, variant))
            targets = make_targets(labels.cpu(), self.num_classes, generator, target).to(self.device)
            for lo in range(0, len(labels), batch_size):
                hi = min(lo + batch_size, len(labels))
                with bf16_autocast(self.bf16, self.device):
                    adv = (uniform_start(clean[lo:hi], attack.eps) if random_start else
                           attack.perturb(self.model, clean[lo:hi], labels[lo:hi], targets[lo:hi]).float())
                stored = quantize(adv.cpu().numpy(), clean_u8[lo:hi], attack.eps, delta_step)
                adv_u8[variant, lo:hi] = stored
                hits_stored += success(self.model, to_float(torch.from_numpy(stored)).to(self.device), labels[lo:hi],
                                       targets[lo:hi], attack.targeted)
                if not random_start:  # a random start's float views are never kept: measured once, stored
                    hits_float += success(self.model, adv, labels[lo:hi], targets[lo:hi], attack.targeted)
            if attack.targeted:
                targets_all[variant] = targets.cpu().numpy()
        total = variants * len(labels_np)
        hits_float = hits_stored if random_start else hits_float
        stats = {"success_rate_float": hits_float / total, "success_rate_stored": hits_stored / total,
                 "seconds": time.perf_counter() - started}
        return write_shard(self.root, pool_key, shard=shard, start=start, stop=stop, eps=attack.eps,
                           adv_u8=adv_u8, clean_u8=clean_u8, targets=targets_all, stats=stats)

    def refresh(self, pool_key: str, previous_key: str, attack_name: str, shard: int, start: int, stop: int, *,
                family_settings: dict[str, dict[str, Any]], steps: int, step_size: float, batch_size: int,
                delta_step: int = 1) -> dict[str, Any]:
        """Shard ``shard`` of a refreshed pool: variant 0 of pool ``previous_key`` (its images
        and targets) continued by ``steps`` steps against this actor's model
        (``continue_attack``). Deterministic: no random start."""
        started = time.perf_counter()
        attack = make_attack(attack_name, family_settings)
        previous = PoolReader.open(self.root, previous_key)
        clean_u8, labels_np = self.dataset.load("train", start, stop)
        start_u8 = previous.adv(0, start, stop, clean_u8=clean_u8)
        targets_np = np.asarray(previous.group["target"][0, start:stop], dtype=np.int64)
        clean = to_float(torch.from_numpy(clean_u8)).to(self.device)
        carried = to_float(torch.from_numpy(start_u8)).to(self.device)
        labels = torch.from_numpy(labels_np).to(self.device)
        targets = torch.from_numpy(targets_np).to(self.device)
        goal = targets if attack.targeted else labels
        adv_u8 = np.empty((1, *clean_u8.shape), dtype=np.uint8)
        hits_float = hits_stored = 0
        for lo in range(0, len(labels), batch_size):
            hi = min(lo + batch_size, len(labels))
            with bf16_autocast(self.bf16, self.device):
                adv = continue_attack(self.model, clean[lo:hi], carried[lo:hi], goal[lo:hi], attack.eps, step_size,
                                      steps, attack.targeted)
            stored = quantize(adv.cpu().numpy(), clean_u8[lo:hi], attack.eps, delta_step)
            adv_u8[0, lo:hi] = stored
            hits_float += success(self.model, adv, labels[lo:hi], targets[lo:hi], attack.targeted)
            hits_stored += success(self.model, to_float(torch.from_numpy(stored)).to(self.device), labels[lo:hi],
                                   targets[lo:hi], attack.targeted)
        stats = {"success_rate_float": hits_float / len(labels_np), "success_rate_stored": hits_stored / len(labels_np),
                 "seconds": time.perf_counter() - started}
        return write_shard(self.root, pool_key, shard=shard, start=start, stop=stop, eps=attack.eps,
                           adv_u8=adv_u8, clean_u8=clean_u8, targets=targets_np[None], stats=stats)


    def carry(self, pool_key: str, previous_key: str, checkpoint_key: str, attack_name: str, shard: int, start: int,
              stop: int, *, family_settings: dict[str, dict[str, Any]], batch_size: int,
              measured: list[int] | None = None) -> dict[str, Any]:
        """Shard ``shard`` of a pool refreshed at staleness zero: the views the training
        workers carried through round ``checkpoint_key`` (``workers/refresh_in_step.py``),
        and, for a sample no worker trained on (the split's remainder across workers),
        pool ``previous_key``'s view as it was. Its success is measured against this actor's
        model, the round's, on the samples ``measured`` of the shard (None: all of them)."""
        started = time.perf_counter()
        attack = make_attack(attack_name, family_settings)
        previous = PoolReader.open(self.root, previous_key)
        clean_u8, labels_np = self.dataset.load("train", start, stop)
        adv_u8 = previous.adv(0, start, stop, clean_u8=clean_u8)[None].copy()
        targets_np = np.asarray(previous.group["target"][0, start:stop], dtype=np.int64)
        if self._carried_key != checkpoint_key:  # one read of the round's carried views per actor
            self._carried, self._carried_key = read_carried(self.root, checkpoint_key), checkpoint_key
        index = self._carried["index"]
        inside = (index >= start) & (index < stop)
        adv_u8[0, index[inside] - start] = self._carried[attack_name][inside]
        rows = np.arange(len(labels_np)) if measured is None else np.asarray(measured, dtype=np.int64) - start
        labels = torch.from_numpy(labels_np[rows]).to(self.device)
        targets = torch.from_numpy(targets_np[rows]).to(self.device)
        views = adv_u8[0, rows]
        hits = 0
        for lo in range(0, len(labels), batch_size):
            hi = min(lo + batch_size, len(labels))
            hits += success(self.model, to_float(torch.from_numpy(views[lo:hi])).to(self.device), labels[lo:hi],
                            targets[lo:hi], attack.targeted)
        rate = hits / max(len(rows), 1)
        stats = {"success_rate_float": rate, "success_rate_stored": rate, "carried_samples": int(inside.sum()),
                 "seconds": time.perf_counter() - started,
                 **({"measured_samples": len(rows)} if measured is not None else {})}
        return write_shard(self.root, pool_key, shard=shard, start=start, stop=stop, eps=attack.eps,
                           adv_u8=adv_u8, clean_u8=clean_u8, targets=targets_np[None], stats=stats)


def uniform_start(clean: torch.Tensor, eps: float) -> torch.Tensor:
    """A uniform random point of the L∞ ε-ball around ``clean``, clipped to [0, 1]: the random
    start of PGD, without its steps (torch's generator, seeded per shard and variant)."""
    noise = torch.rand(clean.shape).to(clean.device) * 2 - 1
    return (clean + eps * noise).clamp(0.0, 1.0)


def continue_attack(model: torch.nn.Module, clean: torch.Tensor, start: torch.Tensor, goal: torch.Tensor,
                    eps: float, step_size: float, steps: int, targeted: bool) -> torch.Tensor:
    """``start`` (adversarial images of ``clean``) moved by ``steps`` signed-gradient steps of
    ``step_size`` on the cross-entropy towards ``goal`` (away from the label, or towards the
    target if ``targeted``), each projected onto the L∞ ε-ball around ``clean`` and [0, 1].

    advertorch's ``perturb_iterative`` takes the starting perturbation (``delta_init``) that
    its attack classes do not. Momentum (MIM) is not carried: every attack continues as PGD
    steps on its own loss.
    """
    import workers.advertorch_compat  # noqa: F401  (before advertorch, as workers.attacks does)
    from advertorch.attacks.iterative_projected_gradient import perturb_iterative

    return perturb_iterative(clean, goal, model, nb_iter=steps, eps=eps, eps_iter=step_size,
                             loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"),
                             delta_init=(start - clean).clone(), minimize=targeted).detach().float()
