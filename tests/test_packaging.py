"""The installable package: what the wheel holds, the declared dependencies, the requirements files,
``transfer-studio app`` and the Community Cloud entry point.

The wheel is built (not installed) from a copy of the repository, without build isolation, so the
test needs no network and leaves nothing behind; installing it into a virtual environment and using
the command is the README's manual check.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(path: Path = ROOT / "requirements.txt") -> list[str]:
    """The requirement strings of a requirements file (comments, blank lines and pip options left out)."""
    lines = (ln.split("#")[0].strip() for ln in path.read_text(encoding="utf-8").splitlines())
    return [ln for ln in lines if ln and not ln.startswith("-")]


def _declared() -> dict[str, str]:
    """Normalised distribution name to requirement string, runtime and optional dependencies alike."""
    from packaging.requirements import Requirement

    project = _pyproject()["project"]
    reqs = _requirements()
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {_norm(Requirement(r).name): r for r in reqs}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    src = tmp_path_factory.mktemp("src") / "transfer-studio"
    junk = shutil.ignore_patterns(".git", "build", "dist", "runs", "*.egg-info", "__pycache__", ".pytest_cache",
                                  "test-artifacts", ".venv", ".cache", "artifacts")
    shutil.copytree(ROOT, src, ignore=junk)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(src),
         "-w", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("transfer_studio-*.whl")
    with zipfile.ZipFile(path) as zf:
        yield zf


def test_wheel_holds_the_engine_the_studio_and_the_sample_data(wheel):
    names = set(wheel.namelist())
    expected = {"app.py", ".streamlit/config.toml", "tl_core/predict_template.py",
                "tl_core/export/web_assets/app.js", "tl_core/export/web_assets/ort-wasm-simd-threaded.wasm.gz"}
    # Every module of the engine and the UI, including sub-packages, and every page.
    for folder in ("tl_core", "ui", "pages"):
        expected |= {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*.py")}
    samples = {p.relative_to(ROOT).as_posix() for p in (ROOT / "sample_data" / "hymenoptera").rglob("*") if p.is_file()}
    assert len(samples) > 300
    expected |= samples
    assert not expected - names, sorted(expected - names)[:10]
    assert not any(n.startswith(("tests/", "bench/", "cloud/")) for n in names)


def test_wheel_declares_the_command_and_the_dependencies(wheel):
    meta_dir = next(n.split("/")[0] for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    entry_points = wheel.read(f"{meta_dir}/entry_points.txt").decode()
    assert re.search(r"^transfer-studio\s*=\s*tl_core\.cli:main$", entry_points, re.M)
    metadata = wheel.read(f"{meta_dir}/METADATA").decode()
    requires = {_norm(m.group(1)) for m in re.finditer(r"^Requires-Dist: ([A-Za-z0-9_.-]+)", metadata, re.M)}
    from packaging.requirements import Requirement

    # Exactly the one list in requirements.txt (plus the optional extras), read at build time.
    extras = {"umap-learn", "litert-torch", "ai-edge-litert"}
    assert requires == {_norm(Requirement(r).name) for r in _requirements()} | extras


def _third_party_imports() -> dict[str, list[str]]:
    """Top-level modules imported anywhere in the app and the engine, to the files importing them."""
    local = {"tl_core", "ui", "pages", "app", "sample_data"}
    files = [ROOT / "app.py", *(p for d in ("pages", "ui", "tl_core") for p in (ROOT / d).rglob("*.py"))]
    found: dict[str, list[str]] = {}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for m in mods:
                top = m.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local and top != "__future__":
                    found.setdefault(top, []).append(f.relative_to(ROOT).as_posix())
    return found


def test_every_imported_module_is_declared():
    declared = _declared()
    owners = importlib.metadata.packages_distributions()
    missing = {}
    for module, where in _third_party_imports().items():
        dists = {_norm(d) for d in owners.get(module, [])}
        if not dists:
            # Not installed here (an optional extra such as umap): it must still be declared by name.
            dists = {_norm({"umap": "umap-learn"}.get(module, module))}
        if not dists & declared.keys():
            missing[module] = (sorted(dists), where[:2])
    assert not missing, f"imported but not declared in requirements.txt: {missing}"


def test_installed_versions_meet_the_declared_floors():
    from packaging.requirements import Requirement

    for req in map(Requirement, _requirements()):
        if req.marker is not None and not req.marker.evaluate():
            continue
        version = importlib.metadata.version(req.name)
        assert req.specifier.contains(version, prereleases=True), f"{req.name} {version} does not satisfy {req}"


def test_requirements_are_the_one_list_and_the_cloud_ones_use_cpu_torch():
    from packaging.requirements import Requirement

    assert "dependencies" in _pyproject()["project"]["dynamic"]
    assert _pyproject()["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    assert "download.pytorch.org" not in (ROOT / "requirements.txt").read_text()
    assert "download.pytorch.org" not in (ROOT / "requirements-dev.txt").read_text()

    cloud = [ln.split("#")[0].strip() for ln in (ROOT / "cloud" / "requirements.txt").read_text().splitlines()]
    cloud = [ln for ln in cloud if ln]
    assert f"--extra-index-url {CPU_INDEX}" in cloud
    assert "-r ../requirements.txt" in cloud
    floors = {Requirement(r).name: Requirement(r) for r in _requirements()}
    pins = {Requirement(ln).name: Requirement(ln) for ln in cloud if not ln.startswith("-")}
    for name in ("torch", "torchvision"):
        (spec,) = pins[name].specifier
        assert spec.operator == "==" and spec.version.endswith("+cpu"), pins[name]
        assert floors[name].specifier.contains(spec.version), (pins[name], floors[name])


def test_app_command_runs_streamlit_on_the_studio_from_its_folder(tmp_path, monkeypatch):
    from tl_core.cli import app_command, build_parser, studio_root

    root = studio_root()
    assert (root / "app.py").is_file() and (root / ".streamlit" / "config.toml").is_file()
    monkeypatch.chdir(tmp_path)
    args, extra = build_parser().parse_known_args(["app", "--port", "8642", "--sample", "--server.maxUploadSize", "50"])
    args.streamlit_args = extra
    cmd, cwd = app_command(args)
    assert cwd == root
    assert cmd[:5] == [sys.executable, "-m", "streamlit", "run", str(root / "app.py")]
    assert cmd[cmd.index("--server.port") + 1] == "8642"
    assert cmd[cmd.index("--server.maxUploadSize") + 1] == "50"
    assert cmd[-2:] == ["--", "--sample"]
    args, _ = build_parser().parse_known_args(["app"])
    cmd, _ = app_command(args)
    assert "--" not in cmd and cmd[cmd.index("--server.port") + 1] == "8501"


def test_unknown_options_of_engine_commands_are_still_errors(capsys):
    from tl_core.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["backbones", "--server.port", "1"])
    assert exc.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_cloud_entry_point_runs_the_studio_and_its_navigation(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    # The entry point sets environment defaults and adds --sample to sys.argv, as it should in its own
    # server process; here they must not leak into the other tests of this process.
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TRANSFER_STUDIO_TRAINING_SLOTS", "TRANSFER_STUDIO_SESSION_GRACE"):
        monkeypatch.setenv(var, os.environ.get(var, "unset"))
        if os.environ[var] == "unset":
            monkeypatch.delenv(var)
    monkeypatch.setenv("TRANSFER_STUDIO_HOME", str(tmp_path / "home"))
    at = AppTest.from_file(str(ROOT / "cloud" / "streamlit_app.py"), default_timeout=180).run()
    assert os.environ["TRANSFER_STUDIO_TRAINING_SLOTS"] == "1" and "--sample" in sys.argv
    assert not at.exception, [e.value for e in at.exception]
    assert [t.value for t in at.title][:1] == ["Transfer Studio"]
    # Page paths must resolve although the entry point is not in the repository root.
    at.button(key="home_try_sample").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Data" in [t.value for t in at.title]
