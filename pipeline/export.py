"""``mid export``: one trained model of a run (or one checkpoint of a store) as a
self-contained file in OUT, with ``card.json`` beside it.

Everything comes from the store: a run's ref (``STORE/refs/<name>-<digest>.json``) names the
key each stage claimed; the checkpoint, dataset, pool and results entries say the rest. The card
says what the model is, what it reads and returns, the dataset and attacker pool it was
trained with, the row's results under every protocol the run evaluated, and those keys.
The file itself is written by ``workers.export_formats``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from pipeline.config import PROTOCOLS
from pipeline.report import summarize
from pipeline.stages.evaluate import in_table_order, results_url
from storage import checkpoints, datasets, fs, pools, runs
from storage.keys import sha256_bytes
from storage.store import StoreError, open_existing
from workers.attacks import parse_attack_name
from workers.defenses import DEFAULT_ROW, defense_class, exportable_rows, is_student_checkpoint, row_of_checkpoint
from workers.export_formats import FILES, ONNX_INPUT, ONNX_OUTPUT, missing_onnx_packages

# An exportable table row -> the label its model is claimed under in a run's ref (MID: the
# student, whose manifest names its teacher).
ROW_LABELS = {row: defense_class(row).kind for row in exportable_rows()}
WHAT = {
    **{row: defense_class(row).description for row in ROW_LABELS},
    "teacher": "MID's teacher C_t ∘ E_t (clean images, with a reconstruction loss); not a row of the tables",
    "substitute": "the transfer protocol's substitute, a plain classifier with a seed of its own; not a row "
                  "of the tables",
}
CHECK_IMAGES = 64  # test images the written file must predict like the pipeline's model


class ExportError(ValueError):
    """Bad input (exit status 2); the message is one line naming what is wrong."""


@dataclass
class Source:
    """The checkpoint to export and the run whose ref names it (None when none does)."""

    manifest: dict[str, Any]
    row: str | None  # None: a model no table has (the teacher, the substitute)
    run: str | None  # the ref id
    ref: dict[str, Any] | None
    row_from_run: bool = False  # a run was named (not a checkpoint key)

    @property
    def claims(self) -> dict[str, Any]:
        return self.ref["keys"] if self.ref else {}


def export_command(args) -> int:
    try:
        if args.format == "onnx" and missing_onnx_packages():
            raise ExportError("--format onnx needs the export extra: pip install 'mid-pipeline[export]'")
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ExportError(f"{out} is a file; OUT must be a folder (it is created if missing)")
        if not getattr(args, "force", False):
            for existing in (out / FILES[args.format], out / "card.json"):
                if existing.exists():
                    raise ExportError(f"{existing} exists; choose another OUT, or pass --force to replace it")
        if not runs.SAFE_REF.fullmatch(args.run_or_key) or ".." in args.run_or_key:
            raise ExportError(f"RUN_OR_KEY {args.run_or_key!r} is not a run name, ref or checkpoint key (a name "
                              f"like digits, a ref like digits-3f9a2c1b, a key like mid-<20 hex digits>; "
                              f"`mid cache ls` lists them)")
        root = open_existing(args.store)
        source = resolve(root, args.run_or_key, args.row)
    except (StoreError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if source.ref is not None and source.ref.get("status") != "finished" and source.row_from_run:
        # The model is committed, but the run did not finish: its results may be missing or stale.
        print(f"warning: run {source.run} is {source.ref.get('status')}, not finished: its card may lack "
              f"results; rerun it to finish", file=sys.stderr)
    path = export(root, source, args.format, out)
    what = f"row {source.row}" if source.row else source.manifest["kind"]
    print(f"wrote {path} ({what}{f' of run {source.run}' if source.run else ''}) and {out / 'card.json'}")
    return 0


def resolve(root: str, name: str, row: str | None) -> Source:
    """A run's ref id or name (its ``row``, by default MID's; a name: the newest ref of that
    name), or a checkpoint key (its own model: ``row``, if given, must be its row)."""
    refs = runs.read_refs(root)
    found = runs.find_refs(refs, name)
    if found:
        if len(found) > 1:
            print(f"note: {len(found)} refs are named {name!r}; exporting the newest, {found[0]} "
                  f"(the others: {', '.join(found[1:])}; name one to choose it)", file=sys.stderr)
        return from_run(root, found[0], refs[found[0]], row or DEFAULT_ROW)
    manifest = checkpoints.read_manifest(root, name)
    if manifest is None:
        names = sorted({ref["name"] for ref in refs.values()})
        raise ExportError(f"no run or checkpoint {name!r} in store {root} (runs: {', '.join(names) or 'none'}; "
                          f"`mid cache ls` lists their refs and the checkpoints)")
    own_row = row_of_checkpoint(manifest)
    label = ROW_LABELS[own_row] if own_row in ROW_LABELS else manifest["kind"]
    if row is not None and row != own_row:  # a key exports its own model; naming another row contradicts it
        raise ExportError(f"checkpoint {name} is the {own_row or manifest['kind']} model, not row {row}; "
                          f"a key exports its own model (name a run to choose a row)")
    # The dataset, pool and results of a checkpoint are in the runs that used it, newest finished first.
    users = sorted((ref.get("status") == "finished", ref.get("updated", 0), run) for run, ref in refs.items()
                   if ref.get("keys", {}).get(label) == name)
    run = users[-1][2] if users else None
    return Source(manifest, own_row, run, refs.get(run))


def from_run(root: str, name: str, ref: dict[str, Any], row: str) -> Source:
    rows = [r for r, label in ROW_LABELS.items() if label in ref["keys"]]
    if row not in rows:
        raise ExportError(f"run {name!r} has no {row} row (its rows: {', '.join(rows) or 'none, it trained no model'})")
    key = ref["keys"][ROW_LABELS[row]]
    manifest = checkpoints.read_manifest(root, key)
    if manifest is None:
        raise ExportError(f"run {name!r} ({ref.get('status')}): the {row} checkpoint {key} is not in store {root}")
    return Source(manifest, row, name, ref, row_from_run=True)


def load_model(root: str, manifest: dict[str, Any]):
    from workers.loading import load_defended, load_source_model

    if is_student_checkpoint(manifest):
        return load_defended(root, manifest["key"], manifest["teacher_key"])
    return load_source_model(root, manifest["kind"], manifest["key"])  # the teacher's C ∘ E, or a classifier


def check_images(root: str, dataset_key: str | None, spec) -> tuple[Any, str]:
    """A float batch in [0, 1] to trace the model with and to check the file on: the first
    test images of the run's dataset, or seeded noise when the store holds no dataset for it."""
    import torch

    from workers.models import to_float

    if dataset_key is not None:
        images, _ = datasets.DatasetReader.open(root, dataset_key).load("test", 0, CHECK_IMAGES)
        batch, where = to_float(torch.from_numpy(images)), f"the first {len(images)} test images of {dataset_key}"
    else:
        shape = (8, spec.in_channels, spec.image_size, spec.image_size)
        batch, where = torch.rand(shape, generator=torch.Generator().manual_seed(0)), "8 images of uniform noise"
    # A batch of one would fix the ONNX graph's batch dimension at 1.
    return (batch.repeat(2, 1, 1, 1) if len(batch) == 1 else batch), where


def export(root: str, source: Source, fmt: str, out: Path) -> Path:
    from workers.export_formats import save
    from workers.models import ModelSpec

    manifest, claims = source.manifest, source.claims
    spec = ModelSpec(**manifest["spec"])
    dataset = dataset_card(root, claims.get("ingest"))
    example, checked_on = check_images(root, dataset and dataset["key"], spec)
    out.mkdir(parents=True, exist_ok=True)
    path = out / FILES[fmt]
    difference = save(load_model(root, manifest), fmt, path, example, spec.as_dict())
    data = path.read_bytes()
    card = {
        "mid_pipeline": version("mid-pipeline"),
        "format": fmt, "file": path.name, "sha256": sha256_bytes(data), "bytes": len(data),
        "model": {"row": source.row, "kind": manifest["kind"], "spec": spec.as_dict(),
                  "is": WHAT.get(source.row or manifest["kind"], manifest["kind"])},
        "input": input_card(spec, fmt),
        "output": {"shape": ["N", spec.num_classes], "is": "logits (no softmax)",
                   **({"onnx_name": ONNX_OUTPUT} if fmt == "onnx" else {})},
        "dataset": dataset,
        "pool": pool_card(root, claims.get("pools")),
        **results_card(root, source),
        "keys": keys_card(source),
        "run": {k: source.ref.get(k) for k in ("id", "name", "status", "run_id")} if source.ref else None,
        "check": {"images": checked_on, "largest_logit_difference": difference},
    }
    fs.write_json_atomic(str(out / "card.json"), card)
    return path


def input_card(spec, fmt: str) -> dict[str, Any]:
    channels = spec.in_channels
    return {"shape": ["N", channels, spec.image_size, spec.image_size], "layout": "NCHW", "dtype": "float32",
            "range": [0.0, 1.0], "is": "pixels / 255",
            # Applied by the model itself (workers.models.Encoder): give it pixels, not normalised values.
            "normalisation": {"mean": list(spec.mean or [0.0] * channels), "std": list(spec.std or [1.0] * channels),
                              "applied": "inside the model" if spec.mean or spec.std else "none"},
            "batch": "dynamic" if fmt == "onnx" else "any",
            **({"onnx_name": ONNX_INPUT} if fmt == "onnx" else {})}


def dataset_card(root: str, key: str | None) -> dict[str, Any] | None:
    manifest = datasets.read_manifest(root, key) if key else None
    if manifest is None:
        return None
    shapes = manifest["shapes"]
    return {"key": key, "fingerprint": manifest["fingerprint"],
            "source": manifest.get("source"),  # recorded by newer ingests only
            "num_classes": len(manifest["class_names"]), "class_names": manifest["class_names"],
            "image_shape": shapes["train"][1:], "samples": {split: shape[0] for split, shape in shapes.items()}}


def attack_card(root: str, attack: str, key: str) -> dict[str, Any]:
    attrs = pools.read_attrs(root, key)
    settings = attrs.get("settings") or {}
    targeted = parse_attack_name(attack)[1]
    return {"key": key, "eps": settings.get("eps"), "threat_model": attrs.get("threat_model"),
            "target": attrs.get("target") if targeted else None, "settings": settings,
            "samples": attrs.get("num_samples"), "variants": attrs.get("variants")}


def pool_card(root: str, keys: dict[str, str] | None) -> dict[str, Any] | None:
    """The run's training pool: its attacks (the known ones) and what they were crafted against."""
    if not keys:
        return None
    attacks = {attack: attack_card(root, attack, key) for attack, key in keys.items()}
    source_model = pools.read_attrs(root, next(iter(keys.values()))).get("source_model")
    return {"source_model": source_model, "attacks": attacks}


def result_cells(source: Source) -> dict[str, str]:
    """{protocol: results key} of the row, in the tables' order."""
    cells = {cell.split("/", 1)[0]: key for cell, key in source.claims.get("results", {}).items()
             if cell.split("/", 1)[1] == source.row}
    return {p: cells[p] for p in PROTOCOLS if p in cells}


def results_card(root: str, source: Source) -> dict[str, Any]:
    """The row's table rows as the run's report has them (averages included); or None and why.

    A ref does not record eval.known: the attacks of the training pool count as known (as in
    docs/design.md §6.4), every other attack as unknown."""
    if source.row is None:
        return {"results": None, "results_missing": f"the {source.manifest['kind']} is not a row of the tables"}
    if source.run is None:
        return {"results": None, "results_missing": f"no run in the store names checkpoint {source.manifest['key']}"}
    cells = result_cells(source)
    if not cells:
        return {"results": None, "results_missing": f"run {source.run!r} ({source.ref.get('status')}) has no results "
                                                     f"for row {source.row}"}
    known = list(source.claims.get("pools", {}))
    rows = {}
    for protocol, key in cells.items():
        cell = fs.read_json(results_url(root, key))
        if cell is None:
            return {"results": None, "results_missing": f"results {key} ({protocol}/{source.row}) is not in the store"}
        unknown = [a for a in cell["attacks"] if a not in known]
        rows[protocol] = summarize(in_table_order(cell, [*known, *unknown]), known, unknown)
    return {"results": rows, "results_from": f"run {source.run}", "known_attacks": known}


def keys_card(source: Source) -> dict[str, Any]:
    manifest, claims = source.manifest, source.claims
    if is_student_checkpoint(manifest):
        models = {"student": manifest["key"], "teacher": manifest["teacher_key"]}
    else:
        models = {"teacher" if manifest["kind"] == "teacher" else "classifier": manifest["key"]}
    return {**models, "dataset": claims.get("ingest"), "pools": claims.get("pools"),
            "test_attacks": {p: claims[f"test-attacks-{p}"] for p in PROTOCOLS if f"test-attacks-{p}" in claims},
            "results": result_cells(source)}
