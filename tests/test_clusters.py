"""The cluster configs in ``clusters/``, the Dockerfile and the runtime env: they parse, name scripts and configs
that exist and the image the Dockerfile builds, and the README gives their commands (the RayJob's entrypoint
verbatim)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from maskray.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
README = "\n".join(path.read_text() for path in (REPO / "README.md", REPO / "docs" / "clusters-and-storage.md"))
LAUNCHER = sorted(CLUSTERS.glob("*.yaml"))
KUBERAY = sorted((CLUSTERS / "kuberay").glob("*.yaml"))


def _image() -> str:
    (tag,) = re.findall(r"^docker build -t (\S+) \.$", README, flags=re.M)
    return tag


def _containers(manifest: dict) -> list[dict]:
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [container for group in groups for container in group["template"]["spec"]["containers"]]


def test_every_manifest_parses_and_names_files_that_exist() -> None:
    assert [p.name for p in LAUNCHER] == ["aws-gpu.yaml", "gcp-gpu.yaml"]
    assert [p.name for p in KUBERAY] == ["raycluster.yaml", "rayjob.yaml"]
    files = [*LAUNCHER, *KUBERAY, REPO / "launch" / "runtime_env.yaml", REPO / "Dockerfile"]
    for path in files:
        text = path.read_text()
        if path.suffix == ".yaml":
            assert all(isinstance(doc, dict) for doc in yaml.safe_load_all(text)), path
        named = re.findall(r"(?:launch|configs|clusters)/[\w/.-]+\.(?:py|yaml)", text)
        missing = [name for name in named if not (REPO / name).is_file()]
        assert not missing, f"{path.name} names {missing}"


def test_launcher_configs_use_the_image_and_the_readme_brings_them_up() -> None:
    for path in LAUNCHER:
        config = yaml.safe_load(path.read_text())
        assert config["provider"]["type"] in ("aws", "gcp")
        assert config["docker"]["image"] == _image()
        assert config["head_node_type"] in config["available_node_types"]
        for command in ("up", "dashboard", "down"):
            assert f"ray {command} clusters/{path.name}" in README


def test_kuberay_manifests_use_the_image_and_the_readme_applies_them() -> None:
    kinds = {}
    for path in KUBERAY:
        manifest = yaml.safe_load(path.read_text())
        assert manifest["apiVersion"] == "ray.io/v1"
        kinds[manifest["kind"]] = manifest
        assert {container["image"] for container in _containers(manifest)} == {_image()}
        assert f"kubectl apply -f clusters/kuberay/{path.name}" in README
    assert set(kinds) == {"RayCluster", "RayJob"}
    head_service = f"svc/{kinds['RayCluster']['metadata']['name']}-head-svc"
    assert f"kubectl port-forward {head_service} 8265:8265" in README


def test_rayjob_entrypoint_is_the_readme_command_and_a_valid_config() -> None:
    job = yaml.safe_load((CLUSTERS / "kuberay" / "rayjob.yaml").read_text())
    entrypoint = job["spec"]["entrypoint"]
    assert entrypoint in README.splitlines()
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    (workdir,) = re.findall(r"^WORKDIR (\S+)$", (REPO / "Dockerfile").read_text(), flags=re.M)
    assert runtime_env["working_dir"] == workdir
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "launch/pretrain.py"] and (REPO / argv[1]).is_file()
    config_path = argv[argv.index("--config") + 1]
    overrides = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"]
    config = load_config(REPO / config_path, overrides)  # every key exists and validates
    assert config.tracking.storage_path.startswith("s3://") and config.data.shards.startswith("s3://")
