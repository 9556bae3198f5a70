"""The package's import graph has no cycles, counting imports inside functions too (so a cycle
cannot be hidden by moving an import into a function body)."""
import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parents[1] / "mplug_jax"


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: mplug_jax modules it imports anywhere in its body}."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in mods and t != name)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert "mplug_jax.trainer" in graph and "mplug_jax.tasks.pretrain" in graph
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# The layers, bottom up. A module belongs to a layer when its name starts with one of the
# layer's prefixes (a package prefix covers its submodules).
MODELS = ("mplug_jax.models", "mplug_jax.mplug2.model", "mplug_jax.mplug2.heads",
          "mplug_jax.mplug2.vision")
DATA = ("mplug_jax.data", "mplug_jax.mplug2.input", "mplug_jax.mplug2.pretrain_input")
INTEROP = ("mplug_jax.interop", "mplug_jax.mplug2.convert", "mplug_jax.mplug2.keys")
STORAGE = ("mplug_jax.checkpoint", "mplug_jax.workdir", "mplug_jax.task_names")
SCORING = ("mplug_jax.scoring", "mplug_jax.evaluators")
# mplug_jax.scst: the SCST mixin of the caption tasks (outside tasks/: not a task of its own).
TASKS = ("mplug_jax.tasks", "mplug_jax.mplug2.tasks", "mplug_jax.scst")
PARITY = ("mplug_jax.parity", "mplug_jax.mplug2.parity")
TOP = ("mplug_jax.trainer", "mplug_jax.evaluate", "mplug_jax.predict", "mplug_jax.cli",
       "mplug_jax.main", "mplug_jax.plan", "mplug_jax.lr_schedule", "mplug_jax.config_checks")

# (importers, what they must not import). Models and data are the bottom: no task, parity,
# storage or top-layer code; models no data either. Conversion (interop) and storage (workdir,
# checkpoint) read arrays without any task. Tasks never reach the trainer, parity, the workdir
# or the CLI; the evaluators and scoring no task. Parity sits above the tasks, below the top.
FORBIDDEN = [
    (MODELS, DATA + INTEROP + STORAGE + SCORING + TASKS + PARITY + TOP),
    (DATA, MODELS + INTEROP + STORAGE + SCORING + TASKS + PARITY + TOP),
    (INTEROP, DATA + STORAGE + SCORING + TASKS + PARITY + TOP),
    (STORAGE, MODELS + DATA + INTEROP + SCORING + TASKS + PARITY + TOP),
    (SCORING, TASKS + PARITY + STORAGE + TOP),
    (TASKS, PARITY + TOP + ("mplug_jax.workdir",)),
    (PARITY, STORAGE + TOP),
]
# Only these may import the tasks / parity (besides the tasks / parity themselves).
ONLY = [
    (TASKS, TASKS + PARITY + TOP),
    (PARITY, PARITY + ("mplug_jax.cli",)),
]

def _in(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def layer_violations(graph: dict[str, set[str]], forbidden=FORBIDDEN,
                     only=ONLY) -> list[str]:
    """'importer -> imported' for every edge of `graph` that a rule forbids: an importer of
    `forbidden`'s first column importing a module of its second, or a module of `only`'s first
    column imported from outside its second (and outside itself)."""
    bad = set()
    for name, deps in graph.items():
        for dep in deps:
            if any(_in(name, src) and _in(dep, dst) for src, dst in forbidden):
                bad.add(f"{name} -> {dep}")
            if any(_in(dep, target) and not _in(name, target + allowed)
                   for target, allowed in only):
                bad.add(f"{name} -> {dep}")
    return sorted(bad)


def test_layers_point_downwards():
    """Every layer rule holds on the package's import graph (imports inside functions too)."""
    graph = import_graph()
    assert {"mplug_jax.models.mplug", "mplug_jax.parity", "mplug_jax.workdir"} <= set(graph)
    bad = layer_violations(graph)
    assert not bad, "imports against the layering: " + "; ".join(bad)


def test_every_layer_rule_can_fail():
    """On a fake graph, each rule catches the edge it forbids, and allowed edges pass."""
    for src, dst in FORBIDDEN:
        edge = {src[0] + ".x": {dst[-1] + ".y"}}
        assert layer_violations(edge, [(src, dst)], []) == [f"{src[0]}.x -> {dst[-1]}.y"]
        assert layer_violations({src[0] + ".x": {"mplug_jax.errors"}}, [(src, dst)], []) == []
    for target, allowed in ONLY:
        outsider = {"mplug_jax.generate": {target[0] + ".z"}}
        assert layer_violations(outsider, [], [(target, allowed)]) == [
            f"mplug_jax.generate -> {target[0]}.z"]
        assert layer_violations({allowed[-1]: {target[0] + ".z"}}, [], [(target, allowed)]) == []
    # the real tables: a model importing data, a task importing the trainer, the workdir
    # importing a task, an evaluator importing parity
    fake = {"mplug_jax.models.vit": {"mplug_jax.data.ops.image"},
            "mplug_jax.mplug2.tasks.video_qa": {"mplug_jax.trainer"},
            "mplug_jax.workdir": {"mplug_jax.tasks"},
            "mplug_jax.evaluators.vqa": {"mplug_jax.parity.rows"},
            "mplug_jax.cli": {"mplug_jax.parity", "mplug_jax.tasks"}}
    assert layer_violations(fake) == ["mplug_jax.evaluators.vqa -> mplug_jax.parity.rows",
                                      "mplug_jax.models.vit -> mplug_jax.data.ops.image",
                                      "mplug_jax.mplug2.tasks.video_qa -> mplug_jax.trainer",
                                      "mplug_jax.workdir -> mplug_jax.tasks"]
