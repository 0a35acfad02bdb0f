"""The Dockerfile's install steps, checked where no Docker engine runs: every `uv sync` it runs must work from
the lock as it stands, and each image must copy every package the project ships."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib

from tests.processes import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()


def uv_syncs() -> list[list[str]]:
    """The `uv sync` commands of the Dockerfile's RUN steps, as argument lists."""
    commands = []
    for run in re.findall(r"^RUN (.+)$", DOCKERFILE, flags=re.MULTILINE):
        for step in run.split("&&"):
            args = shlex.split(step)
            if args[:2] == ["uv", "sync"]:
                commands.append(args)
    return commands


def test_every_uv_sync_of_the_images_resolves_from_the_lock():
    uv = shutil.which("uv")
    assert uv, "uv is what the images and scripts/test.sh install with"
    commands = uv_syncs()
    assert any("--extra" in c and "gpu" in c for c in commands), "the RunPod image installs the gpu extra"
    for args in commands:
        args = [a for a in args if not a.startswith("--python")]  # the images' interpreter, not this one
        done = subprocess.run([uv, *args[1:], "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{' '.join(args)}: {done.stderr[-2000:]}"


def test_the_images_copy_every_package_the_project_ships():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = set(pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"])
    copied = {target.rstrip("/").removeprefix("./") for source, target in
              re.findall(r"^COPY (?!--from)(\S+) (\S+)$", DOCKERFILE, flags=re.MULTILINE)}
    copied |= {name for line in re.findall(r"^COPY (?!--from)(.+) \./$", DOCKERFILE, flags=re.MULTILINE)
               for name in line.split()}
    assert packages <= copied, f"not copied into the image: {sorted(packages - copied)}"
    assert {"handler.py", "prefect.yaml", "uv.lock", "pyproject.toml"} <= copied
    assert re.search(r'^CMD \["python", "-u", "handler.py"\]$', DOCKERFILE, flags=re.MULTILINE)
