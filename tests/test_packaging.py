"""The distribution is one import package, `cptrain`, whose modules import each other bottom-up only:
no circles, model and data know nothing of training, the loop nothing of the commands, analysis
nothing of the engines. The import graph is read from the source (every import, also the ones inside
functions), so a lazy import cannot hide a circle. The wheel holds that package and its data only, and
installed from it (not editable) the `cptrain` command runs the demo."""
import argparse
import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FOLDERS = ("model", "data_pipeline", "trainer", "launch")


def _modules() -> dict[str, Path]:
    """cptrain module name -> file, for the root package and every folder it maps."""
    out = {"cptrain": REPO / "__init__.py", "cptrain.errors": REPO / "errors.py"}
    for folder in FOLDERS:
        for f in (REPO / folder).rglob("*.py"):
            parts = f.relative_to(REPO).with_suffix("").parts
            name = ".".join(("cptrain",) + (parts[:-1] if parts[-1] == "__init__" else parts))
            out[name] = f
    return out


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """The cptrain modules that module `name` (file `path`) imports, anywhere in the file."""
    package = name if path.name == "__init__.py" or name == "cptrain" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from ..model import x` inside cptrain.trainer
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for n in names:
            while n and n not in modules:
                n = n.rpartition(".")[0]
            if n.startswith("cptrain.") or n == "cptrain":
                found.add(n)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = _imports(name, path, modules) - {name}
        # A package's __init__ is imported with each of its modules: only a real edge counts.
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    return graph


def test_pyproject_lists_every_package():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {"cptrain"} | {"cptrain." + ".".join(p.parent.relative_to(REPO).parts)
                             for folder in FOLDERS for p in (REPO / folder).rglob("__init__.py")}
    assert listed == on_disk


def test_no_import_circles():
    graph = _graph()
    assert sum(map(len, graph.values())) > 100  # the imports were read
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_layers_read_bottom_up():
    graph = _graph()

    def reach(prefix: str) -> dict[str, set[str]]:
        return {m: deps for m, deps in graph.items() if m == prefix or m.startswith(prefix + ".")}

    for low in ("cptrain.model", "cptrain.data_pipeline"):
        for m, deps in reach(low).items():
            bad = {d for d in deps if d.startswith(("cptrain.trainer", "cptrain.launch"))}
            assert not bad, f"{m} imports {bad}: model and data know nothing of training or commands"
    for m, deps in reach("cptrain.trainer").items():
        bad = {d for d in deps if d.startswith("cptrain.launch")}
        assert not bad, f"{m} imports {bad}: the trainer knows nothing of the commands that call it"
    for m, deps in reach("cptrain.trainer.analysis").items():
        bad = {d for d in deps if d.startswith(("cptrain.trainer.engines", "cptrain.trainer.loop"))}
        assert not bad, f"{m} imports {bad}: analysis reads run directories and imports no engine"


def test_installed_package_outside_the_checkout(tmp_path):
    code = ("import importlib.util, cptrain.trainer.loop, cptrain.launch.cli; "
            "print(all(importlib.util.find_spec(n) is None for n in ('model', 'trainer', 'launch', 'data_pipeline')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr
    for cmd in ([sys.executable, "-m", "cptrain.launch.cli", "--help"], [str(Path(sys.executable).with_name("cptrain")), "--help"]):
        r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0 and "continual pretraining" in r.stdout, r.stderr


def _command_bodies(parser: argparse.ArgumentParser) -> dict[str, object]:
    """Every subcommand's `func`, by its words (`data prepare`)."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if "func" in sub._defaults:
                    out[name] = sub._defaults["func"]
                out.update({f"{name} {k}": f for k, f in _command_bodies(sub).items()})
    return out


@pytest.mark.packaging
def test_the_cli_reaches_its_commands_by_reference_and_builds_without_torch():
    """The parsers name functions of launch/commands.py (imports the layering test reads), and building
    them imports no torch: `cptrain --help` stays instant."""
    from cptrain.launch import cli, commands

    bodies = _command_bodies(cli.build_parser())
    assert {"train", "data prepare", "convert cptrain-to-hf", "scaling fit", "eval", "demo"} <= set(bodies)
    assert all(getattr(commands, f.__name__, None) is f for f in bodies.values()), bodies
    code = "import sys, cptrain.launch.cli as c; c.build_parser(); print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


# ---- the distribution as a user gets it: a wheel built from the sources, installed (not editable) in a
# fresh venv, whose `cptrain` command runs the demo from a directory outside the checkout.
SKIP_IN_COPY = {"build", "dist", "__pycache__", "runs", "demo_out", "bench_out"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel pip builds from a copy of the checkout (a build writes build/ and egg-info beside the
    sources, and a stale build/ could hide a missing file)."""
    src, out = tmp_path_factory.mktemp("src") / "cptrain", tmp_path_factory.mktemp("wheel")
    shutil.copytree(REPO, src, ignore=lambda _, names: [n for n in names if n.startswith(".") or n in SKIP_IN_COPY
                                                        or n.endswith(".egg-info")])
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(out), str(src)], check=True, capture_output=True)
    (built,) = out.glob("cptrain-*.whl")
    return built


@pytest.mark.packaging
def test_wheel_holds_the_package_and_its_data_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = wheel.name.split("-py3")[0] + ".dist-info/"
    assert all(n.startswith(("cptrain/", dist_info)) for n in names), [n for n in names if not n.startswith("cptrain/")]
    assert {n for n in names if n.endswith(".py")} == {f"cptrain/{f.relative_to(REPO)}" for f in _modules().values()}
    data = [REPO / "data_pipeline" / "demo", REPO / "trainer" / "configs"]  # the demo's texts and the shipped configs
    assert {f"cptrain/{f.relative_to(REPO)}" for folder in data for f in folder.iterdir()} <= set(names)
    assert not [n for n in names if n.split("/")[1] in ("tests", "bench", "docs")]
    assert f"{dist_info}entry_points.txt" in names


@pytest.mark.packaging
def test_installed_wheel_runs_the_demo_outside_the_checkout(wheel, tmp_path):
    """The wheel installed with --no-deps into a fresh venv that sees this environment's packages
    through a .pth line (not as a site dir, so the editable install's finder stays out)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c", "import cptrain; print(cptrain.__file__)"], cwd=tmp_path, env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).is_relative_to(purelib), where
    out = tmp_path / "demo"
    r = subprocess.run([str(venv / "bin" / "cptrain"), "demo", "--out", str(out), "--steps", "4", "--continual-steps", "2"],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "first loss" in r.stdout and "Forgetting report" in r.stdout
    assert (out / "loss.png").stat().st_size > 0 and (out / "runs" / "continual" / "forgetting.md").is_file()
