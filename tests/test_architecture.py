"""The house's rules, read from the source: packages by job, no import circle (function-local imports count), a
function-local import only for a heavy or optional module and tagged with why, no private name used across
modules, and tests that share helpers through tests/helpers/ rather than through each other."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what a function may import locally: loading them costs seconds, or they may be missing (on this system: fcntl,
# msvcrt)
HEAVY = {"torch", "transformers", "peft", "trl", "bitsandbytes", "gradio", "datasets", "accelerate",
         "huggingface_hub", "safetensors", "numpy", "pyarrow", "gguf", "jinja2", "sentencepiece", "playwright",
         "fastapi", "starlette", "uvicorn"}
OPTIONAL = {"fcntl", "msvcrt", "filelock", "llama_cpp", "liger_kernel", "pynvml", "convert_hf_to_gguf", "conversion", "kernels", "packaging"}
TOP_LIMIT = 15


def _modules() -> dict[str, Path]:
    files = sorted(ROOT.glob("core/**/*.py")) + sorted(ROOT.glob("ui/**/*.py")) + [ROOT / "app.py"]
    out = {}
    for path in files:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _targets(node, module: str) -> list[str]:
    """The modules an import statement loads, resolved against ours (`from core import x` may name a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".")
        if MODULES[module].name != "__init__.py":
            parts = parts[:-1]
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _ours(target: str) -> str | None:
    while target not in MODULES and "." in target:
        target = target.rsplit(".", 1)[0]
    return target if target in MODULES else None


def _imports(module: str):
    """(import node, is inside a function) for every import of a module."""
    tree = ast.parse(MODULES[module].read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            up, local = node, False
            while up in parents:
                up = parents[up]
                if isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    local = True
                    break
            yield node, local


def _graph() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for m in MODULES:
        for node, _ in _imports(m):
            for t in _targets(node, m):
                ours = _ours(t)
                if ours and ours != m:
                    graph[m].add(ours)
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _heavy_modules() -> set[str]:
    """Our modules that load a heavy or optional library when imported (module-level imports, transitively)."""
    direct = {}
    for m in MODULES:
        direct[m] = set()
        for node, local in _imports(m):
            if not local:
                direct[m].update(_targets(node, m))
    heavy = {m for m, ts in direct.items() if any(t.split(".")[0] in HEAVY | OPTIONAL for t in ts)}
    grew = True
    while grew:
        grew = False
        for m, ts in direct.items():
            if m not in heavy and any(_ours(t) in heavy for t in ts):
                heavy.add(m)
                grew = True
    return heavy


def test_no_import_circle_even_through_function_local_imports():
    assert _circles(_graph()) == []


def test_the_circle_check_can_fail():
    graph = _graph()
    graph["core.errors"].add("core.runs.folder")  # folder imports errors: this closes a circle
    assert any("core.errors" in c and "core.runs.folder" in c for c in _circles(graph))


def test_core_top_is_small_and_every_package_says_what_it_is_for():
    top = sorted(p.stem for p in (ROOT / "core").glob("*.py"))
    assert len(top) <= TOP_LIMIT, f"core/ holds {len(top)} modules at its top: {top}"
    packages = [p.parent for p in (ROOT / "core").glob("*/__init__.py")]
    assert {p.name for p in packages} >= {"data", "train", "runs", "estimate", "gguf", "commands"}
    for pkg in packages:
        doc = ast.get_docstring(ast.parse((pkg / "__init__.py").read_text()))
        assert doc and doc.strip(), f"core/{pkg.name}/__init__.py has no docstring saying what it is for"


def test_function_local_imports_are_only_for_heavy_or_optional_modules_and_say_so():
    heavy = _heavy_modules()
    wrong, untagged = [], []
    for m, path in MODULES.items():
        lines = path.read_text().splitlines()
        for node, local in _imports(m):
            if not local:
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            targets = _targets(node, m)
            if not any(t.split(".")[0] in HEAVY | OPTIONAL or _ours(t) in heavy for t in targets):
                wrong.append(f"{where} {ast.unparse(node)}")
            elif not any(w in lines[node.end_lineno - 1] for w in ("# heavy", "# optional")):
                untagged.append(where)
    assert not wrong, "light modules imported inside functions (import them at module level):\n" + "\n".join(wrong)
    assert not untagged, "function-local imports without '# heavy' / '# optional':\n" + "\n".join(untagged)


def test_no_module_uses_another_modules_private_name():
    used = []
    for m, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for node, _ in _imports(m):
            for alias, target in zip(node.names, _targets(node, m)):
                if isinstance(node, ast.ImportFrom) and _ours(target) and alias.name.startswith("_") \
                        and not alias.name.startswith("__"):
                    used.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name}")
                if _ours(target) == target:
                    aliases[(alias.asname or alias.name).split(".")[0]] = target
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and isinstance(node.value, ast.Name) and node.value.id in aliases:
                used.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value.id}.{node.attr}")
    assert not used, "\n".join(used)


def test_tests_share_helpers_through_tests_helpers_not_through_each_other():
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tests."):
                last = node.module.rsplit(".", 1)[-1]
                if last.startswith("test_"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module}")
    assert not offenders, "\n".join(offenders)
