"""The import rules of docs/ARCHITECTURE.md hold for every import in fapo_megatron/ (lazy ones included),
and worker groups are called by typed methods outside cluster/.

The table there is the rule; this test parses it and scans the package's syntax trees with `ast`, so a rule is
changed by editing the doc, and an import the doc does not allow fails here, naming file, line and rule.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "fapo_megatron"
RESTRICTED = ("megatron", "sglang", "ray")
"""Third-party packages only some units may import; the doc's third column names them."""


def read_rules() -> dict[str, tuple[set[str], set[str]]]:
    """unit -> (units of fapo_megatron it may import, restricted third-party packages it may import)."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("## Import rules", 1)[1].split("\n## ", 1)[0]
    rules = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue

        def names(cell):
            return set() if cell == "-" else {name.strip() for name in cell.split(",")}

        rules[cells[0].strip("`")] = (names(cells[1]), names(cells[2]))
    return rules


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path, module: str | None = None) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement in the file (`module`), wherever it sits."""
    module = module or module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from fapo_megatron.pkg import module` imports that module too.
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names if _is_module(target, alias)]
    return found


def _is_module(target: str, alias: ast.alias) -> bool:
    if not target.startswith("fapo_megatron"):
        return False
    base = ROOT.joinpath(*target.split("."), alias.name)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_doc_has_a_rule_table_and_it_is_one_way():
    rules = read_rules()
    assert {"config", "trainer", "genrm", "engines", "engine_protocol"} <= set(rules), sorted(rules)
    unknown = {dep for allowed, _ in rules.values() for dep in allowed} - set(rules)
    assert not unknown, f"the import rules name units that have no row: {sorted(unknown)}"
    bad = {ext for _, restricted in rules.values() for ext in restricted} - set(RESTRICTED)
    assert not bad, f"restricted column names {sorted(bad)}; the restricted packages are {RESTRICTED}"
    assert _cycle({unit: allowed for unit, (allowed, _) in rules.items()}) is None


def test_every_import_follows_the_rules():
    rules = read_rules()
    units = {unit_of(module_name(path)) for path in package_files()}
    assert units <= set(rules), f"units with no row in docs/ARCHITECTURE.md: {sorted(units - set(rules))}"
    violations = []
    for path in package_files():
        unit = unit_of(module_name(path))
        allowed, restricted = rules[unit]
        for line, target in imports_of(path):
            top = target.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{line} imports {target}"
            if target == "fapo_megatron":
                continue  # `from fapo_megatron import module`: the module itself is checked as its own entry
            if top == "fapo_megatron":
                other = unit_of(target)
                if other != unit and other not in allowed:
                    violations.append(f"{where}: `{unit}` may import {sorted(allowed) or 'nothing'} of the package")
            elif top in RESTRICTED and top not in restricted:
                violations.append(f"{where}: only units whose row names {top} may import it")
    assert not violations, "\n".join(violations)


def test_no_import_cycle_between_modules():
    graph: dict[str, set[str]] = defaultdict(set)
    modules = {module_name(path) for path in package_files()}
    for path in package_files():
        for _, target in imports_of(path):
            if target in modules and target != module_name(path) and not _is_ancestor(target, module_name(path)):
                graph[module_name(path)].add(target)
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _is_ancestor(package: str, module: str) -> bool:
    """A module importing its own package's __init__ (e.g. for a re-export) is no cycle of concerns."""
    return module.startswith(package + ".")


def _cycle(graph) -> list[str] | None:
    """One cycle of `graph` (node -> successors) as a closed path, or None when it is acyclic."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for succ in sorted(graph.get(node, ())):
            if state.get(succ) == 1:
                return stack[stack.index(succ) :] + [succ]
            if succ not in state and (found := visit(succ)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.mark.parametrize(
    ("graph", "acyclic"),
    [({"a": {"b"}, "b": {"c"}}, True), ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, False), ({"a": {"a"}}, False)],
)
def test_cycle_finder(graph, acyclic):
    assert (_cycle(graph) is None) == acyclic


def test_lazy_and_relative_imports_are_seen(tmp_path):
    """The scanner sees imports inside functions and relative ones (a rule check would otherwise miss them)."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from fapo_megatron.engines import sglang\n    from ..cluster import pools\n")
    targets = [target for _, target in imports_of(source, "fapo_megatron.genrm.probe")]
    assert targets == [
        "fapo_megatron.engines",
        "fapo_megatron.engines.sglang",
        "fapo_megatron.cluster",
        "fapo_megatron.cluster.pools",
    ]


def test_workers_are_called_by_typed_methods_outside_cluster():
    """Dispatch by method name (`WorkerGroup.call("train_step")`) only inside cluster/ (cluster/role_groups.py)."""
    dispatch = {"call", "call_async", "call_each", "call_rank"}
    found = []
    for path in package_files():
        if unit_of(module_name(path)) == "cluster":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in dispatch:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.func.attr}(...)")
    assert not found, "\n".join(found)
