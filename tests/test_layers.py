"""Kiln's packages import only downward, without cycles (read from the source, lazy imports included).

    formats     file formats and the error type: imports no other Kiln package
    schedules   TIR schedules and kernels: formats
    model_defs  Relax model definitions: formats (the attention kernels are handed in by the compiler)
    compile     the compiler: formats, model_defs, schedules
    runtime     the serving runtime: formats, and compile/ only for nvcc at load and compile-on-first-use
Nothing imports the engine but the CLIs and the server.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("formats", "schedules", "model_defs", "compile", "runtime")
ALLOWED = {
    "formats": set(),
    "schedules": {"formats"},
    "model_defs": {"formats"},
    "compile": {"formats", "model_defs", "schedules"},
    "runtime": {"formats", "compile"},
}
ENGINE_USERS = {"runtime.cli", "runtime.chat", "runtime.complete", "runtime.serve", "runtime.metrics"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Kiln module → every module it imports anywhere in its source (function bodies included)."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")
                base = base[:len(base) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                # `from pkg import sub` names a module where pkg/sub.py exists, else an attribute of pkg
                targets |= {f"{module}.{a.name}" if f"{module}.{a.name}" in files else module for a in node.names}
        graph[name] = targets - {name}
    return graph


IMPORTS = _imports()
GRAPH = {m: {t for t in targets if t in IMPORTS} for m, targets in IMPORTS.items()}  # Kiln modules only


def test_graph_reads_every_package():
    """The parser sees the packages and their imports (else the tests below would pass vacuously)."""
    assert {m.split(".")[0] for m in GRAPH} == set(PACKAGES)
    assert "formats.errors" in GRAPH["compile.driver"] and "runtime.model_runner" in GRAPH["runtime.engine"]


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_downward(package):
    wrong = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() if m.split(".")[0] == package
                   for t in targets if t.split(".")[0] not in ALLOWED[package] | {package})
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package])}: {wrong}"


def test_no_import_cycles():
    """Depth-first search for a back edge over the module graph."""
    state, cycles = {}, []

    def visit(module, path):
        state[module] = "open"
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_only_clis_and_server_import_the_engine():
    users = {m for m, targets in GRAPH.items() if "runtime.engine" in targets}
    assert users and users <= ENGINE_USERS, sorted(users - ENGINE_USERS)


def test_only_the_model_runner_touches_tvm_in_the_runtime():
    """The engine, scheduler and server think in sequences and token ids (runtime/model_runner.py; for
    tensor parallelism its Disco workers, runtime/tp_worker.py, and their glue and NCCL binding)."""
    users = {m for m, targets in IMPORTS.items() if m.startswith("runtime")
             and any(t.split(".")[0] in ("tvm", "tvm_ffi") for t in targets)}
    assert users and users <= {"runtime.model_runner", "runtime.artifact", "runtime.tp_worker", "runtime.disco",
                               "runtime.ccl_nccl"}, sorted(users)


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env=os.environ | {"PYTHONPATH": str(ROOT)})
    return set(out.stdout.split())


def test_model_config_loads_no_runtime():
    """The model definitions' config is usable alone: no engine, server, tokenizer or TVM runtime objects."""
    loaded = _loaded_after("import model_defs.config")
    assert "model_defs.config" in loaded
    heavy = {m for m in loaded if m.split(".")[0] in ("runtime", "tokenizers", "fastapi", "tvm", "compile")}
    assert not heavy, sorted(heavy)


def test_engine_loads_no_compiler():
    """The engine runs on the runtime-only TVM site: it must not pull in TVM, the compiler or the model defs."""
    loaded = _loaded_after("import runtime.engine")
    assert "runtime.engine" in loaded
    wrong = {m for m in loaded if m.split(".")[0] in ("tvm", "compile", "model_defs", "schedules")}
    assert not wrong, sorted(wrong)


def test_runtime_package_loads_the_engine_lazily():
    loaded = _loaded_after("import runtime.tokenizer; from runtime import KilnError")
    assert "runtime.tokenizer" in loaded and "runtime.engine" not in loaded
    assert "runtime.engine" in _loaded_after("from runtime import Engine")
