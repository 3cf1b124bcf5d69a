"""The package's layers and the direction of their imports, read from the source with `ast`
(imports inside functions count too). Fails if, say, `jaxcls/model.py` imports from
`jaxcls.train` or a checkpoint reader imports the inference code (checked by planting such an
import)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "jaxcls"

# layer -> layers it must never import
CORE = ("config", "model", "lora", "tokenizer", "errors", "fileio", "metrics", "task", "shared_prefix",
        "download", "compile_cache", "generate", "cpu_gemm", "cpu_attention", "precision", "chunks")
FORBIDDEN = {
    "core": {"ckpt", "data", "train", "infer", "cli", "classifier"},
    "ckpt": {"data", "train", "infer", "cli", "classifier"},
    "data": {"ckpt", "train", "infer", "cli", "classifier", "model"},
    "train": {"ckpt", "infer", "cli", "classifier"},
    "infer": {"train", "cli", "classifier"},
    "classifier": {"cli"},
}


def layer_of(module: str) -> str:
    """'jaxcls.train.loop' -> 'train'; top-level modules of the core -> 'core'."""
    parts = module.split(".")
    first = parts[1] if len(parts) > 1 else ""
    return "core" if first in CORE else first


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = path
    return out


def imports_of(name: str, path: Path) -> set[str]:
    """Every jaxcls module `name` imports, resolved to the module (not the imported symbol)."""
    known = modules()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative import
                pkg = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join([*pkg, node.module])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t.startswith("jaxcls.") and t != name}
    return found


def test_layers_import_only_downward():
    bad = []
    for name, path in modules().items():
        layer = layer_of(name)
        for target in imports_of(name, path):
            if layer_of(target) in FORBIDDEN.get(layer, set()):
                bad.append(f"{name} imports {target}")
    assert not bad, "imports against the layer direction:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = {name: {t for t in imports_of(name, path) if t in modules()} for name, path in modules().items()}
    graph = {n: {t for t in ts if not n.startswith(t + ".")} for n, ts in graph.items()}  # a package's own face
    seen, stack, cycles = set(), [], []

    def visit(n):
        if n in stack:
            cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            return
        if n in seen:
            return
        seen.add(n)
        stack.append(n)
        for t in sorted(graph.get(n, ())):
            visit(t)
        stack.pop()

    for n in sorted(graph):
        visit(n)
    cycles = [c for c in cycles if ".__init__" not in c]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_only_the_cli_reads_argv():
    readers = [name for name, path in modules().items()
               if ("sys.argv" in path.read_text() or "import argparse" in path.read_text())
               and layer_of(name) != "cli" and name not in ("jaxcls.__main__",)]
    assert not readers, f"modules outside jaxcls.cli reading argv: {readers}"


@pytest.mark.parametrize("limit", [400])
def test_modules_stay_small(limit):
    """No module over ~400 lines (the reader's checkpoint format is the one split by section)."""
    big = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > limit}
    assert not big, f"modules over {limit} lines: {big}"


def test_functions_stay_short():
    """No function over ~60 lines unless a `# long:` comment beside its def says why."""
    long = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                around = " ".join(lines[max(node.lineno - 3, 0):node.lineno + 1])
                if n > 60 and "# long:" not in around:
                    long.append(f"{name}.{node.name} ({n} lines)")
    assert not long, "functions over 60 lines without a reason: " + ", ".join(long)


def test_classify_imports_only_what_it_runs():
    """What `jaxcls classify` imports before it loads a model (the package, the CLI, the classifier
    facade, the input reader) leaves out the training layer, pandas and scipy, which load on first
    use; every name in `jaxcls.__all__` still resolves. Fails if the package imports its layers up
    front again (planted: `from jaxcls.train import fit` at the top of jaxcls/__init__.py) or the
    SMS reader imports pandas at module level (planted: `import pandas as pd` at the top of
    jaxcls/data/sms.py)."""
    import subprocess
    import sys

    code = ("import sys, jaxcls, jaxcls.cli.predict, jaxcls.classifier, jaxcls.infer.io\n"
            "print(sorted(m for m in ('jaxcls.train', 'pandas', 'scipy.special', 'scipy.stats') if m in sys.modules))\n"
            "assert all(getattr(jaxcls, n) is not None for n in jaxcls.__all__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=PKG.parent)
    assert r.returncode == 0, r.stderr[-1000:]
    assert r.stdout.strip() == "[]", r.stdout
