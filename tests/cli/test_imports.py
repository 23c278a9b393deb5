"""esper.tolaria.imports: user code named by `package.module:attr` in a config, and every way it can
be wrong, each reported as one message naming the key, the path, the failing part and the fix."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from esper.tolaria.imports import (
    ImportPathError,
    call_factory,
    load_class,
    load_object,
    on_sys_path,
    user_import_roots,
)

WriteModule = Callable[[str], str]


@pytest.fixture()
def write_module(tmp_path: Path) -> Iterator[WriteModule]:
    """Write a module with a fresh name into tmp_path (outside the package); yield its writer."""
    names: list[str] = []

    def write(source: str) -> str:
        name = f"user_mod_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


def _error(fn: Callable[[], object]) -> str:
    with pytest.raises(ImportPathError) as info:
        fn()
    message = str(info.value)
    assert "Traceback" not in message and "\n" not in message
    return message


MODELS = """
    class Net:
        def __init__(self, width):
            self.width = width

    class Outer:
        @staticmethod
        def inner(depth=2):
            return [depth]

    def build(width, depth=2):
        return Net(width)

    def broken(width):
        raise RuntimeError("width must be even, got %d" % width)

    def wrong_type(width):
        return {"width": width}

    CONSTANT = 3
"""


def test_an_attribute_and_a_dotted_attribute_load_from_a_module_outside_the_package(
        tmp_path: Path, write_module: WriteModule) -> None:
    name = write_module(MODELS)
    build = load_object(f"{name}:build", what="model.factory", roots=[tmp_path])
    assert build(4).width == 4
    inner = load_object(f"{name}:Outer.inner", what="model.factory", roots=[tmp_path])
    assert inner() == [2]
    assert str(tmp_path) not in sys.path  # the root was only there while importing


def test_user_import_roots_are_the_config_directory_then_the_cwd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    monkeypatch.chdir(tmp_path)
    assert user_import_roots(config_dir / "job.toml") == [config_dir.resolve(), tmp_path.resolve()]
    assert user_import_roots(tmp_path / "job.toml") == [tmp_path.resolve()]
    assert user_import_roots(None) == [tmp_path.resolve()]


def test_on_sys_path_puts_roots_in_front_and_removes_only_them(tmp_path: Path) -> None:
    before = list(sys.path)
    with on_sys_path([tmp_path]):
        assert sys.path[0] == str(tmp_path)
    assert sys.path == before


def test_no_colon_names_the_expected_shape() -> None:
    message = _error(lambda: load_object("mymodels.build", what="model.factory"))
    assert message.startswith("model.factory = 'mymodels.build': expected \"package.module:function\"")
    assert "colon" in message


def test_two_colons_and_empty_parts_are_rejected() -> None:
    assert "more than one colon" in _error(lambda: load_object("a:b:c", what="model.factory"))
    assert "module part ''" in _error(lambda: load_object(":build", what="model.factory"))
    assert "attribute part ''" in _error(lambda: load_object("mymodels:", what="data.factory"))
    assert "attribute part '1x'" in _error(lambda: load_object("mymodels:1x", what="data.factory"))


def test_a_file_path_as_module_suggests_the_module_name() -> None:
    message = _error(lambda: load_object("models/mymodels.py:build", what="model.factory"))
    assert "file path" in message and "'mymodels:...'" in message


def test_a_missing_module_is_named_with_where_to_put_it(tmp_path: Path) -> None:
    message = _error(lambda: load_object("no_such_module_xyz:build", what="model.factory", roots=[tmp_path]))
    assert "model.factory = 'no_such_module_xyz:build'" in message
    assert "no module named 'no_such_module_xyz'" in message
    assert "next to the config file or in the current directory" in message
    assert "no_such_module_xyz" not in sys.modules


def test_a_missing_submodule_of_an_existing_package_is_named(tmp_path: Path) -> None:
    package = tmp_path / f"user_pkg_{uuid.uuid4().hex[:8]}"
    package.mkdir()
    (package / "__init__.py").write_text("")
    try:
        message = _error(lambda: load_object(f"{package.name}.nope:build", what="data.factory", roots=[tmp_path]))
        assert f"no module named '{package.name}.nope'" in message
        assert package.name not in sys.modules  # the package this attempt imported is dropped again
    finally:
        sys.modules.pop(package.name, None)


def test_a_submodule_of_a_plain_module_says_it_is_not_a_package(tmp_path: Path, write_module: WriteModule) -> None:
    name = write_module(MODELS)
    message = _error(lambda: load_object(f"{name}.build:x", what="model.factory", roots=[tmp_path]))
    assert f"'{name}' is a single module, not a package" in message and f"'{name}:build'" in message


def test_a_module_whose_import_fails_names_the_inner_error_and_is_not_left_imported(
        tmp_path: Path, write_module: WriteModule) -> None:
    name = write_module("import not_installed_dependency_xyz\n")
    message = _error(lambda: load_object(f"{name}:build", what="model.factory", roots=[tmp_path]))
    assert f"module '{name}' was found but importing it raised ModuleNotFoundError" in message
    assert "not_installed_dependency_xyz" in message
    assert name not in sys.modules


def test_a_module_raising_while_imported_names_type_and_message(tmp_path: Path, write_module: WriteModule) -> None:
    name = write_module("X = 1\nraise RuntimeError('no GPU here\\nsecond line')\n")
    message = _error(lambda: load_object(f"{name}:X", what="data.factory", roots=[tmp_path]))
    assert "RuntimeError: no GPU here" in message and "second line" not in message
    assert name not in sys.modules


def test_a_syntax_error_in_the_module_is_reported(tmp_path: Path, write_module: WriteModule) -> None:
    name = write_module("def build(:\n")
    message = _error(lambda: load_object(f"{name}:build", what="model.factory", roots=[tmp_path]))
    assert "SyntaxError" in message and name not in sys.modules


def test_a_missing_attribute_lists_the_public_names(tmp_path: Path, write_module: WriteModule) -> None:
    name = write_module(MODELS)
    message = _error(lambda: load_object(f"{name}:biuld", what="model.factory", roots=[tmp_path]))
    assert f"module '{name}' has no attribute 'biuld'" in message
    assert "(it has: CONSTANT, Net, Outer, broken, build, wrong_type)" in message
    nested = _error(lambda: load_object(f"{name}:Outer.innr", what="model.factory", roots=[tmp_path]))
    assert f"'{name}:Outer' has no attribute 'innr'" in nested and "inner" in nested


def test_call_factory_binds_calls_and_checks_the_result(tmp_path: Path, write_module: WriteModule) -> None:
    name = write_module(MODELS)
    net_class = load_object(f"{name}:Net", what="model.factory", roots=[tmp_path])
    net = call_factory(f"{name}:build", {"width": 8}, what="model.factory", expect=net_class, roots=[tmp_path])
    assert net.width == 8


def test_an_unknown_keyword_names_the_key_and_the_accepted_parameters(
        tmp_path: Path, write_module: WriteModule) -> None:
    name = write_module(MODELS)
    message = _error(lambda: call_factory(f"{name}:build", {"widht": 8}, what="model.factory", roots=[tmp_path]))
    assert "unknown keyword 'widht' in model.kwargs" in message
    assert "build accepts: width, depth=2" in message


def test_a_missing_keyword_is_named(tmp_path: Path, write_module: WriteModule) -> None:
    name = write_module(MODELS)
    message = _error(lambda: call_factory(f"{name}:build", {}, what="data.factory", roots=[tmp_path]))
    assert "missing required keyword 'width' in data.kwargs" in message and "accepts: width, depth=2" in message


def test_an_exception_in_the_factory_is_named_and_chained(tmp_path: Path, write_module: WriteModule) -> None:
    name = write_module(MODELS)
    with pytest.raises(ImportPathError) as info:
        call_factory(f"{name}:broken", {"width": 3}, what="model.factory", roots=[tmp_path])
    assert str(info.value) == (f"model.factory = '{name}:broken': broken() raised "
                               "RuntimeError: width must be even, got 3")
    assert isinstance(info.value.__cause__, RuntimeError)  # the traceback stays reachable for debugging


def test_a_wrong_result_type_names_what_came_back_and_what_was_expected(
        tmp_path: Path, write_module: WriteModule) -> None:
    name = write_module(MODELS)
    message = _error(lambda: call_factory(f"{name}:wrong_type", {"width": 3}, what="model.factory",
                                          expect=(list, tuple), expect_text="a torch.nn.Module", roots=[tmp_path]))
    assert "wrong_type() returned a dict; expected a torch.nn.Module" in message
    plain = _error(lambda: call_factory(f"{name}:wrong_type", {"width": 3}, what="model.factory",
                                        expect=(list, tuple), roots=[tmp_path]))
    assert plain.endswith("expected list or tuple")


def test_a_factory_that_is_not_callable_is_rejected(tmp_path: Path, write_module: WriteModule) -> None:
    name = write_module(MODELS)
    message = _error(lambda: call_factory(f"{name}:CONSTANT", {}, what="model.factory", roots=[tmp_path]))
    assert "is an int, which cannot be called" in message


def test_task_options_is_the_kwargs_key_of_task(tmp_path: Path, write_module: WriteModule) -> None:
    name = write_module(MODELS)
    message = _error(lambda: call_factory(f"{name}:Net", {"depth": 1}, what="task", roots=[tmp_path]))
    assert "unknown keyword 'depth' in task_options" in message and "Net accepts: width" in message


def test_load_class_accepts_a_class_and_rejects_anything_else(tmp_path: Path, write_module: WriteModule) -> None:
    name = write_module(MODELS)
    assert load_class(f"{name}:Net", what="task", roots=[tmp_path]).__name__ == "Net"
    message = _error(lambda: load_class(f"{name}:build", what="task", roots=[tmp_path],
                                        expect_text="implementing esper.tolaria.tasks.Task"))
    assert message == (f"task = '{name}:build': is a function (build); "
                       "expected a class implementing esper.tolaria.tasks.Task")
