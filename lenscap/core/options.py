"""Options declared once: one typed object per command.

A command's options are a dataclass whose fields say how each is given::

    @dataclass(kw_only=True)
    class FilterOptions(OwnedOutput, Executed, Options):
        command: ClassVar[str] = "filter"
        min_side: int | None = option(None, "Drop images whose shorter side is below this many pixels.",
                                      show_default="no limit")

Everything else reads the fields: the CLI generates its Typer command from them (``lenscap.cli.build``),
a recipe's ``[[stages]]`` table is checked and converted by ``from_mapping``, ``lenscap.api`` takes the
object (or its fields as keywords), and the docs' CLI reference walks the generated command. A field
added to an options class appears in ``--help``, the reference, recipe validation and the API with no
other edit.

``validate`` runs when the object is made and refuses values no run could mean, as a ``UsageError``
naming the flag, so the CLI, a recipe (before its first stage runs) and the API all hear it the same way.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from lenscap.core.errors import UsageError
from lenscap.core.storage import require_local

__all__ = [
    "Flag",
    "Argument",
    "Options",
    "option",
    "flag_name",
    "check",
    "shared",
    "Executed",
    "OwnedOutput",
    "FromDataset",
    "RowsOnly",
    "all_cores",
    "with_fields",
    "OptionsT",
]

OptionsT = TypeVar("OptionsT", bound="Options")


@dataclass(frozen=True)
class Flag:
    """How a field is given on the command line, and named in messages."""

    help: str
    names: tuple[str, ...] = ()  # the flag's names; by default --field-name
    show_default: str | bool = True  # True: the default itself; a text ("all cores"); False: nothing
    panel: str | None = None  # a --help panel of its own
    metavar: str | None = None
    switch: bool = False  # a bool given as one flag (--overwrite) with no --no-... form
    old_names: tuple[str, ...] = ()  # hidden names kept for one release; their value moves here with a note
    local: str | None = None  # the value must be a local path: what to call it when it is a URL
    # The value names a file or directory (as does every ``local`` one): a recipe's stays inside the
    # recipe's directory (lenscap.run.recipe). ``keywords``: values that are names, not paths (presets).
    path: bool = False
    keywords: tuple[str, ...] = ()

    def name(self, field_name: str) -> str:
        return self.names[0] if self.names else flag_name(field_name)


@dataclass(frozen=True)
class Argument:
    """A positional argument: the CLI's (a recipe supplies it; the API takes it by position)."""

    name: str
    help: str
    metavar: str | None = None
    many: bool = False  # a list of them (download's [INPUT] OUT_DIR, audit's DIR [DIR_B])
    default: Any = ...  # ...: required
    local: str | None = None  # the value must be a local path: what to call it when it is a URL


def option(default: Any, help: str, **how: Any) -> Any:
    """A field of an options object with its flag (``Flag``'s fields as keywords)."""
    metadata = {"flag": Flag(help, **how)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def check(ok: bool, message: str) -> None:
    """One value check of ``validate``: a ``UsageError`` saying ``message`` when it fails."""
    if not ok:
        raise UsageError(message)


@dataclass(kw_only=True, frozen=True)
class Options:
    """The base of every command's options. A subclass sets ``command``, ``help`` (what ``--help`` says
    first), ``example`` (a command line) and ``arguments``, declares its fields with ``option``, and
    checks values in ``validate``."""

    command: ClassVar[str] = ""
    help: ClassVar[str] = ""
    example: ClassVar[str] = ""
    arguments: ClassVar[tuple[Argument, ...]] = ()

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse values no run could mean (``check``); the subclasses' checks call each other's. Here:
        a URL where the command writes or reads a local path (``Flag.local``)."""
        _local_only((getattr(self, f.name), flag.local) for f, flag in self.flags() if flag.local)

    @classmethod
    def check_arguments(cls, values: Mapping[str, Any]) -> None:
        """The command's positional arguments' checks (``Argument.local``)."""
        _local_only((values.get(a.name), a.local) for a in cls.arguments if a.local)

    # -- what the fields are --------------------------------------------------------------------

    @classmethod
    def flags(cls) -> list[tuple[dataclasses.Field[Any], Flag]]:
        """Every field with its flag, in --help order: the command's own first, the shared ones after."""
        own, common = [], []
        for f in dataclasses.fields(cls):
            flag = f.metadata.get("flag")
            if flag is None:
                continue
            mixin = _declaring_mixin(cls, f.name)
            if mixin is None:
                own.append((f, flag))
            else:
                common.append((_MIXINS.index(mixin), f, flag))
        return own + [(f, flag) for _, f, flag in sorted(common, key=lambda c: c[0])]

    @classmethod
    def types(cls) -> dict[str, Any]:
        """Each field's type, resolved (the annotations are strings under ``from __future__``)."""
        cached = cls.__dict__.get("_lenscap_types")
        if cached is None:
            cached = typing.get_type_hints(cls)
            cls._lenscap_types = cached  # type: ignore[attr-defined]
        return cached

    @classmethod
    def path_fields(cls) -> dict[str, Flag]:
        """The fields whose values name files or directories (``Flag.path`` or ``Flag.local``)."""
        return {f.name: flag for f, flag in cls.flags() if flag.path or flag.local}

    @classmethod
    def old_names(cls) -> dict[str, tuple[str, str, str]]:
        """Hidden old names: old field name -> (field it moved to, old flag, new flag)."""
        out = {}
        for f, flag in cls.flags():
            for old in flag.old_names:
                out[old.lstrip("-").replace("-", "_")] = (f.name, old, flag.name(f.name))
        return out

    # -- made from a recipe's table, or the API's keywords -------------------------------------------

    @classmethod
    def from_mapping(cls: type[OptionsT], values: Mapping[str, Any]) -> OptionsT:
        """Options from a recipe's stage table (TOML values): names with ``_`` or ``-``; an old name moves
        to its new one; ``NAME = false`` where the flag is ``--no-NAME`` sets it; every value checked
        against its field's type (a list where a number belongs is refused, not cut to its last item)."""
        fields = {f.name: flag for f, flag in cls.flags()}
        old = cls.old_names()
        given: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name in old:
                name = old[name][0]
            if value is False and f"no_{name}" in fields and cls.types().get(name) not in (bool, bool | None):
                name, value = f"no_{name}", True  # cache = false: --no-cache, as the command line says it
            if name not in fields:
                raise UsageError(f"No such option: {flag_name(name)}")
            given[name] = coerce(value, cls.types()[name], fields[name].name(name))
        return cls(**given)

    @classmethod
    def of(cls: type[OptionsT], options: OptionsT | None = None, **fields: Any) -> OptionsT:
        """``options`` (default: every field's default) with ``fields`` changed."""
        if options is None:
            return cls(**fields)
        if not isinstance(options, cls):
            raise UsageError(f"{cls.command} takes {cls.__name__}, not {type(options).__name__}")
        return dataclasses.replace(options, **fields) if fields else options

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


_MIXINS: list[type] = []


def shared(cls: type[OptionsT]) -> type[OptionsT]:
    """Marks an options class whose fields many commands share: listed after a command's own in --help,
    in the order these classes are declared."""
    _MIXINS.append(cls)
    return cls


def _declaring_mixin(cls: type, name: str) -> type | None:
    for klass in cls.__mro__:
        if name in vars(klass).get("__annotations__", {}):
            return klass if klass in _MIXINS else None
    return None


def with_fields(base: type[OptionsT], name: str, module: str, fields: list[tuple[str, Any, Any]]) -> type[OptionsT]:
    """``base`` with more fields, ``(name, type, option(...))``: the options that parts of a command
    contribute (caption backends' flags, filter rules and annotators), declared where those parts are.
    The class is named ``name`` in ``module``, which must bind it to that name (so it pickles)."""
    namespace = {"__module__": module, "__qualname__": name, "__doc__": base.__doc__}
    return dataclasses.make_dataclass(name, fields, bases=(base,), kw_only=True, frozen=True, namespace=namespace)


# -- what many commands share -------------------------------------------------------------------------------


def all_cores() -> int:
    return os.cpu_count() or 1


@shared
@dataclass(kw_only=True, frozen=True)
class RowsOnly(Options):
    """A stage that does not change images: its output refers to the input's, unless --copy-images."""

    copy_images: bool = option(
        False,
        "Write the images into this output too (a self-contained dataset that webdataset reads on its own); "
        "by default the output's rows refer to the images where they already are.",
        switch=True,
        show_default=False,
    )


@shared
@dataclass(kw_only=True, frozen=True)
class OwnedOutput(Options):
    """A command that writes a dataset: what it does with an output that holds another job's."""

    overwrite: bool = option(
        False,
        "The output holds another job's results (other input or settings): clear it and start again.",
        switch=True,
        show_default=False,
    )


@shared
@dataclass(kw_only=True, frozen=True)
class FromDataset(Options):
    """A command that reads a dataset another stage wrote."""

    allow_incomplete: bool = option(
        False,
        "Go on without the input's incomplete shards (a stage still writing it); they are named in the output's manifest.",
        switch=True,
        show_default=False,
    )


@shared
@dataclass(kw_only=True, frozen=True)
class Executed(Options):
    """Where a command's tasks run."""

    processes: int | None = option(
        None, "Worker processes on this machine (never more than there are shards to do).", show_default="all cores"
    )
    executor: str = option(
        "local",
        "Where shard tasks run: local (--processes on this machine) or ray (one Ray task per shard; needs the ray extra).",
    )
    ray_address: str | None = option(
        None,
        "With --executor ray: the cluster (auto, ray://HOST:10001, HOST:6379; default $RAY_ADDRESS, else a Ray "
        "started on this machine).",
        show_default=False,
    )

    def validate(self) -> None:
        super().validate()
        check(self.processes is None or self.processes >= 1, f"--processes must be at least 1, not {self.processes}")
        check(self.executor in ("local", "ray"), f"--executor must be one of local, ray, not {self.executor!r}")
        check(self.ray_address is None or self.executor == "ray", "--ray-address needs --executor ray")

    @property
    def workers(self) -> int:
        """--processes, or the command's default."""
        return self.default_processes() if self.processes is None else self.processes

    def default_processes(self) -> int:
        """What --processes is when it is not given: all cores."""
        return all_cores()

    def with_default_processes(self: OptionsT) -> OptionsT:
        """These options with --processes as the command line runs them when it is not given. The
        library's own default is one process (``lenscap.api``), so the CLI and recipes fill it in."""
        if self.processes is not None:  # type: ignore[attr-defined]
            return self
        return dataclasses.replace(self, processes=self.default_processes())  # type: ignore[attr-defined]


# -- values from a recipe ----------------------------------------------------------------------------------


def _local_only(values: Iterable[tuple[Any, str | None]]) -> None:
    for value, what in values:
        require_local(value, what or "this path")


def _invalid(value: Any, flag: str, what: str) -> UsageError:
    return UsageError(f"Invalid value for '{flag}': {value!r} is not {what}.")


def coerce(value: Any, tp: Any, flag: str) -> Any:
    """``value`` as type ``tp`` (``int | None``, ``list[str] | None``, ...), as the command line would
    parse it: a number where text belongs becomes its text, text of a number becomes the number."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        args = typing.get_args(tp)
    if typing.get_origin(tp) is list:
        items = value if isinstance(value, list) else [value]
        return [coerce(v, args[0], flag) for v in items]
    if isinstance(value, (list, dict)):
        return _fail(value, flag, f"a single {_noun(tp)}")
    converters: dict[Any, Callable[[Any], Any]] = {bool: _bool, int: _int, float: _float, str: _str}
    try:
        return converters[tp](value)
    except (TypeError, ValueError):
        return _fail(value, flag, f"a valid {_noun(tp)}")


def _fail(value: Any, flag: str, what: str) -> Any:
    raise _invalid(value, flag, what)


def _noun(tp: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(value)


def _int(value: Any) -> int:
    if isinstance(value, bool) or isinstance(value, float):
        raise ValueError(value)
    return int(value)


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(value)
    return float(value)


def _str(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        raise ValueError(value)
    return str(value)
