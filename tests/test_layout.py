"""The package's shape: modules import downwards only, so there is no import circle."""

from __future__ import annotations

import ast
import os

from tests.helpers import ROOT

PACKAGE = os.path.join(ROOT, "exercises", "meter_stream")
SHARED = {"config", "contracts", "jvm", "kafka_client", "locks", "message", "raw_input", "session", "storage"}
STAGES = {"consumer", "processor", "cleaner", "checker"}


def module_imports() -> dict[str, set[str]]:
    """Each module of the package (``live.cycle``, ``storage``, ...) and the package modules it imports."""
    graph = {}
    for folder, _dirs, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            module = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            with open(path) as handle:
                tree = ast.parse(handle.read())
            imported = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("meter_stream"):
                    base = node.module.removeprefix("meter_stream").lstrip(".")
                    imported |= {f"{base}.{a.name}".lstrip(".") for a in node.names}
                elif isinstance(node, ast.Import):
                    imported |= {
                        a.name.removeprefix("meter_stream.") for a in node.names if a.name.startswith("meter_stream.")
                    }
            graph[module] = imported
    known = set(graph)
    # "from meter_stream import config" names the module config; "from meter_stream.live.store import X", live.store
    return {
        m: {i if i in known else i.rsplit(".", 1)[0] for i in imports} & known - {m} for m, imports in graph.items()
    }


def test_the_package_has_no_import_circle():
    graph = module_imports()
    assert {"live.runner", "live.cycle", "processor", "storage"} <= set(graph)
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import circle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for imported in graph[module]:
            visit(imported, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())


def test_shared_modules_import_only_shared_modules_and_stages_never_each_other():
    graph = module_imports()
    for module in SHARED:
        assert graph[module] <= SHARED, f"{module} imports {graph[module] - SHARED}"
    for stage in STAGES:
        assert not graph[stage] & (STAGES - {stage}), f"{stage} imports {graph[stage] & STAGES}"
