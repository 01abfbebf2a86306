"""Every exception Loom defines belongs to the one tree under ``loom.errors.LoomError``."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import pytest

import loom
from loom import errors


def _exception_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined (not just imported) in a module of ``loom``."""
    found: dict[str, type[BaseException]] = {}
    for module_info in pkgutil.walk_packages(loom.__path__, "loom."):
        module = importlib.import_module(module_info.name)
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
            ):
                found[f"{module.__name__}.{name}"] = value
    return found


def test_the_walk_finds_exceptions_outside_loom_errors() -> None:
    modules = {cls.__module__ for cls in _exception_classes().values()}
    assert "loom.errors" in modules
    assert modules - {"loom.errors"}, "the walk must also see classes defined elsewhere"


def test_every_exception_class_in_the_package_derives_from_loom_error() -> None:
    outside = [
        name for name, cls in _exception_classes().items() if not issubclass(cls, errors.LoomError)
    ]
    assert outside == []


def test_every_exception_class_in_the_package_is_drawn_in_the_documented_tree() -> None:
    tree = errors.__doc__ or ""
    undrawn = [
        name
        for name, cls in _exception_classes().items()
        if not re.search(rf"^ +(│   |    |[├└]── )*{cls.__name__}\b", tree, re.MULTILINE)
    ]
    assert undrawn == []


@pytest.mark.parametrize(
    ("child", "parent"),
    [
        (errors.SettingsError, errors.ConfigurationError),
        (errors.MissingVariableError, errors.ConfigurationError),
        (errors.FlowValidationError, errors.ConfigurationError),
        (errors.KafkaStartupError, errors.StartupError),
        (errors.DevBrokerError, errors.StartupError),
        (errors.ClusterPeerLostError, errors.LoomError),
        (errors.DecodeError, errors.RecordError),
        (errors.BusinessError, errors.RecordError),
        (errors.AsyncTimeout, errors.RecordError),
        (errors.MessageTooLarge, errors.RecordError),
    ],
)
def test_each_error_sits_in_its_documented_branch(
    child: type[BaseException], parent: type[BaseException]
) -> None:
    assert issubclass(child, parent)
    assert child.__name__ in (errors.__doc__ or "")


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (errors.SettingsError, ValueError),
        (errors.FlowValidationError, ValueError),
        (errors.MissingVariableError, KeyError),
        (errors.DecodeError, ValueError),
        (errors.StartupError, RuntimeError),
        (errors.ClusterPeerLostError, RuntimeError),
    ],
)
def test_errors_keep_the_builtin_base_callers_catch(
    cls: type[BaseException], builtin: type[BaseException]
) -> None:
    assert issubclass(cls, builtin)


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("loom.config.settings", "SettingsError"),
        ("loom.config.interpolation", "MissingVariableError"),
        ("loom.streaming", "FlowValidationError"),
        ("loom.streaming", "BusinessError"),
        ("loom.streaming.errors", "FlowValidationError"),
        ("loom.streaming.errors", "BusinessError"),
        ("loom.streaming.codecs", "DecodeError"),
        ("loom.streaming.bytewax.records", "AsyncTimeout"),
        ("loom.streaming.testing", "MessageTooLarge"),
        ("loom.transports.kafka", "KafkaStartupError"),
        ("loom.devtools.broker", "DevBrokerError"),
    ],
)
def test_errors_stay_importable_where_they_were_first_defined(module: str, name: str) -> None:
    assert getattr(importlib.import_module(module), name) is getattr(errors, name)


def test_loom_errors_imports_nothing_else_of_loom() -> None:
    source = inspect.getsource(errors)
    assert "import loom" not in source
    assert "from loom" not in source
