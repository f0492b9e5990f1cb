"""The house stays as built: read from the code's imports (ast), no import circle among mgpu's modules,
``gateway/`` and ``gpu_worker/`` import only ``common/`` and themselves, ``common/`` imports neither
role, the runtime (``ops/`` included) never imports the benchmarks, no runtime file over 600 lines, and
no runtime function over 60 lines unless its docstring says why it is that long (it says "long" or
"on purpose")."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "gateway", "gpu_worker", "ops", "bench")
RUNTIME = ("common", "gateway", "gpu_worker", "ops")
ALLOWED = {  # what each package may import of the project
    "common": {"common"},
    "gateway": {"common", "gateway"},
    "gpu_worker": {"common", "gpu_worker"},
    "ops": {"common", "gateway", "gpu_worker", "ops"},
    "bench": {"common", "gateway", "gpu_worker", "ops", "bench"},
}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            rel = p.relative_to(ROOT).with_suffix("")
            mods[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = p
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project's modules it imports (anywhere in the file: lazy imports count)."""

    def resolve(name: str) -> str | None:
        while name:
            if name in mods:
                return name
            name = name.rpartition(".")[0]
        return None

    edges: dict[str, set[str]] = {}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        out: set[str] = set()
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            out |= {r for n in names if (r := resolve(n)) is not None and r != m}
        edges[m] = out
    return edges


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_no_import_circle() -> None:
    assert _circles(_imports(_modules())) == []


def test_roles_import_only_what_they_may() -> None:
    bad = sorted((m, t) for m, ts in _imports(_modules()).items() for t in ts
                 if t.split(".")[0] not in ALLOWED[m.split(".")[0]])
    assert bad == []


def test_the_checker_sees_a_circle_and_a_cross_role_import() -> None:
    edges = {"gateway.a": {"gateway.b"}, "gateway.b": {"gateway.a", "gpu_worker.x"}, "gpu_worker.x": set()}
    assert _circles(edges) == [["gateway.a", "gateway.b"]]
    assert [t for t in edges["gateway.b"] if t.split(".")[0] not in ALLOWED["gateway"]] == ["gpu_worker.x"]


def test_runtime_files_and_functions_stay_small() -> None:
    big_files, long_functions = [], []
    for m, p in _modules().items():
        if m.split(".")[0] not in RUNTIME:
            continue
        text = p.read_text()
        if len(text.splitlines()) > 600:
            big_files.append((str(p.relative_to(ROOT)), len(text.splitlines())))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if n > 60 and not re.search(r"\blong\b|on purpose", doc, re.IGNORECASE):
                    long_functions.append((f"{p.relative_to(ROOT)}:{node.lineno} {node.name}", n))
    assert big_files == []
    assert long_functions == []


def test_the_gateway_process_loads_neither_vllm_nor_torch() -> None:
    """The gateway stays thin: its app (and the CLI that starts it) import no engine code; a worker's vLLM
    validates what the gateway passes on."""
    import subprocess
    import sys

    code = ("import sys, gateway.app, gateway.factory, gateway.server, ops.cli; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'vllm', 'torch', 'transformers', 'numpy'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout
