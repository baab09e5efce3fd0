"""The installed shape of kdlab: one top-level package, importable beside a user's own `train`, fast to start.

Run: .venv/bin/python -m pytest -q tests/test_package.py
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import kdlab
from kdlab.search.registry import code_package

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("distill", "eval", "scripts", "search", "tasks", "train")


def run_python(code: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_the_wheel_holds_kdlab_alone_with_every_layer(tmp_path):
    # Built from a copy of the sources: setuptools writes build/ and *.egg-info beside the project it builds.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info",
                                                             "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True, timeout=600)
    [wheel] = tmp_path.glob("kdlab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"kdlab"}
    for layer in LAYERS:
        assert f"kdlab/{layer}/__init__.py" in names
    assert {"kdlab/__init__.py", "kdlab/__main__.py", "kdlab/train/distill.py", "kdlab/scripts/cli.py"} <= set(names)
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["kdlab"]


def test_kdlab_imports_beside_a_users_own_train_and_scripts_packages(tmp_path):
    for name in ("train", "scripts"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"OWNER = 'user {name}'\n")
    code = ("import train, scripts, kdlab, kdlab.train.loop, kdlab.scripts.cli\n"
            "print(train.OWNER, scripts.OWNER, kdlab.__version__, kdlab.train.loop.__name__)")
    proc = run_python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["user", "train", "user", "scripts", kdlab.__version__, "kdlab.train.loop"]


def test_version_and_module_entry_point(tmp_path):
    kdlab_bin = Path(sys.executable).with_name("kdlab")
    for cmd in ([str(kdlab_bin), "--version"], [sys.executable, "-m", "kdlab", "--version"]):
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert (proc.returncode, proc.stdout) == (0, f"kdlab {kdlab.__version__}\n"), proc.stderr
    # --version and --help load neither torch nor transformers (they cost seconds; the budget is < 1 s).
    proc = run_python("import sys; from kdlab.scripts.cli import build_parser; build_parser()\n"
                      "print(sorted(m for m in ('torch', 'transformers', 'mlflow', 'optuna') if m in sys.modules))",
                      tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:]


def test_the_api_names_are_public_and_resolve():
    assert set(kdlab.__all__) >= {"__version__", "load_config", "run_distill", "run_gate", "run_search",
                                  "run_export", "run", "load_export", "predict", "ConfigError", "ExportError"}
    for name in kdlab.__all__:
        assert getattr(kdlab, name) is not None, name
    assert set(kdlab.__all__) <= set(dir(kdlab))


def test_the_pyfunc_code_path_is_kdlab_with_distill_eval_and_tasks_only(tmp_path):
    """The tasks load and run an export's artefact (kdlab.distill.task), so the pyfunc carries them too."""
    package = code_package(tmp_path / "code")
    assert package.name == "kdlab"
    assert sorted(p.name for p in package.iterdir()) == ["__init__.py", "distill", "eval", "tasks"]
    assert not list(package.rglob("__pycache__"))
    # From that copy alone: the serving code imports, and nothing else of kdlab is there to be found.
    # The editable install's finder would resolve kdlab.train to the repository: leave it out, as in a model
    # server where kdlab is not installed.
    code = ("import sys\nsys.meta_path[:] = [f for f in sys.meta_path if '_EditableFinder' not in repr(f)]\n"
            "import kdlab.distill.export as e, kdlab.distill.mlflow_model as m\n"
            "from kdlab.distill.task import load_task\n"
            "print(e.__file__)\n"
            "print(*(sys.modules[type(load_task(t)).__module__].__file__ for t in ('classification', 'seq2seq')))\n"
            "try:\n    import kdlab.train\nexcept ModuleNotFoundError:\n    print('no kdlab.train')\n")
    proc = run_python(code, tmp_path, PYTHONPATH=str(tmp_path / "code"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [str(package / "distill" / "export.py"),
                                        f"{package / 'tasks' / 'classification.py'} {package / 'tasks' / 'seq2seq.py'}",
                                        "no kdlab.train"]
