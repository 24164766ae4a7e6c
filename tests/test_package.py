"""The installed distribution: it claims only the name `geosteer`, and its public API works outside the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from geosteer.models.gaga import GAGA

ROOT = Path(__file__).resolve().parents[1]


def test_the_installed_distribution_claims_only_geosteer_and_loads_an_export(tmp_path):
    site, source = tmp_path / "site", tmp_path / "source"  # built from a copy: the build leaves nothing in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "outputs", "build", "*.egg-info", "wandb", "__pycache__"))
    build = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(site),
             str(source)]  # fmt: skip
    done = subprocess.run(build, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    installed = {p.name for p in site.iterdir() if not p.name.endswith(".dist-info")} - {"bin"}
    assert installed == {"geosteer"}, f"the distribution installs {sorted(installed)}"
    assert {p.name for p in (site / "geosteer").iterdir()} >= {"__init__.py", "models", "data", "pipeline"}

    export = tmp_path / "export"
    GAGA(8, 3, hidden=[16], meta={"layer": 2, "family": "gaga"}).save_pretrained(export)
    script = (  # the model card's import, from a folder that holds no checkout
        "import importlib.util, sys, torch\n"
        "from geosteer import load_geometry\n"
        "assert [n for n in ('models', 'data', 'pipeline') if importlib.util.find_spec(n)] == []\n"
        f"geometry = load_geometry({str(export)!r}, d=8, layer=2)\n"
        "print(type(geometry).__module__, sys.modules['geosteer'].__file__, tuple(geometry.encode(torch.zeros(4, 8)).shape))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    module, where, shape = done.stdout.split(maxsplit=2)
    assert module == "geosteer.models.gaga" and where.startswith(str(site)) and shape.strip() == "(4, 3)"
