"""A tiny sweep on the bundled digits, run once per test session through the real CLI:
three trials that finish (full MID, MID without meta-learning, a pool grown by FGSM_N) and
one that fails at run time (64 GPUs per actor, which only the running Ray instance can
refuse, for a MID of its own: a config that a check before Ray starts can refuse refuses
the whole sweep)."""

from __future__ import annotations

from pathlib import Path

from clihelpers import REPO, mid

SWEEP_NAME = "tiny"
TRIALS = ["full", "no-meta", "fgsm", "broken"]
SWEEP = f"""\
name: {SWEEP_NAME}
base: {REPO}/configs/digits.yaml
set:
  data.train_limit: 256
  data.test_limit: 32
  eval.defenses: [None, MID]
  models.baseline.epochs: 1
  models.teacher.epochs: 1
  mid.epochs: 1
  # One Ray Train worker and one actor per stage: fewer processes to start per trial
  # (distributed MID is tests/test_distributed_mid.py's subject).
  models.num_workers: 1
  mid.num_workers: 1
  pool.num_actors: 1
  eval.num_actors: 1
  attacks.PGD.nb_iter: 2
  attacks.MIM.nb_iter: 2
  attacks.BIM.nb_iter: 2
  pool.attacks: [PGD_N, MIM_N]
  eval.known: [PGD_N, MIM_N]
  eval.unknown: [FGSM_N]
  eval.protocols: [source, adaptive]
  pool.variants: 1
  pool.shard_size: 128
  eval.batch_size: 32
variants:
  full: {{}}
  no-meta: {{mid.meta: false}}
  fgsm: {{pool.attacks: [PGD_N, MIM_N, FGSM_N]}}
  broken: {{mid.epochs: 2, ray.gpus_per_actor: 64}}   # a MID of its own to build, so it needs Ray
"""


class TinySweep:
    def __init__(self, folder: Path):
        self.file, self.store, self.out = folder / "tiny-sweep.yaml", folder / "store", folder / "out"
        self.file.write_text(SWEEP)

    def run(self):
        return mid("sweep", str(self.file), "--store", str(self.store), "--out", str(self.out), timeout=900)
