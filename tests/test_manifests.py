"""The container images and KubeRay manifests in docker/ agree with each other and with the
pipeline: every image a manifest names is built by a Dockerfile, the RayJob's entrypoint is a
command line `mid` accepts with a config that validates, the GPU pods fit the config's workers,
and the constraints file pins what pyproject.toml asks for. No Ray, no Docker, no network:
nothing here can be built or applied on this machine, so this is what checks them."""

from __future__ import annotations

import math
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipeline.cli import build_parser
from pipeline.config_loader import load_config

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
CONSTRAINTS = DOCKER / "constraints.txt"
MANIFESTS = sorted((DOCKER / "kuberay").glob("*.yaml"))
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
# A RayCluster has no entrypoint: it is checked against the command docker/README.md submits to it.
RAYCLUSTER_ENTRYPOINT = ("python -m pipeline run configs/imagenet1k-vitb.yaml --store s3://YOUR-BUCKET/mid "
                         "--set data.path=/data/imagenet --set models.pretrained=/models/vit_b16.pth")
# Image tag X is built from docker/Dockerfile.X; a registry prefix may stand before the name.
OUR_IMAGE = re.compile(r"(?:\S+/)?mid-pipeline:(?P<flavour>[A-Za-z0-9_.-]+)")
GPU = "nvidia.com/gpu"


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifest_documents() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in MANIFESTS for doc in documents(path)]


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def flavour(image: str) -> str:
    match = OUR_IMAGE.fullmatch(image)
    assert match, f"{image!r} is not one of this project's images (REGISTRY/mid-pipeline:X)"
    return match["flavour"]


def images_in(node) -> list[str]:
    """Every `image:` anywhere below node: containers, init containers, submitter pods."""
    if isinstance(node, dict):
        found = [node["image"]] if isinstance(node.get("image"), str) else []
        return found + [image for value in node.values() for image in images_in(value)]
    if isinstance(node, list):
        return [image for item in node for image in images_in(item)]
    return []


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def gpus(container: dict) -> int:
    # Kubernetes takes extended resources such as GPUs from limits; requests may only repeat them.
    return int(container.get("resources", {}).get("limits", {}).get(GPU, 0))


def cpu_quantity(text) -> float:
    text = str(text)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = []
    for line in filter(None, map(str.strip, joined.splitlines())):
        kind, _, args = line.partition(" ")
        instructions.append((kind.upper(), args.strip()))
    return instructions


def pins() -> dict[str, str]:
    """Canonical name -> the whole requirement line, for every line of the constraints file."""
    found = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            found[canonicalize_name(Requirement(line).name)] = line
    return found


def entrypoint(doc: dict) -> str:
    return doc["spec"]["entrypoint"] if doc["kind"] == "RayJob" else RAYCLUSTER_ENTRYPOINT


def mid_command(doc: dict):
    """The command the cluster runs, through the real `mid` parser, and the config it names,
    loaded the way the CLI loads it (paths relative to the repository root)."""
    argv = shlex.split(entrypoint(doc))
    assert argv[:3] == ["python", "-m", "pipeline"], f"entrypoint does not run the pipeline: {argv[:3]}"
    args = build_parser().parse_args(argv[3:])
    assert args.command == "run", f"entrypoint runs `mid {args.command}`, not `mid run`"
    cfg = load_config(REPO / args.config, args.overrides, args.store, args.profile)
    return args, cfg


MANIFEST_DOCUMENTS = manifest_documents()


def test_there_is_a_ray_job_and_a_ray_cluster():
    kinds = sorted(doc["kind"] for _, doc in MANIFEST_DOCUMENTS)
    assert "RayJob" in kinds and "RayCluster" in kinds, kinds


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_a_kuberay_resource(path):
    docs = documents(path)
    assert docs, f"{path.name} holds no document"
    for doc in docs:
        assert doc["apiVersion"] == "ray.io/v1", f"{path.name}: apiVersion {doc['apiVersion']!r}"
        assert doc["kind"] in ("RayJob", "RayCluster"), f"{path.name}: kind {doc['kind']!r}"


@pytest.mark.parametrize("name, doc", MANIFEST_DOCUMENTS, ids=[name for name, _ in MANIFEST_DOCUMENTS])
def test_every_image_is_built_by_a_dockerfile(name, doc):
    images = images_in(doc)
    assert images, f"{name} names no image"
    for image in images:
        dockerfile = DOCKER / f"Dockerfile.{flavour(image)}"
        assert dockerfile.is_file(), f"{name}: {image} has no {dockerfile.relative_to(REPO)} to build it"


def test_the_cpu_and_gpu_dockerfiles_exist():
    assert {path.name for path in DOCKERFILES} >= {"Dockerfile.cpu", "Dockerfile.gpu"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_builds_from_the_constraints(path):
    name = path.name.removeprefix("Dockerfile.")
    text = path.read_text()
    assert f"docker build -f docker/{path.name} -t mid-pipeline:{name} ." in text, \
        f"{path.name}: its build comment should build mid-pipeline:{name} (tag X from docker/Dockerfile.X)"
    instructions = dockerfile_instructions(path)
    assert instructions and instructions[0][0] in ("FROM", "ARG"), f"{path.name}: starts with {instructions[:1]}"
    assert any(kind == "FROM" for kind, _ in instructions), f"{path.name}: no FROM"
    installs = [i for i, (kind, args) in enumerate(instructions)
                if kind == "RUN" and re.search(r'pip install -c docker/constraints\.txt "\.\[test\]"', args)]
    assert installs, f"{path.name}: does not install the project with -c docker/constraints.txt"
    copies = [i for i, (kind, args) in enumerate(instructions)
              if kind == "COPY" and "docker/constraints.txt" in args.split()]
    assert copies and copies[0] < installs[0], f"{path.name}: docker/constraints.txt is not copied before the install"


def test_gpu_image_runs_as_a_user_other_than_root():
    users = [args.split(":")[0] for kind, args in dockerfile_instructions(DOCKER / "Dockerfile.gpu") if kind == "USER"]
    assert users, "Dockerfile.gpu sets no USER: it would run as root"
    assert users[-1] not in ("root", "0"), f"Dockerfile.gpu ends as USER {users[-1]}"


@pytest.mark.parametrize("name, doc", MANIFEST_DOCUMENTS, ids=[name for name, _ in MANIFEST_DOCUMENTS])
def test_head_trains_nothing_and_gpu_groups_use_the_gpu_image(name, doc):
    spec = cluster_spec(doc)
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", f"{name}: the head's num-cpus is not \"0\""
    assert {flavour(c["image"]) for c in containers(head)} == {"cpu"}, f"{name}: the head is not the cpu image"
    groups = spec.get("workerGroupSpecs", [])
    assert any(gpus(c) for g in groups for c in containers(g)), f"{name}: no worker group asks for {GPU}"
    for group in groups:
        for container in containers(group):
            asks_for_gpus, gpu_image = gpus(container) > 0, flavour(container["image"]) == "gpu"
            assert asks_for_gpus == gpu_image, \
                f"{name}: group {group['groupName']}: {container['image']} with {gpus(container)} {GPU}"


@pytest.mark.parametrize("name, doc", MANIFEST_DOCUMENTS, ids=[name for name, _ in MANIFEST_DOCUMENTS])
def test_gpu_pods_fit_the_config(name, doc):
    _, cfg = mid_command(doc)
    assert cfg.ray.use_gpu
    gpu_groups = [(g, c) for g in cluster_spec(doc)["workerGroupSpecs"] for c in containers(g) if gpus(c)]
    for group, container in gpu_groups:
        per_pod, cpus = gpus(container), cpu_quantity(container["resources"]["limits"]["cpu"])
        train_cpus = per_pod * cfg.ray.cpus_per_worker
        actor_cpus = (per_pod / cfg.ray.gpus_per_actor) * cfg.ray.cpus_per_actor if cfg.ray.gpus_per_actor else 0
        # Ray Data feeds the training workers from what they leave: none left, and training stalls.
        assert cpus > train_cpus, f"{name}: {cpus} CPUs for {per_pod} workers of {cfg.ray.cpus_per_worker}"
        assert cpus >= actor_cpus, f"{name}: {cpus} CPUs for {per_pod} GPUs of actors of {cfg.ray.cpus_per_actor}"
    total_gpus = sum(gpus(c) * g["replicas"] for g, c in gpu_groups)
    needed = {"models.num_workers": cfg.models.num_workers, "mid.num_workers": cfg.mid.num_workers,
              "pool GPUs": math.ceil(cfg.pool.num_actors * cfg.ray.gpus_per_actor),
              "eval GPUs": math.ceil(cfg.eval.num_actors * cfg.ray.gpus_per_actor)}
    for what, count in needed.items():
        # A Ray Train run waits forever for a GPU that is not there.
        assert total_gpus >= count, f"{name}: {what} is {count}, the cluster has {total_gpus} GPUs"


@pytest.mark.parametrize("name, doc", MANIFEST_DOCUMENTS, ids=[name for name, _ in MANIFEST_DOCUMENTS])
def test_ray_version_is_the_pinned_one(name, doc):
    assert pins()["ray"] == f"ray=={cluster_spec(doc)['rayVersion']}", f"{name}: rayVersion differs from the pin"


@pytest.mark.parametrize("name, doc", MANIFEST_DOCUMENTS, ids=[name for name, _ in MANIFEST_DOCUMENTS])
def test_entrypoint_is_a_valid_mid_run(name, doc):
    args, cfg = mid_command(doc)  # raises on a bad command line, config, --set or store URL
    assert args.store and args.store.startswith("s3://"), f"{name}: --store {args.store!r} is not S3"
    assert cfg.store.url.startswith("s3://")
    assert cfg.ray.use_gpu, f"{name}: {args.config} does not train on GPUs"
    if doc["kind"] == "RayJob":
        assert doc["spec"]["shutdownAfterJobFinishes"] is True, f"{name}: the cluster outlives the job"
    # The driver (head) checks and lists the inputs, the workers read them: all at these paths.
    spec = cluster_spec(doc)
    for path in filter(None, (cfg.data.path, cfg.models.pretrained)):
        for group in (spec["headGroupSpec"], *spec["workerGroupSpecs"]):
            for container in containers(group):
                mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
                assert any(Path(path).is_relative_to(m) for m in mounts), \
                    f"{name}: {path} is on no volume of {container['name']} (mounts: {mounts})"


def test_constraints_pin_every_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    pinned = pins()
    for requirement in map(Requirement, wanted):
        name = canonicalize_name(requirement.name)
        if name == "torch":  # each Dockerfile installs its own build: CPU or CUDA
            continue
        assert name in pinned, f"docker/constraints.txt does not pin {name}"
        assert re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.]+", pinned[name]), \
            f"docker/constraints.txt: {pinned[name]!r} is not an exact pin"


def test_constraints_leave_out_torch_and_local_builds():
    for name, line in pins().items():
        assert name != "torch" and not name.startswith("nvidia-"), f"docker/constraints.txt pins {line}"
        assert "+" not in line, f"docker/constraints.txt pins a local build: {line}"
