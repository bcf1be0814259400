"""The house rules, checked so that a change that breaks them fails CI instead of waiting for a
review: sizes of modules, classes and functions; state with an owner; tests reach inside only
through the seam; benchmarks on the public API; docs sized to be read. The import layers (no
loops) are ``lint-imports``'s, in the test command."""

from __future__ import annotations

import ast
import functools
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "sa3loader"
MODULE_LINES, CLASS_LINES, FUNCTION_CODE_LINES = 500, 200, 60
# The longest chain of module-level imports inside the package (``__init__`` -> ... -> ``errors``);
# an import under TYPE_CHECKING names a type a caller hands in, and does not run.
IMPORT_CHAIN = 6
DOC_BYTES = {
    "README.md": 8_000,
    "docs/design.md": 15_000,
    "tests/README.md": 8_000,
    "benchmarks/README.md": 10_000,
}
ALL_MARKDOWN_BYTES = 45_000
BENCH_LOAD_LINES = 400
# Module-level state that stays, each with its owner and why (at most two pieces).
ALLOWED_STATE = {
    "_faults": "the test seam: a hook, faked facts and tuned sizes, all empty in production",
}


def modules() -> list[Path]:
    return sorted(PACKAGE.glob("*.py"))


def code_lines(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of code in a function: no docstring, blank lines or comments."""
    body = node.body
    start = body[0].lineno
    if ast.get_docstring(node, clean=False) is not None:
        start = body[0].end_lineno + 1  # type: ignore[operator]
    return sum(
        1 for line in lines[start - 1 : node.end_lineno] if line.strip() and not line.strip().startswith("#")
    )


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.name)
def test_modules_classes_and_functions_are_sized_to_be_read(path):
    source = path.read_text()
    lines = source.splitlines()
    assert len(lines) <= MODULE_LINES, f"{path.name}: {len(lines)} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            assert node.end_lineno - node.lineno + 1 <= CLASS_LINES, f"{path.name}: class {node.name}"
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert code_lines(lines, node) <= FUNCTION_CODE_LINES, f"{path.name}: {node.name}"


MUTABLE_CALLS = {"dict", "list", "set", "local", "defaultdict", "OrderedDict", "deque"}
MUTATIONS = {"append", "add", "update", "clear", "pop", "setdefault", "extend", "remove", "discard", "insert"}


def module_state(path: Path) -> set[str]:
    """Module-level dicts, lists and sets that the package mutates, module-level thread-locals,
    and names rebound with ``global``."""
    tree = ast.parse(path.read_text())
    candidates, thread_locals = set(), set()
    for node in tree.body:
        if not isinstance(node, (ast.Assign, ast.AnnAssign)) or node.value is None:
            continue
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        names = {t.id for t in targets if isinstance(t, ast.Name)}
        value = node.value
        called = (
            getattr(value.func, "attr", getattr(value.func, "id", "")) if isinstance(value, ast.Call) else ""
        )
        if isinstance(value, (ast.Dict, ast.List, ast.Set)) or called in MUTABLE_CALLS:
            candidates |= names
        if called == "local":
            thread_locals |= names
    state = {name for node in ast.walk(tree) if isinstance(node, ast.Global) for name in node.names}
    return state | (candidates & mutated_names()) | thread_locals


@functools.cache
def mutated_names() -> frozenset[str]:
    """Names the package calls a mutating method of, or assigns or deletes an item of (the
    package read once: once per module took 18 s)."""
    names = set()
    for node in ast.walk(ast.parse("\n".join(p.read_text() for p in modules()))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in MUTATIONS
        ):
            if isinstance(node.func.value, ast.Name):
                names.add(node.func.value.id)
        for target in getattr(node, "targets", []) if isinstance(node, (ast.Assign, ast.Delete)) else []:
            if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name):
                names.add(target.value.id)
    return frozenset(names)


def test_module_level_mutable_state_has_an_owner():
    """At most two pieces of module-level mutable state; everything else is held by an object
    that owns it (and its fork behaviour)."""
    found = {path.stem: module_state(path) for path in modules()}
    found = {module: names for module, names in found.items() if names}
    assert set(found) <= set(ALLOWED_STATE), found
    assert len(ALLOWED_STATE) <= 2


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in modules():
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        graph[path.stem] = deps & {p.stem for p in modules()} - {path.stem}
    return graph


def test_import_chains_stay_short():
    graph = import_graph()

    @functools.cache
    def longest(module: str) -> int:
        return 1 + max((longest(d) for d in graph[module]), default=0)

    chain = max(longest(m) for m in graph)
    assert chain <= IMPORT_CHAIN, f"the longest import chain is {chain} modules"


def package_names(tree: ast.Module) -> set[str]:
    """Names a test file binds to sa3loader or one of its modules (``from sa3loader import
    _convert``, ``import sa3loader._io as io``), the seam's module left out."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sa3loader":
            names |= {a.asname or a.name for a in node.names if a.name != "_faults"}
        elif isinstance(node, ast.Import):
            names |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("sa3loader")}
    return names


def patches_inside_the_package(source: str) -> list[str]:
    """Each place ``source`` replaces a name inside sa3loader: ``setattr`` (monkeypatch's or the
    builtin) on a name bound to the package, a dotted-string target naming it, an assignment to
    one of its attributes."""
    tree = ast.parse(source)
    names = package_names(tree)

    def inside(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value.startswith("sa3loader.") and not node.value.startswith("sa3loader._faults.")
        while isinstance(node, ast.Attribute):
            node = node.value
        return isinstance(node, ast.Name) and node.id in names

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "setattr",
            "patch",
            "delattr",
        ):
            if node.args and inside(node.args[0]):
                found.append(f"line {node.lineno}")
        for target in node.targets if isinstance(node, ast.Assign) else []:
            if isinstance(target, ast.Attribute) and inside(target.value):
                found.append(f"line {node.lineno}")
    return sorted(found, key=lambda where: int(where.split()[1]))


def test_no_test_replaces_a_name_inside_the_package_but_through_the_seam():
    """Tests reach inside only through ``sa3loader._faults`` (``tests/support/faults.py``):
    a restructuring then breaks no test that checks nothing about it."""
    for path in sorted((REPO / "tests").rglob("*.py")):
        assert not patches_inside_the_package(path.read_text()), (
            path.name,
            patches_inside_the_package(path.read_text()),
        )
    caught = patches_inside_the_package(
        "import sa3loader\nfrom sa3loader import _convert, _faults as f\nimport sa3loader._io as io\n"
        "monkeypatch.setattr(_convert, 'x', 1)\nmonkeypatch.setattr('sa3loader.loader.y', 2)\n"
        "sa3loader.loader.z = 3\nsetattr(io, 'w', 4)\nmonkeypatch.setattr(f, 'hook', None)\n"
        "monkeypatch.setattr(os, 'stat', None)\n"
    )
    assert caught == ["line 4", "line 5", "line 6", "line 7"]  # the seam and os are fine


def test_benchmarks_use_the_public_api_and_stay_readable():
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in getattr(node, "names", [])]
                if isinstance(node, ast.Import)
                else []
            )
            assert not any(n.startswith("sa3loader._") for n in names), f"{path.name} imports {names}"
    assert len((REPO / "benchmarks" / "bench_load.py").read_text().splitlines()) < BENCH_LOAD_LINES


def markdown_files() -> list[Path]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "*.md"], cwd=REPO, capture_output=True, text=True, check=True
        )
        return [REPO / line for line in listed.stdout.split()]
    except (OSError, subprocess.CalledProcessError):  # not a checkout: every Markdown file but a venv's
        return [p for p in REPO.rglob("*.md") if ".venv" not in p.parts]


def test_docs_are_sized_to_be_read():
    for name, limit in DOC_BYTES.items():
        size = len((REPO / name).read_bytes())
        assert size <= limit, f"{name}: {size} bytes, over {limit}"
    total = sum(len(p.read_bytes()) for p in markdown_files())
    assert total <= ALL_MARKDOWN_BYTES, f"all Markdown: {total} bytes"


def test_tests_that_run_as_another_user_see_a_private_checkout():
    """A checkout cloned into a private home (0700): the service user cannot reach it, so the
    baked-image tests skip saying so, rather than fail to start their zygote."""
    import shutil
    import tempfile

    from support.processes import hidden_from_others

    root = Path(tempfile.mkdtemp(prefix="sa3loader-home-"))  # in /tmp, which all may traverse
    try:
        root.chmod(0o755)
        (root / "home" / "repo").mkdir(parents=True)
        source = root / "home" / "repo" / "x.py"
        source.write_text("")
        source.chmod(0o644)
        assert hidden_from_others(source) is None
        (root / "home").chmod(0o700)
        assert hidden_from_others(source) == str(root / "home")
        (root / "home").chmod(0o755)
        source.chmod(0o600)
        assert hidden_from_others(source) == str(source)
    finally:
        shutil.rmtree(root)
