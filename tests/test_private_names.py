"""Nothing outside ``twisted_novnc/_compat/`` touches a private name of Twisted, Autobahn or
txpostgres: every module of the package is parsed and each such use is named by file and line.

What counts as a use (each one is a place a library release can break the daemon silently):

- ``from twisted.x import _y``, or importing a private module (``twisted.internet._sslverify``);
- ``obj._x`` (or ``getattr(obj, "_x")``) where ``_x`` is not a private name this package
  defines itself (``self._x = ...``, ``def _x``, a class-level ``_x`` or attrs field, a
  module-level ``_x``, a ``__slots__`` entry), and ``lib_module._x`` always;
- in a class whose bases include a library class: defining, overriding or using through
  ``self`` a private name that a library class of its MRO defines;
- writing to a library module's globals or a library class's attributes, and swapping an
  object's ``__class__``;
- looking into a function's internals (``__closure__``, ``__code__``, ``__globals__``,
  ``__qualname__``) or an object's ``__dict__``;
- building a transport or a port (a subclass of Twisted's ``FileDescriptor``) by hand:
  reactors build them and their constructors are internal.

The scan works on names, not types: a library private that happens to share its name with one
of ours is not seen, and public-named internals (a port's ``transport`` class, a transport's
``dataBuffer``) are fenced by review; docs/installing.rst, "Private internals", lists them all.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import pytest

import twisted_novnc

#: The libraries whose private names are fenced (txaio is Autobahn's logging half).
LIBRARIES = frozenset({"twisted", "autobahn", "txpostgres", "txaio"})
_LIBRARY_NAMES = {"twisted": "Twisted", "autobahn": "Autobahn", "txaio": "txaio",
                  "txpostgres": "txpostgres"}

PACKAGE = Path(twisted_novnc.__file__).parent
FENCE = PACKAGE / "_compat"

#: Underscored names that are public API of the standard library (namedtuple's methods).
STDLIB_PUBLIC = frozenset({"_replace", "_asdict", "_fields", "_make", "_field_defaults"})

#: Dunder attributes that reach into a function's or an object's implementation.
INTROSPECTION = frozenset({"__closure__", "__code__", "__globals__", "__qualname__", "__dict__"})

_ACCESSORS = frozenset({"getattr", "setattr", "hasattr", "delattr"})


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@attrs.frozen(order=True)
class Finding:
    """One use of a library's private name: where, and what."""

    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


@functools.cache
def import_object(dotted: str) -> Any:
    """The object a dotted name names (a module, or an attribute of one), or None."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part, None)
            if obj is None:
                return None
        return obj
    return None


def library_of(obj: Any) -> str | None:
    """``"Twisted"`` etc. when ``obj`` is a module or class of a fenced library."""
    name = obj.__name__ if isinstance(obj, ModuleType) else getattr(obj, "__module__", None)
    if not isinstance(name, str):
        return None
    return _LIBRARY_NAMES.get(name.split(".")[0])


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


@functools.cache
def _parsed(path: str) -> ast.Module | None:
    try:
        return ast.parse(Path(path).read_text())
    except (OSError, SyntaxError, ValueError):
        return None


_Function = ast.FunctionDef | ast.AsyncFunctionDef


def _methods(body: Iterable[ast.stmt]) -> Iterator[tuple[_Function, str]]:
    """The methods of a class body, each with the name of its first argument (``self``)."""
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.args.args:
            yield node, node.args.args[0].arg


def _self_attributes(method: _Function, me: str, stores_only: bool) -> Iterator[ast.Attribute]:
    for node in ast.walk(method):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == me
            and (not stores_only or isinstance(node.ctx, ast.Store))
        ):
            yield node


@functools.cache
def library_privates(cls: type) -> frozenset[str]:
    """Private names a library class (itself, not its bases) defines: class attributes and
    methods, and the attributes its methods set on ``self``."""
    names = {name for name in vars(cls) if is_private(name)}
    try:
        source = inspect.getsourcefile(cls)
    except TypeError:
        source = None
    tree = _parsed(source) if source else None
    if tree is not None:
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
                for method, me in _methods(node.body):
                    names.update(
                        a.attr for a in _self_attributes(method, me, True) if is_private(a.attr)
                    )
    return frozenset(names)


def _library_mro(bases: Iterable[Any]) -> list[type]:
    seen: list[type] = []
    for base in bases:
        if not isinstance(base, type):
            continue
        for cls in base.__mro__:
            if library_of(cls) and cls not in seen:
                seen.append(cls)
    return seen


_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def _own_nodes(nodes: Iterable[ast.AST]) -> Iterator[ast.AST]:
    """The nodes of one scope: everything below ``nodes`` but the insides of nested functions
    and classes (their names, defaults and decorators are the scope's own)."""
    stack = list(nodes)
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, _FUNCTIONS):
            stack.extend(node.args.defaults + [d for d in node.args.kw_defaults if d])
            if not isinstance(node, ast.Lambda):
                stack.extend(node.decorator_list)
        elif isinstance(node, ast.ClassDef):
            stack.extend([*node.bases, *node.decorator_list])
        else:
            stack.extend(ast.iter_child_nodes(node))


def _bindings(nodes: Iterable[ast.AST], module: str | None) -> dict[str, str | None]:
    """What each name bound in one scope stands for: an imported dotted name, or (for other
    bindings) ``module.name`` at module level and None (a local, unknown) in a function."""
    names: dict[str, str | None] = {}
    for node in _own_nodes(nodes):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    head = alias.name.split(".")[0]
                    names[head] = head
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                local = alias.asname or alias.name
                absolute = node.module and not node.level
                names[local] = f"{node.module}.{alias.name}" if absolute else None
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store | ast.Del):
            names.setdefault(node.id, f"{module}.{node.id}" if module else None)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.setdefault(node.name, f"{module}.{node.name}" if module else None)
    return names


def _arguments(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> Iterator[str]:
    a = node.args
    for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
        if arg is not None:
            yield arg.arg


class _Module:
    """One module's source, with what its names resolve to in each scope."""

    def __init__(self, source: str, path: str, module: str | None) -> None:
        self.tree = ast.parse(source)
        self.path = path
        self.module = module
        #: For every node: the scopes it sees, innermost first.
        self.scopes: dict[int, list[dict[str, str | None]]] = {}
        self._enter(self.tree.body, [_bindings(self.tree.body, module)])

    def _enter(self, nodes: Iterable[ast.AST], scopes: list[dict[str, str | None]]) -> None:
        for node in _own_nodes(nodes):
            self.scopes[id(node)] = scopes
            if isinstance(node, _FUNCTIONS):
                body: list[ast.AST] = (
                    [node.body] if isinstance(node, ast.Lambda) else list(node.body)
                )
                local: dict[str, str | None] = {name: None for name in _arguments(node)}
                local.update(_bindings(body, None))
                self._enter(body, [local, *scopes])
            elif isinstance(node, ast.ClassDef):
                self._enter(node.body, scopes)

    def nodes(self) -> Iterator[ast.AST]:
        return ast.walk(self.tree)

    def resolve(self, node: ast.expr) -> Any:
        """The object an expression like ``tcp.Server`` names, when imports tell; else None."""
        dotted = _dotted(node)
        if dotted is None:
            return None
        head, _, rest = dotted.partition(".")
        for scope in self.scopes.get(id(node), []):
            if head in scope:
                bound = scope[head]
                if bound is None:
                    return None
                return import_object(bound + (f".{rest}" if rest else ""))
        return None

    def classes(self) -> Iterator[tuple[ast.ClassDef, list[type]]]:
        """Every class, with the library classes of its bases' MROs."""
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ClassDef):
                yield node, _library_mro(self.resolve(base) for base in node.bases)


def own_private_names(modules: Iterable[_Module]) -> frozenset[str]:
    """The private names the package itself defines (a library's private that a subclass of
    ours sets or overrides is not one of them)."""
    names: set[str] = set()
    for module in modules:
        inherited: dict[int, frozenset[str]] = {}
        for cls, mro in module.classes():
            taken = frozenset().union(*(library_privates(k) for k in mro))
            inherited[id(cls)] = taken
            for node in cls.body:
                for name in _defined_names(node):
                    if name not in taken:
                        names.add(name)
            for method, me in _methods(cls.body):
                names.update(
                    a.attr for a in _self_attributes(method, me, True)
                    if is_private(a.attr) and a.attr not in taken
                )
        in_classes = {id(node) for cls, _ in module.classes() for node in cls.body}
        for each in ast.walk(module.tree):
            # A class's own methods are judged above.
            if isinstance(each, _Function | ast.ClassDef) and id(each) not in in_classes:
                names.add(each.name)
        for statement in module.tree.body:
            names.update(_defined_names(statement))
    return frozenset(n for n in names if is_private(n))


def _defined_names(node: ast.AST) -> Iterator[str]:
    """Names a module- or class-level statement binds (``__slots__`` entries included)."""
    targets: list[ast.expr] = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, ast.AnnAssign | ast.AugAssign):
        targets = [node.target]
    elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        yield node.name
    for target in targets:
        for name in ast.walk(target):
            if isinstance(name, ast.Name):
                yield name.id
                if name.id == "__slots__" and isinstance(node, ast.Assign):
                    for const in ast.walk(node.value):
                        if isinstance(const, ast.Constant) and isinstance(const.value, str):
                            yield const.value


def scan_module(module: _Module, own: frozenset[str]) -> list[Finding]:
    """Every use of a fenced library's private name in one module."""
    found: list[Finding] = []
    #: Nodes the class check has reported already (its message says more).
    seen: set[int] = set()

    def report(node: ast.AST, what: str) -> None:
        if id(node) not in seen:
            seen.add(id(node))
            found.append(Finding(module.path, getattr(node, "lineno", 0), what))

    for cls, mro in module.classes():
        if not mro:
            continue
        privates = {name: k for k in reversed(mro) for name in library_privates(k)}
        for statement in cls.body:
            for name in _defined_names(statement):
                if name in privates:
                    k = privates[name]
                    report(statement, f"{cls.name} overrides {library_of(k)}'s private"
                                      f" {k.__module__}.{k.__name__}.{name}")
        for method, me in _methods(cls.body):
            for attribute in _self_attributes(method, me, False):
                if attribute.attr in privates:
                    k = privates[attribute.attr]
                    report(attribute, f"{cls.name} uses {library_of(k)}'s private"
                                      f" {k.__module__}.{k.__name__}.{attribute.attr}")

    def access(node: ast.AST, obj: ast.expr, name: str, writes: bool) -> None:
        if name == "__class__" and writes:
            report(node, "swaps an object's __class__")
            return
        if name in INTROSPECTION:
            report(node, f"looks into {name}")
            return
        target = module.resolve(obj)
        library = library_of(target) if target is not None else None
        if writes and library is not None:
            report(node, f"writes {_dotted(obj)}.{name}, a global of {library}")
            return
        if not is_private(name) or name in STDLIB_PUBLIC:
            return
        if isinstance(target, ModuleType):
            if library is not None:
                report(node, f"uses {library}'s private {target.__name__}.{name}")
            return
        if name not in own:
            owner = f"{library}'s " if library else ""
            report(node, f"uses {owner}private name {name} (not one twisted_novnc defines)")

    for node in ast.walk(module.tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module.split(".")[0] in LIBRARIES:
                private_module = any(is_private(p) for p in node.module.split("."))
                for alias in node.names:
                    if private_module or is_private(alias.name):
                        report(node, f"imports the private {node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in LIBRARIES and any(is_private(p) for p in parts):
                    report(node, f"imports the private module {alias.name}")
        elif isinstance(node, ast.Attribute):
            access(node, node.value, node.attr, isinstance(node.ctx, ast.Store | ast.Del))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _ACCESSORS
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            access(node, node.args[0], node.args[1].value, node.func.id in ("setattr", "delattr"))
        if isinstance(node, ast.Call):
            built = module.resolve(node.func)
            if isinstance(built, type) and _is_file_descriptor(built):
                report(node, f"builds a {built.__name__} (a Twisted transport or port) itself")
    return sorted(found)


def _is_file_descriptor(cls: type) -> bool:
    from twisted.internet.abstract import FileDescriptor

    return issubclass(cls, FileDescriptor)


def scan_source(source: str, path: str = "<string>") -> list[Finding]:
    """Scan one piece of code on its own (its own private names are the only ones known)."""
    module = _Module(source, path, None)
    return scan_module(module, own_private_names([module]))


def package_modules() -> list[_Module]:
    modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent)
        name = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        modules.append(_Module(path.read_text(), str(relative), name))
    return modules


@functools.cache
def package_findings() -> dict[str, list[Finding]]:
    """Findings per module of the package outside ``_compat/``."""
    modules = package_modules()
    own = own_private_names(modules)
    fence = str(FENCE.relative_to(PACKAGE.parent))
    return {
        module.path: scan_module(module, own)
        for module in modules
        if not module.path.startswith(fence + "/")
    }


@pytest.mark.parametrize("path", sorted(package_findings()))
def test_no_private_library_names_outside_compat(path: str) -> None:
    """A module outside _compat uses no private name of Twisted, Autobahn or txpostgres."""
    findings = package_findings()[path]
    assert not findings, "private library internals outside twisted_novnc/_compat/:\n" + "\n".join(
        str(f) for f in findings
    )


def test_every_module_is_scanned() -> None:
    """The scan covers the whole package: every subpackage, and not _compat itself."""
    paths = set(package_findings())
    assert "twisted_novnc/relay/sending.py" in paths
    assert "twisted_novnc/database/store.py" in paths
    assert not any(p.startswith("twisted_novnc/_compat/") for p in paths)


# The scanner itself, on small pieces of code: it must bite, and only where it should.

def _whats(source: str) -> list[str]:
    return [f.what for f in scan_source(source)]


def test_reports_a_private_attribute_of_a_twisted_object() -> None:
    """Reading a transport's _tempDataLen (not a name of ours) is reported, with its line."""
    findings = scan_source("def queued(transport):\n    return transport._tempDataLen\n")
    assert [(f.line, f.what) for f in findings] == [
        (2, "uses private name _tempDataLen (not one twisted_novnc defines)")
    ]


def test_own_private_names_are_not_reported() -> None:
    """self._x set by our own class, our own _helpers and attrs fields are ours to use."""
    source = (
        "import attrs\n"
        "@attrs.define\n"
        "class Box:\n"
        "    _items: list = attrs.field(factory=list)\n"
        "    def __init__(self):\n"
        "        self._count = 0\n"
        "    def _bump(self):\n"
        "        self._count += 1\n"
        "def peek(box):\n"
        "    box._bump()\n"
        "    return box._count, box._items\n"
    )
    assert scan_source(source) == []


def test_reports_private_imports() -> None:
    """Importing a private name, or from a private module, of a library is reported."""
    assert _whats("from twisted.internet.tcp import _AbortingMixin\n") == [
        "imports the private twisted.internet.tcp._AbortingMixin"
    ]
    assert _whats("from twisted.internet._sslverify import OpenSSLCertificateOptions\n") == [
        "imports the private twisted.internet._sslverify.OpenSSLCertificateOptions"
    ]
    assert _whats("import twisted.internet._sslverify\n") == [
        "imports the private module twisted.internet._sslverify"
    ]
    assert _whats("from twisted_novnc._compat import install_patches\n") == []


def test_reports_library_module_globals_and_class_swaps() -> None:
    """Rewriting an Autobahn module global, or swapping __class__, is reported."""
    assert _whats("import autobahn.util as u\nu.hltype = repr\n") == [
        "writes u.hltype, a global of Autobahn"
    ]
    assert _whats("from twisted.internet import tcp\ntcp.Port.numberAccepts = 1\n") == [
        "writes tcp.Port.numberAccepts, a global of Twisted"
    ]
    assert _whats("def swap(port, cls):\n    port.__class__ = cls\n") == [
        "swaps an object's __class__"
    ]


def test_reports_overrides_of_library_privates() -> None:
    """A subclass of a library class that overrides or uses its private names is reported."""
    source = (
        "from twisted.application.internet import StreamServerEndpointService\n"
        "class Listener(StreamServerEndpointService):\n"
        "    _raiseSynchronously = True\n"
        "    def start(self):\n"
        "        self._mine = 1\n"
        "        return self._waitingForPort\n"
    )
    whats = _whats(source)
    assert any("Listener overrides Twisted's private" in w and "_raiseSynchronously" in w
               for w in whats), whats
    assert any("Listener uses Twisted's private" in w and "_waitingForPort" in w
               for w in whats), whats
    assert not any("_mine" in w for w in whats), whats


def test_reports_getattr_with_a_private_name_and_introspection() -> None:
    """getattr(x, "_private") is an attribute access; __closure__ and __qualname__ are internals."""
    assert _whats("def f(p):\n    return getattr(p, '_observers', [])\n") == [
        "uses private name _observers (not one twisted_novnc defines)"
    ]
    assert _whats("def f(fn):\n    return fn.__closure__\n") == ["looks into __closure__"]


def test_reports_building_a_transport() -> None:
    """Constructing a tcp.Server by hand (its constructor is Twisted's internal) is reported."""
    source = "from twisted.internet import tcp\ndef adopt(s, p):\n    return tcp.Server(s, p)\n"
    assert _whats(source) == ["builds a Server (a Twisted transport or port) itself"]


def test_standard_library_underscores_are_not_reported() -> None:
    """os._exit and a namedtuple's _replace are public APIs of the standard library."""
    assert scan_source("import os\nos._exit(1)\ndef f(s):\n    return s._replace(a=1)\n") == []
