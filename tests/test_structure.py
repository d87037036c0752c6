"""The package's import graph, read from the source: no cycle (imports inside functions included), and the layers
point down: the modules layer (prefix, bank, hidden-state prefixes) never imports ``integrations/``, the op layer
never imports the modules layer or ``integrations/``."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "prefix_attn")

MODULES_LAYER = {"prefix_attn.prefix", "prefix_attn.bank", "prefix_attn.hidden", "prefix_attn.prefix_shape",
                 "prefix_attn.peft_format"}
OP_LAYER = {"prefix_attn.ops", "prefix_attn.varlen", "prefix_attn.checks", "prefix_attn.backends",
            "prefix_attn.dropout", "prefix_attn.reference", "prefix_attn.cpu", "prefix_attn.build_config"}


def _module_name(path):
    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _graph():
    """{module: {package modules it imports}}, every import statement (top level or inside a function)."""
    names = {}
    for base, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                names[_module_name(os.path.join(base, f))] = os.path.join(base, f)
    graph = {}
    for mod, path in names.items():
        package = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    anchor = ".".join(parts[: len(parts) - node.level + 1])
                    src = f"{anchor}.{node.module}" if node.module else anchor
                else:
                    src = node.module or ""
                # `from pkg import module` depends on the module; `from module import name` on the module
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in names else src for a in node.names]
            for t in targets:
                # a module's own packages are imported before it anyway (and `from . import _C` names the extension)
                if t in names and t != mod and not mod.startswith(t + "."):
                    deps.add(t)
        graph[mod] = deps
    return graph


def _cycle(graph):
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_graph_is_read():
    graph = _graph()
    # the reader sees real edges (a reader that found none would pass the other tests vacuously)
    assert "prefix_attn.ops" in graph["prefix_attn.varlen"]
    assert "prefix_attn.integrations.binding" in graph["prefix_attn.integrations.hooks"]
    assert "prefix_attn.hidden" in graph["prefix_attn.prefix"]


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("layer,forbidden", [
    (MODULES_LAYER, ("prefix_attn.integrations",)),
    (OP_LAYER, ("prefix_attn.integrations", *sorted(MODULES_LAYER))),
])
def test_imports_point_down(layer, forbidden):
    graph = _graph()
    bad = sorted((m, d) for m in layer for d in graph[m] if d.startswith(forbidden))
    assert not bad, bad


def test_a_wheel_ships_the_cpu_kernel_sources(tmp_path):
    """A wheel built without the kernel (PREFIX_ATTN_SKIP_BUILD=1) carries csrc/ as prefix_attn/_csrc/, where the JIT
    loader finds it (build_config.CANDIDATE_DIRS)."""
    import glob
    import shutil
    import subprocess
    import sys
    import zipfile

    repo = os.path.dirname(ROOT)
    src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info next to setup.py
    shutil.copytree(repo, src, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.so", "__pycache__",
                                                             "*.egg-info", "benchmarks", "docs", "examples"))
    env = dict(os.environ, PREFIX_ATTN_SKIP_BUILD="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheel"), str(src)], check=True, env=env, capture_output=True)
    (wheel,) = glob.glob(str(tmp_path / "wheel" / "*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in glob.glob(os.path.join(repo, "csrc", "*")):
        assert f"prefix_attn/_csrc/{os.path.basename(path)}" in names
    assert "prefix_attn/build_config.py" in names
