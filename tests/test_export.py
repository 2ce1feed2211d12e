"""`mid export` on a real finished run (a trial of the tiny sweep, real CLI): each format's file,
loaded back with the format's own tools, predicts like the pipeline's model on the store's
test images; the card names the run's keys, results and pool; bad input is one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from clihelpers import REPO, mid, the_error_line
from storage import runs
from storage.datasets import DatasetReader
from storage.keys import sha256_bytes
from workers.export_formats import FILES, save
from workers.loading import load_defended
from workers.models import ModelSpec, build_classifier_model, to_float

pytestmark = pytest.mark.end_to_end  # `make test-fast` leaves this file out

RUN = "tiny-full"  # the full-MID trial of the session's tiny sweep (tests/sweephelpers.py)


@pytest.fixture(scope="module")
def finished(finished_sweep):
    """(store, the run's ref, its OUT/results.json) of one finished run: a trial of the
    session's tiny sweep, so no run of its own is needed."""
    tiny, _ = finished_sweep
    refs = runs.read_refs(str(tiny.store))
    (ref,) = [refs[ident] for ident in runs.find_refs(refs, RUN)]  # the run's name: its one ref
    return tiny.store, ref, json.loads((tiny.out / "trials" / "full" / "results.json").read_text())


def predictions(path, fmt: str, images: np.ndarray) -> np.ndarray:
    """Logits from the file, read with each format's own tools (not the pipeline's loaders)."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: images})[0]
    if fmt == "torchscript":
        model = torch.jit.load(str(path))
    else:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            spec = ModelSpec(**json.loads(f.metadata()["spec"]))
        model = build_classifier_model(spec)
        model.load_state_dict(load_file(str(path)))
    with torch.no_grad():
        return model.eval()(torch.from_numpy(images)).numpy()


def store_test_images(store, ref) -> np.ndarray:
    images, _ = DatasetReader.open(str(store), ref["keys"]["ingest"]).load("test")
    return np.ascontiguousarray(to_float(torch.from_numpy(images)).numpy())


def assert_same_rows(card_results: dict, report: dict, row: str, split_averages: bool = True) -> None:
    """``split_averages``: also the known / unknown averages (the card's known attacks are its
    run's pool attacks: the same split as the report's when eval.known is the pool)."""
    assert set(card_results) == set(report["protocols"])
    for protocol, got in card_results.items():
        want = report["protocols"][protocol]["defenses"][row]
        for field in ("benign", "attacks", "samples"):
            assert got[field] == want[field], (protocol, field)
        for field in ("avg_known", "avg_unknown", "avg") if split_averages else ("avg",):
            assert got[field] == pytest.approx(want[field], abs=0.011), (protocol, field)


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript", "onnx"])
def test_each_format_predicts_like_the_pipelines_model_and_its_card_names_the_run(finished, fmt, tmp_path):
    store, ref, report = finished
    out = tmp_path / "export"
    result = mid("export", RUN, str(out), "--format", fmt, "--store", str(store))
    assert result.returncode == 0, result.stderr[-3000:]
    path = out / FILES[fmt]
    assert sorted(p.name for p in out.iterdir()) == sorted([path.name, "card.json"])  # no temporary file left

    keys = ref["keys"]
    images = store_test_images(store, ref)
    with torch.no_grad():
        expected = load_defended(str(store), keys["mid"], keys["teacher"])(torch.from_numpy(images)).numpy()
    for batch in (images, images[:5]):  # the ONNX graph's batch dimension is dynamic
        got = predictions(path, fmt, batch)
        np.testing.assert_allclose(got, expected[:len(batch)], rtol=1e-4, atol=1e-4)
        assert (got.argmax(1) == expected[:len(batch)].argmax(1)).all()

    card = json.loads((out / "card.json").read_text())
    assert (card["format"], card["file"], card["sha256"]) == (fmt, path.name, sha256_bytes(path.read_bytes()))
    assert card["model"]["row"] == "MID" and "C_t ∘ E_s" in card["model"]["is"]
    assert card["keys"]["student"] == keys["mid"] and card["keys"]["teacher"] == keys["teacher"]
    assert card["keys"]["dataset"] == keys["ingest"] and card["keys"]["pools"] == keys["pools"]
    assert card["keys"]["results"] == {p: keys["results"][f"{p}/MID"] for p in ("source", "adaptive")}
    assert_same_rows(card["results"], report, "MID")
    assert {a: c["eps"] for a, c in card["pool"]["attacks"].items()} == {"PGD_N": 0.1, "MIM_N": 0.1}
    assert card["input"]["shape"] == ["N", 1, 16, 16] and card["input"]["range"] == [0.0, 1.0]
    assert card["dataset"]["num_classes"] == 10 and card["dataset"]["key"] == keys["ingest"]


def test_a_checkpoint_key_exports_that_model_with_the_results_of_the_run_that_used_it(finished, tmp_path):
    store, ref, _ = finished
    result = mid("export", ref["keys"]["baseline"], str(tmp_path), "--format", "torchscript", "--store", str(store))
    assert result.returncode == 0, result.stderr[-3000:]
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["model"]["row"] == "None" and card["keys"]["classifier"] == ref["keys"]["baseline"]
    # Every trial used this baseline: the results are the newest finished trial's, with its
    # pool's attacks as the known ones.
    assert card["results_from"] == f"run {card['run']['id']}" and card["run"]["id"].startswith(card["run"]["name"])
    variant = card["run"]["name"].removeprefix("tiny-")
    trial_report = json.loads((store.parent / "out" / "trials" / variant / "results.json").read_text())
    assert_same_rows(card["results"], trial_report, "None", split_averages=variant == "full")


def test_unknown_run_and_missing_row_are_one_line_naming_them(finished, tmp_path):
    store, _, _ = finished
    unknown = mid("export", "no-such-run", str(tmp_path), "--format", "onnx", "--store", str(store))
    assert unknown.returncode == 2
    the_error_line(unknown, "no-such-run", RUN)  # names the runs the store has
    no_row = mid("export", RUN, str(tmp_path), "--format", "onnx", "--row", "AT", "--store", str(store))
    assert no_row.returncode == 2
    line = the_error_line(no_row, "AT", "None, MID")
    assert f"'{RUN}-" in line  # the run's ref: its name and its config's digest
    assert not list(tmp_path.iterdir())  # nothing written


def test_onnx_without_the_export_extra_names_the_extra(tmp_path):
    code = ("import sys; sys.modules['onnxscript'] = None; from pipeline.cli import main; "
            f"sys.exit(main(['export', 'digits', {str(tmp_path)!r}, '--format', 'onnx']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --format onnx needs the export extra: pip install 'mid-pipeline[export]'"


def test_normalisation_travels_inside_every_format(tmp_path):
    """A spec with mean and std: each file applies them itself to pixels in [0, 1]."""
    torch.manual_seed(0)
    spec = ModelSpec(arch="lenet", in_channels=3, image_size=8, num_classes=4,
                     mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    model = build_classifier_model(spec).eval()
    images = torch.rand(6, 3, 8, 8)
    with torch.no_grad():
        expected = model(images).numpy()
        unnormalised = model.classifier(model.encoder.head(model.encoder.features(images))).numpy()
    assert not np.allclose(expected, unnormalised, atol=1e-3)  # the check below can tell them apart
    for fmt, name in FILES.items():
        save(model, fmt, tmp_path / name, images, spec.as_dict())
        np.testing.assert_allclose(predictions(tmp_path / name, fmt, images.numpy()), expected, rtol=1e-4, atol=1e-5)


def test_export_refuses_a_path_and_an_existing_out_and_names_the_ref_it_took(finished, tmp_path):
    """Issue 22: `mid export ../../etc OUT` read outside the store; `mid export RUN OUT` twice
    replaced OUT's files silently; an interrupted run exported without a word; a second run
    of the same name replaced the first's ref. Now: one line, exit 2 for the first two; a
    bare name takes the newest ref of that name and says so; a run that did not finish is
    exported with a warning naming its status."""
    store, ref, _ = finished
    # The first one reached the run's baseline through the path (exit 0): any path could.
    for bad in (f"../checkpoints/{ref['keys']['baseline']}", "../../etc", "/etc/passwd", "mid-../x"):
        outside = mid("export", bad, str(tmp_path / "x"), "--format", "safetensors", "--store", str(store))
        assert outside.returncode == 2
        the_error_line(outside, f"RUN_OR_KEY {bad!r} is not a run name, ref or checkpoint key")
    # An older run of the same name that was interrupted: a ref of its own.
    older = f"{RUN}-00000000"
    (store / "refs" / f"{older}.json").write_text(json.dumps({**ref, "id": older, "status": "interrupted",
                                                               "updated": ref["updated"] - 60}))
    try:
        out = tmp_path / "newest"
        newest = mid("export", RUN, str(out), "--format", "safetensors", "--store", str(store))
        assert newest.returncode == 0, newest.stderr[-3000:]
        assert (f"note: 2 refs are named {RUN!r}; exporting the newest, {ref['id']} "
                f"(the others: {older}; name one to choose it)") in newest.stderr
        assert json.loads((out / "card.json").read_text())["run"]["id"] == ref["id"]
        again = mid("export", ref["id"], str(out), "--format", "safetensors", "--store", str(store))
        assert again.returncode == 2
        the_error_line(again, f"{out / 'model.safetensors'} exists", "--force")
        interrupted = mid("export", older, str(out), "--format", "safetensors", "--force", "--store", str(store))
        assert interrupted.returncode == 0, interrupted.stderr[-3000:]
        assert (f"warning: run {older} is interrupted, not finished: its card may "
                f"lack results; rerun it to finish") in interrupted.stderr
        assert json.loads((out / "card.json").read_text())["run"]["status"] == "interrupted"
    finally:
        (store / "refs" / f"{older}.json").unlink()
