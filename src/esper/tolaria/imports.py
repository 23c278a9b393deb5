"""Resolving the user's code from a config: `model.factory = "mymodels:build"`, `task = "pkg.tasks:MyTask"`.

An import path is `package.module:attribute` (the attribute may be dotted, `mod:Outer.build`). Every
failure is an `ImportPathError` whose message names the config key, the path, the part that failed
and what was expected, so a typo in a config never surfaces as a traceback.

User modules usually live next to their config or in the directory `tolaria` is started from, and
neither is on `sys.path` when `tolaria` runs as an installed console script (its `sys.path[0]` is
the script's bin directory): `on_sys_path(user_import_roots(config_path))` puts both in front while
the user's code is imported.
"""

from __future__ import annotations

import importlib
import inspect
import keyword
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

SHAPE = '"package.module:function"'


class ImportPathError(ValueError):
    """An import path in a config cannot be resolved or called; the message says why and how to fix it."""


# ---------------------------------------------------------------- where user code is found


def user_import_roots(config_path: Path | None = None) -> list[Path]:
    """The config file's directory, then the current directory (duplicates dropped)."""
    roots = [Path(config_path).resolve().parent] if config_path is not None else []
    roots.append(Path.cwd().resolve())
    return list(dict.fromkeys(roots))


@contextmanager
def on_sys_path(roots: Sequence[Path]) -> Iterator[None]:
    """Put `roots` at the front of sys.path for the block, then take exactly those entries out again.

    In front, so a module next to the config wins over an installed one of the same name; only
    for the block, so the rest of the process keeps the import path it was started with."""
    added = [str(root) for root in roots]
    sys.path[:0] = added
    try:
        yield
    finally:
        for entry in added:
            if entry in sys.path:
                sys.path.remove(entry)


# ---------------------------------------------------------------- parsing and loading


def split_import_path(path: str, *, what: str) -> tuple[str, list[str]]:
    """`"pkg.mod:Outer.attr"` -> ("pkg.mod", ["Outer", "attr"]), or an error naming the expected shape."""
    head = f"{what} = {path!r}"
    if path.count(":") != 1:
        problem = "no colon" if ":" not in path else "more than one colon"
        raise ImportPathError(f"{head}: expected {SHAPE} ({problem}; one colon goes between module and attribute)")
    module, attr = (part.strip() for part in path.split(":"))
    if module.endswith(".py") or "/" in module or "\\" in module:
        name = Path(module).stem
        raise ImportPathError(f"{head}: the module part is a file path; use the module name, e.g. '{name}:...', "
                              "and keep the file next to the config or in the current directory")
    for label, dotted in (("module", module), ("attribute", attr)):
        if not dotted or not all(_is_name(part) for part in dotted.split(".")):
            raise ImportPathError(f"{head}: the {label} part {dotted!r} is not a dotted Python name; expected {SHAPE}")
    return module, attr.split(".")


def _is_name(part: str) -> bool:
    return part.isidentifier() and not keyword.iskeyword(part)


def load_object(path: str, *, what: str, roots: Sequence[Path] = ()) -> Any:
    """Import the module of `path` (with `roots` in front of sys.path) and return its attribute."""
    module_name, attrs = split_import_path(path, what=what)
    with on_sys_path(roots):
        module = _import(module_name, path=path, what=what)
    obj: Any = module
    for depth, attr in enumerate(attrs):
        if not hasattr(obj, attr):
            owner = module_name if depth == 0 else f"{module_name}:{'.'.join(attrs[:depth])}"
            kind = "module" if isinstance(obj, ModuleType) else type(obj).__name__
            raise ImportPathError(f"{what} = {path!r}: {kind} {owner!r} has no attribute {attr!r}"
                                  f"{_public_names(obj)}")
        obj = getattr(obj, attr)
    return obj


def _import(module_name: str, *, path: str, what: str) -> ModuleType:
    """Import `module_name`; on failure drop every module of its package that this attempt added, so a
    fixed file is imported afresh and nothing half-initialised stays in sys.modules."""
    importlib.invalidate_caches()  # a module written since the last import (tests, notebooks) is seen
    before = set(sys.modules)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        _forget_new(module_name, before)
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            not_package = "is not a package" in str(exc)
            raise ImportPathError(_not_found(module_name, missing, not_package, path=path, what=what)) from None
        raise ImportPathError(_failed(module_name, exc, path=path, what=what)) from exc
    except Exception as exc:  # the user's module raised while executing: say what, in one line
        _forget_new(module_name, before)
        raise ImportPathError(_failed(module_name, exc, path=path, what=what)) from exc


def _forget_new(module_name: str, before: set[str]) -> None:
    top = module_name.split(".")[0]
    for name in set(sys.modules) - before:
        if name == top or name.startswith(top + "."):
            del sys.modules[name]


def _not_found(module_name: str, missing: str, not_package: bool, *, path: str, what: str) -> str:
    if not_package:
        parent = missing.rpartition(".")[0]
        return (f"{what} = {path!r}: no module named {missing!r}: {parent!r} is a single module, not a package; "
                f"use '{parent}:{missing.rpartition('.')[2]}' for an attribute of it, or make it a package folder")
    if missing != module_name:
        where = f"module {module_name!r} is not found: its package {missing!r} does not exist"
    else:
        where = f"no module named {module_name!r}"
    return (f"{what} = {path!r}: {where}; put {missing.replace('.', '/')}.py (or a package folder) next to the "
            "config file or in the current directory, or install it (pip install -e PATH)")


def _failed(module_name: str, exc: BaseException, *, path: str, what: str) -> str:
    return (f"{what} = {path!r}: module {module_name!r} was found but importing it raised "
            f"{_one_line(exc)}; fix that module (run `python -c 'import {module_name}'` to see the traceback)")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _public_names(obj: Any, limit: int = 8) -> str:
    """A hint listing what `obj` does have (public, not submodules), for a misspelled attribute."""
    names = sorted(n for n, v in vars(obj).items() if not n.startswith("_") and not isinstance(v, ModuleType)) \
        if hasattr(obj, "__dict__") else []
    if not names:
        return " (it has no public names)"
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f" (it has: {shown})"


# ---------------------------------------------------------------- classes and factories


def load_class(path: str, *, what: str, expect_text: str = "", roots: Sequence[Path] = ()) -> type:
    """Load `path` and check it is a class (not an instance or a function)."""
    obj = load_object(path, what=what, roots=roots)
    if not inspect.isclass(obj):
        expected = f"a class{f' {expect_text}' if expect_text else ''}"
        raise ImportPathError(f"{what} = {path!r}: is {_kind(obj)}; expected {expected}")
    return obj


def call_factory(path: str, kwargs: Mapping[str, Any] | None = None, *, what: str,
                 expect: type | tuple[type, ...] | None = None, expect_text: str = "",
                 kwargs_key: str = "", roots: Sequence[Path] = ()) -> Any:
    """Load the callable at `path`, call it with `kwargs` and check the result is an `expect`.

    The keywords are bound against the signature before the call, so a misspelled key in
    `kwargs_key` (default: `what`'s section + ".kwargs") is named as such, not as a TypeError
    from somewhere inside the user's code."""
    factory = load_object(path, what=what, roots=roots)
    if not callable(factory):
        raise ImportPathError(f"{what} = {path!r}: is {_kind(factory)}, which cannot be called; expected {SHAPE}")
    kwargs = dict(kwargs or {})
    _bind(factory, kwargs, path=path, what=what, kwargs_key=kwargs_key or _kwargs_key(what))
    name = f"{getattr(factory, '__qualname__', path)}()"
    try:
        result = factory(**kwargs)
    except Exception as exc:  # the user's factory failed: name it and the error; the chain keeps the traceback
        raise ImportPathError(f"{what} = {path!r}: {name} raised {_one_line(exc)}") from exc
    if expect is not None and not isinstance(result, expect):
        expected = expect_text or " or ".join(t.__name__ for t in (expect if isinstance(expect, tuple) else (expect,)))
        raise ImportPathError(f"{what} = {path!r}: {name} returned {_kind(result)}; expected {expected}")
    return result


def _kwargs_key(what: str) -> str:
    section = what.rpartition(".")[0]
    return f"{section}.kwargs" if section else f"{what}_options"


def _bind(factory: Any, kwargs: dict[str, Any], *, path: str, what: str, kwargs_key: str) -> None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have no signature; the call itself will tell
        return
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        accepts = ", ".join(_describe_param(p) for p in signature.parameters.values()) or "no arguments"
        raise ImportPathError(f"{what} = {path!r}: {_bind_problem(signature, kwargs, exc)} in {kwargs_key}; "
                              f"{getattr(factory, '__qualname__', path)} accepts: {accepts}") from None


def _bind_problem(signature: inspect.Signature, kwargs: Mapping[str, Any], exc: TypeError) -> str:
    params = signature.parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = [k for k in kwargs if k not in named and not takes_any]
    if unknown:
        return f"unknown keyword {', '.join(repr(k) for k in unknown)}"
    missing = [n for n in named if n not in kwargs and params[n].default is inspect.Parameter.empty]
    if missing:
        return f"missing required keyword {', '.join(repr(k) for k in missing)}"
    positional = [n for n, p in params.items() if p.kind is p.POSITIONAL_ONLY and p.default is p.empty]
    if positional:
        return f"positional-only parameter {', '.join(repr(k) for k in positional)} cannot be given by keyword"
    return f"the keywords do not fit ({exc})"


def _describe_param(param: inspect.Parameter) -> str:
    if param.kind is param.VAR_KEYWORD:
        return f"**{param.name}"
    if param.kind is param.VAR_POSITIONAL:
        return f"*{param.name}"
    return param.name if param.default is param.empty else f"{param.name}={param.default!r}"


def _kind(obj: Any) -> str:
    """`obj` in words, e.g. "a function (build)", "a dict", "None"."""
    if obj is None:
        return "None"
    if inspect.isclass(obj):
        return f"the class {obj.__name__}"
    if inspect.isroutine(obj):
        return f"a function ({getattr(obj, '__qualname__', obj)})"
    if isinstance(obj, ModuleType):
        return f"the module {obj.__name__}"
    article = "an" if type(obj).__name__[:1].lower() in "aeiou" else "a"
    return f"{article} {type(obj).__name__}"
