"""Packaging metadata and the source distribution's file list, checked without building (CPU, fast). The full
round trip (sdist -> fresh venv -> import with build_info()["built"]) is .ci/sdist_roundtrip, run by CI."""
import os
import re
from pathlib import Path

import pytest

import flashattn_ext

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_metadata_declares_torch_and_one_version_source():
    meta = pyproject()
    assert any(re.match(r"torch\b", d) for d in meta["project"]["dependencies"])
    assert "version" in meta["project"]["dynamic"] and "version" not in meta["project"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "flashattn_ext._version.__version__"}
    build_reqs = meta["build-system"]["requires"]
    assert any(r.startswith("torch") for r in build_reqs) and any(r.startswith("setuptools") for r in build_reqs)
    assert not re.search(r"\bversion\s*=", (ROOT / "setup.py").read_text()), "setup.py must not set a version"


def test_torch_requirement_is_the_same_everywhere():
    def torch_spec(lines):
        return {l.replace(" ", "") for l in lines if re.match(r"torch\b", l.strip())}
    reqs = torch_spec((ROOT / "requirements.txt").read_text().splitlines())
    meta = pyproject()
    assert reqs == torch_spec(meta["project"]["dependencies"]) == torch_spec(meta["build-system"]["requires"])


def sdist_file_list():
    """The files MANIFEST.in selects (plus setuptools' defaults for the package), computed as sdist does."""
    from setuptools.command.egg_info import FileList
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        files = FileList()
        files.findall()
        for line in (ROOT / "MANIFEST.in").read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                files.process_template_line(line)
        return set(files.files)
    finally:
        os.chdir(cwd)


def test_manifest_carries_every_build_source():
    listed = sdist_file_list()
    needed = [p for p in (ROOT / "csrc").rglob("*")
              if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".so", ".o", ".pyc")]
    assert needed, "csrc/ has no files?"
    missing = sorted(str(p.relative_to(ROOT)) for p in needed if str(p.relative_to(ROOT)) not in listed)
    assert not missing, f"MANIFEST.in leaves out: {missing[:20]}"
    for f in ("README.md", "requirements.txt", "setup.py", "pyproject.toml"):
        assert f in listed
    # headers in any csrc/ subfolder (the layout is being reorganised): the glob must be recursive
    assert any(f.endswith((".h", ".cuh")) for f in listed)
    assert not any(f.endswith(".so") for f in listed)


def test_version_is_readable_without_importing_torch():
    # setuptools reads attr: statically; the file must stay a plain assignment
    text = (Path(flashattn_ext.__file__).parent / "_version.py").read_text()
    assert re.search(r'^__version__ = "[^"]+"$', text, re.M)
