"""Small Kedro projects written into a temp dir for end-to-end tests, each with a kmrun
config of kmrun's own keys only (``conf/kmrun.yaml`` beside the project folder)."""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml


def write(root: Path, files: dict[str, str]) -> None:
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)


def project(root: Path, package: str, pipeline: str, files: dict[str, str], parameters: dict,
            catalog: dict, kmrun: dict, template_store: Path) -> Path:
    """A workspace at ``root``: ``project/`` (a Kedro project whose package is
    ``package``, with ``pipeline`` as its pipeline_registry body), ``conf/kmrun.yaml``
    and a fresh MLflow store. Returns the project folder."""
    where = root / "project"
    write(where, {
        "pyproject.toml": f'[tool.kedro]\npackage_name = "{package}"\nproject_name = "{package}"\n'
                          'kedro_init_version = "1.0.0"\nsource_dir = "src"\n',
        f"src/{package}/__init__.py": "",
        f"src/{package}/settings.py": "",
        f"src/{package}/pipeline_registry.py": pipeline,
        "conf/base/parameters.yml": yaml.safe_dump(parameters),
        "conf/base/catalog.yml": yaml.safe_dump(catalog) if catalog else "{}\n",
        "conf/local/.gitkeep": "",
        **files,
    })
    write(root, {"conf/kmrun.yaml": yaml.safe_dump({"kedro": {"project_path": "project"}, **kmrun})})
    shutil.copy(template_store, root / "mlflow.db")
    return where


def wheel(folder: Path, name: str, version: str, module_text: str) -> Path:
    """A one-module wheel (``name``/__init__.py), written by hand: no build backend needed."""
    files = {
        f"{name}/__init__.py": module_text.encode(),
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: kmrun-tests\nRoot-Is-Purelib: true\n"
                                             b"Tag: py3-none-any\n",
    }
    record = [f"{path},sha256={_b64(data)},{len(data)}" for path, data in files.items()]
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    files[f"{name}-{version}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for inner, data in files.items():
            archive.writestr(inner, data)
    return path


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True, capture_output=True)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def editable(folder: Path, name: str, module_text: str) -> tuple[Path, list[Path]]:
    """``name`` installed as ``pip install -e`` installs it: its source stays in ``folder``
    (outside any project), found through a ``.pth`` file, and its dist-info says so in
    ``direct_url.json``. Returns the module's source file and what to remove to uninstall."""
    import json
    import sysconfig

    source = folder / name / "__init__.py"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text(module_text)
    site = Path(sysconfig.get_paths()["purelib"])
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "direct_url.json").write_text(json.dumps({"url": folder.resolve().as_uri(), "dir_info": {"editable": True}}))
    pth = site / f"__editable__.{name}-1.0.pth"
    pth.write_text(f"{folder.resolve()}\n")
    (info / "RECORD").write_text(f"{pth.name},,\n{info.name}/METADATA,,\n{info.name}/direct_url.json,,\n{info.name}/RECORD,,\n")
    return source, [pth, info]
