"""The refreshed pool at staleness zero (``pool.refresh.every: 0``, docs/design.md §4.1):
each batch's stored views of the refreshed attacks are continued against the live model
just before its step (ATTA as published: the perturbation carried from the last epoch,
advanced a few steps), and the continued views replace the stored ones in the worker's
rows. At the round's end every worker writes its rows' carried views into the round's
checkpoint; the driver makes the next pool version of them.

The continued view is rounded and projected as a stored one is (``storage.pools.quantize``)
before the step trains on it, so a round retrained after a restart, or rebuilt from its
pool version, sees the same bits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from storage import checkpoints
from storage.pools import PoolReader, quantize
from workers.jobs import InStepRefresh
from workers.models import EncoderClassifier, to_float
from workers.pool_generation import continue_attack
from workers.reproducible import WorkerRows


class CarriedViews:
    """One worker's refreshed views during one round: continued batch by batch, written back
    into ``rows`` (so the next epoch of the round, if any, goes on from them)."""

    def __init__(self, settings: InStepRefresh, rows: WorkerRows, root: str, pools: dict[str, str],
                 first_row: int, last_row: int, eps_scale: float = 1.0):
        self.settings, self.rows, self.first_row, self.eps_scale = settings, rows, first_row, eps_scale
        # A targeted view keeps the target its pool stored (the targets of this worker's rows).
        self.targets = {a.name: torch.from_numpy(np.asarray(
                            PoolReader.open(root, pools[a.name]).group["target"][0, first_row:last_row],
                            dtype=np.int64))
                        for a in settings.attacks if a.targeted}

    def continue_batch(self, student: torch.nn.Module, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
        """Continue ``batch``'s refreshed views against ``model`` (the classifier the
        trained ``student`` is read by), in place in the batch and in the worker's rows."""
        clean_u8 = batch["clean"]
        clean = to_float(clean_u8)
        trainable = [p for p in student.parameters() if p.requires_grad]
        was_training = student.training
        student.eval().requires_grad_(False)  # input gradients only, like a pool actor's attack
        try:
            for attack in self.settings.attacks:
                goal = (self.targets[attack.name][batch["index"].cpu() - self.first_row].to(clean.device)
                        if attack.targeted else batch["label"])
                eps = attack.eps * self.eps_scale  # smaller in an ε warm-up epoch: the carried view is projected in
                adv = continue_attack(model, clean, to_float(batch[attack.name]), goal, eps,
                                      attack.step_size * self.eps_scale, self.settings.steps, attack.targeted)
                stored = torch.from_numpy(quantize(adv.cpu().numpy(), clean_u8.cpu().numpy(), eps,
                                                   self.settings.delta_step))
                batch[attack.name] = stored.to(clean_u8.device)
                self.rows.write(attack.name, batch["index"], stored)
        finally:
            for p in trainable:
                p.requires_grad_(True)
            student.train(was_training)

    def commit(self, root: str, checkpoint_key: str, rank: int) -> None:
        """Write this worker's carried views into the round's checkpoint folder."""
        arrays = {"index": self.rows.column("index").numpy()}
        arrays.update({a.name: self.rows.column(a.name).numpy() for a in self.settings.attacks})
        checkpoints.write_carried(root, checkpoint_key, rank, arrays)


def student_classifier(student: torch.nn.Module, teacher: Any) -> torch.nn.Module:
    """What MID-R's views are continued against: C_t ∘ E_s, as the adaptive table attacks
    it (C_s ∘ E_s with ``mid.classifier: trainable``). ATTA's are continued against its own
    classifier."""
    if hasattr(student, "classifier"):
        return EncoderClassifier(student.encoder, student.classifier)
    return EncoderClassifier(student, teacher.classifier)
