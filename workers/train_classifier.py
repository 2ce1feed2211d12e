"""Ray Train loop for the baseline (cross-entropy) and the teacher (cross-entropy + λ·L1
reconstruction), both on clean data streamed from the dataset store through Ray Data."""

from __future__ import annotations

import time
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F

from storage.checkpoints import save_checkpoint
from workers.progress import epoch_bar, quiet_ray_train
from workers.loading import unwrap
from workers.models import ModelSpec, build_classifier_model, build_teacher, to_float


def train_classifier_loop(config: dict[str, Any]) -> None:
    quiet_ray_train()
    torch.set_num_threads(1)  # workers get a fraction of a core each; more threads only contend
    torch.manual_seed(config["seed"])  # identical initial weights on every worker
    spec = ModelSpec(**config["spec"])
    is_teacher = config["kind"] == "teacher"
    model = build_teacher(spec) if is_teacher else build_classifier_model(spec)
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    shard = ray.train.get_dataset_shard("train")
    rank = ray.train.get_context().get_world_rank()
    history = []
    bar = epoch_bar(f"{config['kind']} training", config["epochs"], show=rank == 0)
    for epoch in range(config["epochs"]):
        start, seen, correct, total_loss = time.perf_counter(), 0, 0, 0.0
        for batch in shard.iter_torch_batches(batch_size=config["batch_size"], drop_last=True,
                                              local_shuffle_buffer_size=4 * config["batch_size"]):
            x, y = to_float(batch["clean"]), batch["label"]
            if is_teacher:
                logits, reconstruction = model(x)
                loss = F.cross_entropy(logits, y) + config["lambda_rec"] * F.l1_loss(reconstruction, x)
            else:
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(y)
            correct += (logits.argmax(1) == y).sum().item()
            total_loss += loss.item() * len(y)
        metrics = {"epoch": epoch, "loss": total_loss / max(seen, 1), "train_accuracy": 100.0 * correct / max(seen, 1),
                   "seconds": time.perf_counter() - start}
        history.append(metrics)
        ray.train.report(metrics)
        bar.set_description(f"{config['kind']} training (loss {metrics['loss']:.3f}, "
                            f"train acc {metrics['train_accuracy']:.1f}%)")
        bar.update(1)
    bar.close()
    if rank == 0:
        save_checkpoint(config["root"], config["checkpoint_key"], unwrap(model).state_dict(),
                        {"kind": config["kind"], "spec": spec.as_dict(), "history": history})
