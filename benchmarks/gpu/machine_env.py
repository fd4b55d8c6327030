"""A local stand-in for the GPU machine's Python, to check ``.whl/`` and the suite's imports without a GPU.

    .venv/bin/python benchmarks/gpu/machine_env.py [--dest /tmp/maskray-machine-env]
    PYTHON=/tmp/maskray-machine-env/venv/bin/python bash benchmarks/gpu/run.sh --smoke

Builds a bare venv (no pip, no site packages) whose only packages are (1) the distributions of
``machine_packages.txt`` (the machine's documented list) taken from this venv, linked, and (2) ``.whl/`` installed as
``run.sh`` installs it (``pip install --no-index --no-deps --target``). A ``.whl/`` wheel built for another Python
(pydantic-core's cp312) cannot load here: this venv's installed copy of that distribution stands in for it, and it is
reported. What it cannot show: the machine's own versions (torch 2.11 there), its Python 3.12, and CUDA. Prints what
was linked, substituted and missing; exit status 1 when a ``.whl/`` wheel fails to install.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def machine_packages() -> set[str]:
    lines = (HERE / "machine_packages.txt").read_text().splitlines()
    return {canonical(line.strip()) for line in lines if line.strip() and not line.startswith("#")}


ABSENT = ("ray", "mlflow", "mlflow-skinny")  # never linked, even as a dependency: the machine has neither


def dependency_closure(wanted: set[str], installed: dict, exclude: set[str]) -> tuple[list[str], list[str]]:
    """The listed distributions installed here, plus what they require here (this venv's versions may need
    packages the machine's versions do not, e.g. a newer huggingface-hub), less ``exclude``; (all, the added)."""
    from packaging.requirements import Requirement

    todo = [name for name in wanted if name in installed and name not in exclude]
    seen = set(todo)
    while todo:
        for text in installed[todo.pop()].requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = canonical(req.name)
            if name in installed and name not in seen and name not in exclude:
                seen.add(name)
                todo.append(name)
    return sorted(seen), sorted(seen - wanted)


def link_distribution(dist: metadata.Distribution, site: Path, root: Path) -> None:
    """Symlink every top-level entry of ``dist``'s files (packages, modules, its .dist-info) into ``site``."""
    for entry in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
        source, target = root / entry, site / entry
        if source.exists() and not target.exists() and entry != "__pycache__":
            target.symlink_to(source)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", default="/tmp/maskray-machine-env")
    parser.add_argument("--wheels", default=str(REPO / ".whl"))
    args = parser.parse_args()
    dest = Path(args.dest)
    shutil.rmtree(dest, ignore_errors=True)
    site, wheels_dir = dest / "machine-site", dest / "wheels"
    site.mkdir(parents=True)
    root = Path(sysconfig.get_paths()["purelib"])
    wanted = machine_packages()
    installed = {canonical(d.metadata["Name"]): d for d in metadata.distributions()}
    wheels = sorted(Path(args.wheels).glob("*.whl"))
    carried = {canonical(w.name.split("-")[0]) for w in wheels}
    linked, added = dependency_closure(wanted, installed, exclude=carried | set(ABSENT))
    for name in linked:
        link_distribution(installed[name], site, root)
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    foreign = [w for w in wheels if "-cp3" in w.name and f"-{tag}-" not in w.name]
    ours = [w for w in wheels if w not in foreign]
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--target", str(wheels_dir), *map(str, ours)], capture_output=True, text=True)
    if done.returncode:
        print(done.stdout + done.stderr)
        return 1
    substituted = []
    for wheel in foreign:
        name = canonical(wheel.name.split("-")[0])
        wheels_site = wheels_dir
        link_distribution(installed[name], wheels_site, root)
        substituted.append(f"{wheel.name} -> this venv's {name} {installed[name].version}")
    venv.EnvBuilder(with_pip=False, system_site_packages=False).create(dest / "venv")
    purelib = next((dest / "venv" / "lib").glob("python3*/site-packages"))
    (purelib / "maskray-machine.pth").write_text(f"{wheels_dir}\n{site}\n")
    print(f"machine list: {len(wanted)} distributions; linked from this venv: {len(linked)}, of which not on the "
          f"list but required here by a listed one: {added}; not installed here (skipped): "
          f"{len(wanted - set(installed))}")
    print(f".whl/: {len(ours)} installed with pip --target; stand-ins for other Pythons' wheels: {substituted}")
    print(f"python: {dest / 'venv' / 'bin' / 'python'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
