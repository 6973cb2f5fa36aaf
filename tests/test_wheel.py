"""The wheel installs and trains without the repository and without the test extras.

``python -m build`` (offline, ``--no-isolation``) makes the sdist and the wheel.
The wheel goes into a fresh virtual environment (no system site-packages) with
``pip install --no-deps``; its runtime dependencies are made visible there by
linking only the distributions that the wheel's own ``Requires-Dist`` pulls in,
followed through their metadata from the packages installed here. So torch,
pytest, chex, optax's examples... are absent unless jax or flax themselves
require them, nothing is downloaded, and the check takes seconds, not the
minutes a PyPI install of jaxlib would. ``tests/wheel_smoke.py`` then runs a
training step of every norm with ``python -I`` from an empty folder, so the
checkout cannot be imported by accident. (The declared floors were installed
from PyPI and run with the same script once by hand; see CHANGELOG.md.)
"""

import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _requires(dist_requires, extras=()):
    env = default_environment()
    out = []
    for line in dist_requires or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in (*extras, "")):
            out.append(req)
    return out


def runtime_closure(requirements):
    """The installed distributions that `requirements` pull in, recursively (extras followed)."""
    seen, todo = {}, list(requirements)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            raise AssertionError(f"{req} is required but not installed here") from None
        assert dist.version in req.specifier or not req.specifier, f"installed {name} {dist.version} violates {req}"
        key = (name, tuple(sorted(req.extras)))
        if key in seen:
            continue
        seen[key] = dist
        todo += _requires(dist.requires, req.extras)
    return {name: dist for (name, _), dist in seen.items()}


def _link_distribution(dist, site: Path) -> None:
    base = Path(dist.locate_file(""))
    tops = {f.parts[0] for f in dist.files or [] if f.parts and not f.parts[0].startswith("..")}
    for top in tops - {"__pycache__"}:
        if top.endswith(".pth"):
            continue
        source, target = base / top, site / top
        if source.exists() and not target.exists():
            target.symlink_to(source)


@pytest.fixture(scope="module")
def dist_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    run = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out


def test_build_makes_an_sdist_and_a_wheel(dist_dir):
    import jaxnorm

    wheel, = dist_dir.glob("*.whl")
    sdist, = dist_dir.glob("*.tar.gz")
    assert wheel.name == f"jaxnorm-{jaxnorm.__version__}-py3-none-any.whl"  # one source of the version
    assert sdist.name == f"jaxnorm-{jaxnorm.__version__}.tar.gz"
    names = zipfile.ZipFile(wheel).namelist()
    assert "jaxnorm/py.typed" in names and any(n.endswith("licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "examples/", "benchmarks/", "docs/")) for n in names)


def test_wheel_trains_in_a_fresh_venv(dist_dir, tmp_path):
    wheel, = dist_dir.glob("*.whl")
    meta = zipfile.ZipFile(wheel).read(next(n for n in zipfile.ZipFile(wheel).namelist()
                                            if n.endswith(".dist-info/METADATA"))).decode()
    declared = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    closure = runtime_closure(_requires(declared))
    assert {"jax", "jaxlib", "flax"} <= set(closure), sorted(closure)
    for test_only in ("torch", "pytest", "chex", "hypothesis", "sphinx", "matplotlib", "scikit-learn"):
        assert test_only not in closure, f"{test_only} is pulled in by the runtime dependencies"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    assert site != Path(sysconfig.get_paths()["purelib"])
    for dist in closure.values():
        _link_distribution(dist, site)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=300)

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ROOT / "tests" / "wheel_smoke.py", work)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["JAX_PLATFORMS"] = "cpu"
    run = subprocess.run([str(python), "-I", "wheel_smoke.py"], cwd=work, capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("ok:") and str(site) in last, last  # the wheel's jaxnorm, not the checkout's
    for banned in ("torch", "pytest", "chex"):
        probe = subprocess.run([str(python), "-I", "-c", f"import {banned}"], cwd=work, capture_output=True)
        assert probe.returncode != 0, f"{banned} is importable in the wheel's venv"
