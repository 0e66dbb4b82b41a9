"""Run in a fresh interpreter by tests/test_side_effects.py: what a step changes in the process.

    python side_effects_probe.py import            import every module of twisted_novnc, then
                                                   call twisted_novnc._compat.install_patches()
    python side_effects_probe.py build CONFIG      makeService(CONFIG) on a MemoryReactorClock
    python side_effects_probe.py start CONFIG      the same, then start the tree it built

Prints one JSON object: for each step, what it changed (one line per change) and what it logged.
The state compared is what a library user would notice: every attribute of every third-party
module (and of the classes they define) loaded before the step, the descriptor limit, the
garbage collector, signal handlers, threads, the global log's observers, the standard streams,
the environment, warning filters, and whether a reactor was installed.
"""

from __future__ import annotations

import ast
import contextlib
import gc
import importlib
import importlib.util
import json
import os
import pkgutil
import resource
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PACKAGE = "twisted_novnc"

#: Importing it installs the global reactor: a change the checks must see, not make.
REACTOR = "twisted.internet.reactor"

#: Library globals that change on their own as they are used (counters), not patches.
COUNTERS = {
    "attr._make._CountingAttr.cls_counter",  # attrs numbers every field it makes
    "twisted.python.failure.count",  # Twisted numbers every Failure
}


def package_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # finds it without importing it
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


def package_modules() -> list[str]:
    """Every module of the package, found on disk (walk_packages would import them)."""
    names = [PACKAGE]

    def walk(path: Path, prefix: str) -> None:
        for info in pkgutil.iter_modules([str(path)]):
            names.append(prefix + info.name)
            if info.ispkg:
                walk(path / info.name, f"{prefix}{info.name}.")

    walk(package_dir(), PACKAGE + ".")
    return names


def libraries() -> set[str]:
    """Every module outside the package that the package names in an import, anywhere."""
    found = set()
    for path in package_dir().rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] != PACKAGE and name != REACTOR}


def load_libraries() -> None:
    """Import the libraries first, so that what the step does to them can be seen."""
    for name in sorted(libraries()):
        with contextlib.suppress(ImportError):  # ``from module import name``, not a module
            importlib.import_module(name)
        if REACTOR in sys.modules:
            raise SystemExit(f"the package imports {name}, which installs the global reactor")


def third_party(name: str) -> bool:
    top = name.split(".")[0]
    return top != PACKAGE and top not in sys.stdlib_module_names and top != "__main__"


def _namespaces() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, module in list(sys.modules.items()):
        if module is None or not third_party(name):
            continue
        namespace = getattr(module, "__dict__", {})
        yield name, namespace
        for key, value in list(namespace.items()):
            if isinstance(value, type) and value.__module__ == name:
                yield f"{name}.{key}", dict(vars(value))


def _soft_limit_below_hard() -> None:
    """So that a raise of the soft limit shows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard and hard != resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard - 1, hard))


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


class State:
    """What the process looks like from outside the package, now."""

    def __init__(self) -> None:
        from twisted.logger import globalLogBeginner, globalLogPublisher

        self.namespaces = {name: dict(space) for name, space in _namespaces()}
        self.values: dict[str, Any] = {
            "RLIMIT_NOFILE": resource.getrlimit(resource.RLIMIT_NOFILE),
            "gc.get_freeze_count()": gc.get_freeze_count(),
            "gc.isenabled()": gc.isenabled(),
            "gc.get_threshold()": gc.get_threshold(),
            "reactor installed": REACTOR in sys.modules,
            "os.environ": dict(os.environ),
            "os.getcwd()": os.getcwd(),
            "umask": _umask(),
            "warnings.filters": list(warnings.filters),
        }
        self.identities: dict[str, Any] = {
            f"signal handler {sig.name}": signal.getsignal(sig) for sig in signal.valid_signals()
            if isinstance(sig, signal.Signals)
        }
        self.identities.update({
            "threads": tuple(threading.enumerate()),
            "log observers": tuple(getattr(globalLogPublisher, "_observers", ())),
            "log beginner's buffer": getattr(globalLogBeginner, "_temporaryObserver", None),
            "sys.stdin": sys.stdin,
            "sys.stdout": sys.stdout,
            "sys.stderr": sys.stderr,
            "sys.excepthook": sys.excepthook,
        })

    def changes(self, later: State) -> list[str]:
        """One line per difference from this state to ``later``."""
        found = []
        for key, value in self.values.items():
            if later.values[key] != value:
                found.append(f"{key}: {_short(value)} -> {_short(later.values[key])}")
        for key, value in self.identities.items():
            if key == "threads":
                if len(later.identities[key]) != len(value) or not all(
                    a is b for a, b in zip(value, later.identities[key], strict=True)
                ):
                    found.append(f"threads: {len(value)} -> {len(later.identities[key])}")
            elif isinstance(value, tuple):
                if len(value) != len(later.identities[key]) or not all(
                    a is b for a, b in zip(value, later.identities[key], strict=True)
                ):
                    found.append(f"{key} changed: {_short(later.identities[key])}")
            elif later.identities[key] is not value:
                found.append(f"{key}: {_short(value)} -> {_short(later.identities[key])}")
        for name, before in self.namespaces.items():
            after = later.namespaces.get(name, {})
            for key, value in before.items():
                if key not in after:
                    found.append(f"{name}.{key} was removed")
                elif after[key] is not value and f"{name}.{key}" not in COUNTERS:
                    found.append(f"{name}.{key} was replaced by {_short(after[key])}")
            for key, value in after.items():
                if key in before or _is_module(value) or _lazy_annotations(key, value):
                    continue
                found.append(f"{name}.{key} was added: {_short(value)}")
        return found


def _lazy_annotations(key: str, value: object) -> bool:
    """An empty ``__annotations__`` that CPython made on first read: reading a class's
    ``__annotations__`` stores an empty dict on a class that had none (attrs 23.1 reads its
    bases' that way).  Nothing any code sees has changed."""
    return key == "__annotations__" and value == {}


def _is_module(value: object) -> bool:
    return type(value).__name__ == "module"


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def measure(step: Callable[[], object]) -> dict[str, Any]:
    """What ``step`` changed, the log lines it wrote, and the descriptor limit and the
    collector's frozen count before and after it."""
    from twisted.logger import formatEvent, globalLogPublisher

    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    before = State()
    step()
    after = State()
    globalLogPublisher.removeObserver(observe)
    return {
        "changes": before.changes(after),
        "logged": lines,
        "RLIMIT_NOFILE": [before.values["RLIMIT_NOFILE"], after.values["RLIMIT_NOFILE"]],
        "frozen": [before.values["gc.get_freeze_count()"], after.values["gc.get_freeze_count()"]],
    }


def import_everything() -> None:
    for name in package_modules():
        importlib.import_module(name)


def main(argv: list[str]) -> dict[str, Any]:
    _soft_limit_below_hard()
    load_libraries()
    if argv[0] == "import":
        result = {"modules": package_modules(), "import": measure(import_everything)}
        from twisted_novnc._compat import install_patches

        result["patch"] = measure(install_patches)
        return result
    import_everything()
    from twisted.internet.testing import MemoryReactorClock

    from twisted_novnc.tap import Options, makeService

    options = Options()
    options.parseOptions(["--config", argv[1]])
    reactor = MemoryReactorClock()
    built = []
    result = {"build": measure(lambda: built.append(makeService(options, reactor)))}
    (service,) = built
    if argv[0] == "build":
        return result

    def start() -> None:
        service.privilegedStartService()
        service.startService()

    result["start"] = measure(start)
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
