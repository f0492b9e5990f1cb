"""Command-line flags made from a settings class (common/settings.py).

Every field a class names in ``flag_names()`` is a flag (``sim_decode_ms`` is ``--sim-decode-ms``), in a
``--help`` group per class that declares fields; its help says what it is, its default, its bounds and,
for an enumerated setting, its choices (``--strategy {pull,round_robin,...}``).  Values stay text: the
settings class checks them as it checks ``MGPU_*`` variables, and its error names the flag.
"""

from __future__ import annotations

import argparse
import inspect
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo

from common.settings import MgpuSettings, flag_name

_METAVARS = {int: "INT", float: "FLOAT", str: "STR"}
_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
ENV_NOTE = "Every settings flag is also an environment variable: --slots 64 is MGPU_SLOTS=64."


def _metavar(f: FieldInfo) -> str:
    tp: Any = f.annotation
    if get_origin(tp) in (Union, types.UnionType):  # X | None
        tp = next(a for a in get_args(tp) if a is not type(None))
    if get_origin(tp) is Literal:
        return "{" + ",".join(map(str, get_args(tp))) + "}"
    if tp is bool:
        return "{true,false}"
    return _METAVARS.get(tp, "VALUE")


def _shown(v: Any) -> str:
    if v is None:
        return "unset"
    return str(v).lower() if isinstance(v, bool) else str(v)


def _help(f: FieldInfo) -> str:
    default = "(generated)" if f.default_factory is not None else _shown(f.default)
    bounds = [f"{op} {getattr(m, attr)}" for m in f.metadata for attr, op in _BOUNDS
              if getattr(m, attr, None) is not None]
    text = "; ".join(p for p in (f.description, f"default: {default}", ", ".join(bounds)) if p)
    return text.replace("%", "%%")


def _declaring(cls: type[MgpuSettings], name: str) -> type[MgpuSettings]:
    """The class of ``cls``'s hierarchy that declares the field ``name``."""
    for klass in cls.__mro__:
        if issubclass(klass, MgpuSettings) and name in inspect.get_annotations(klass):
            return klass
    raise LookupError(name)


def add_settings_flags(parser: argparse.ArgumentParser, cls: type[MgpuSettings]) -> None:
    """A flag for each of ``cls.flag_names()``, grouped by the class that declares the field, the most
    specific class first."""
    groups: dict[type[MgpuSettings], list[str]] = {}
    for name in cls.flag_names():
        groups.setdefault(_declaring(cls, name), []).append(name)
    for klass in sorted(groups, key=cls.__mro__.index):
        g = parser.add_argument_group(klass.flag_group)
        for name in groups[klass]:
            f = cls.model_fields[name]
            g.add_argument(flag_name(name), dest=name, default=None, metavar=_metavar(f), help=_help(f))


def given(ns: argparse.Namespace, cls: type[MgpuSettings]) -> dict[str, Any]:
    """The settings flags given on the command line."""
    return {n: getattr(ns, n) for n in cls.flag_names() if getattr(ns, n, None) is not None}
