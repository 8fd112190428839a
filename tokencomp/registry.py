"""The strategy registry: ``register``, ``create``, ``available``, ``get``.

Strategies are found by importing every module of :mod:`tokencomp.strategies` and by the entry-point
group ``tokencomp.strategies``, both lazily on the first lookup. There is no hand-kept list.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
import re
import typing
from importlib.metadata import entry_points
from typing import Any, Callable, TypeVar

from .base import Compressor
from .constraints import Constraint, describe
from .errors import InvalidParameterError, UnknownStrategyError
from .padding import INFO_KINDS

__all__ = ["ENTRY_POINT_GROUP", "available", "capability_row", "create", "get", "register"]

ENTRY_POINT_GROUP = "tokencomp.strategies"
_NAME = re.compile(r"^[a-z][a-z0-9_\-]*$")

_registry: dict[str, type[Compressor]] = {}
_loaded = False
_loading = False

C = TypeVar("C", bound=type[Compressor])


def _capability_values() -> dict[str, tuple[Any, ...]]:
    """Each capability attribute of :class:`Compressor` and the values it may take, read from its
    annotations: a ``ClassVar[Literal[...]]`` takes those values, a ``ClassVar[bool]`` ``False`` or ``True``."""
    found: dict[str, tuple[Any, ...]] = {}
    for attribute, hint in typing.get_type_hints(Compressor).items():
        if typing.get_origin(hint) is not typing.ClassVar:
            continue
        (inner,) = typing.get_args(hint)
        if typing.get_origin(inner) is typing.Literal:
            found[attribute] = typing.get_args(inner)
        elif inner is bool:
            found[attribute] = (False, True)
    return found


# The values each capability attribute of a Compressor may take (read by the integrations, the
# analysis, the CLI and the docs, so a misspelled one must fail here rather than be ignored there).
CAPABILITY_VALUES: dict[str, tuple[Any, ...]] = _capability_values()


def _check_declarations(name: str, cls: type[Compressor]) -> None:
    """Raise ``ValueError`` if a capability, ``requires``, ``carries`` or ``info_layout`` declaration is malformed."""
    from .types import Context

    for attribute, allowed in CAPABILITY_VALUES.items():
        value = getattr(cls, attribute)
        if isinstance(value, property):  # a per-instance capability (VisionZip's convex_outputs), checked on use
            continue
        if not any(value is a or (isinstance(value, str) and value == a) for a in allowed):
            raise ValueError(
                f"register({name!r}): {attribute} must be one of {', '.join(repr(a) for a in allowed)}; "
                f"got {value!r}. Fix the class attribute {cls.__qualname__}.{attribute}."
            )
    if cls.stage == "in_llm" and cls.llm_layers is Compressor.llm_layers:
        raise ValueError(
            f"register({name!r}): an in-LLM strategy must say where it acts; override "
            f"{cls.__qualname__}.llm_layers() to return its decoder layers (one per stage)."
        )
    unknown = [f for f in cls.requires if f not in Context.field_names()]
    if unknown:
        raise ValueError(
            f"register({name!r}): requires names {', '.join(repr(f) for f in unknown)}, which are not "
            f"tokencomp.Context fields; use some of {', '.join(Context.field_names())}."
        )
    per_row = [f for f in Context.layout() if f not in Context.per_token_fields()]
    wrong = [f for f in cls.carries if f not in per_row]
    if wrong:
        raise ValueError(
            f"register({name!r}): carries names {', '.join(repr(f) for f in wrong)}, which are not per-row tensor "
            f"fields of tokencomp.Context (the tokens change between stages); use some of {', '.join(per_row)}."
        )
    bad = {k: v for k, v in dict(cls.info_layout).items() if v not in INFO_KINDS}
    if bad:
        raise ValueError(f"register({name!r}): info_layout kinds must be one of {', '.join(INFO_KINDS)}; got {bad!r}.")
    _check_constraints(name, cls)


def _check_constraints(name: str, cls: type[Compressor]) -> None:
    """Raise ``ValueError`` unless ``parameter_constraints`` names parameters and allows their defaults."""
    params = {p.name: p for p in inspect.signature(cls.__init__).parameters.values()}
    where = f"{cls.__qualname__}.parameter_constraints"
    for param, constraints in cls.parameter_constraints.items():
        if param not in params or params[param].kind is not inspect.Parameter.KEYWORD_ONLY:
            raise ValueError(
                f"register({name!r}): {where} names {param!r}, which is no keyword-only parameter of "
                f"{cls.__qualname__}.__init__ ({', '.join(cls._param_names()) or 'none'})."
            )
        if (
            not isinstance(constraints, tuple)
            or not constraints
            or not all(isinstance(c, Constraint) for c in constraints)
        ):
            raise ValueError(
                f"register({name!r}): {where}[{param!r}] must be a non-empty tuple of "
                f"tokencomp.constraints.Constraint instances; got {constraints!r}."
            )
        default = params[param].default
        if default is not inspect.Parameter.empty and not any(c.accepts(default) for c in constraints):
            raise ValueError(
                f"register({name!r}): the default {param}={default!r} is not allowed by {where}[{param!r}] "
                f"({describe(constraints)}); fix the default or the constraints."
            )


def register(name: str) -> Callable[[C], C]:
    """Class decorator registering a :class:`Compressor` subclass under ``name``.

    Raises
    ------
    ValueError
        If ``name`` is malformed or already registered, the class is not a ``Compressor``, or its
        ``padding`` or ``info_layout`` declaration is malformed.

    Examples
    --------
    >>> import tokencomp as tc
    >>> @tc.register("keep-first-doc")
    ... class KeepFirst(tc.Compressor):
    ...     deterministic = True
    ...     def _compress(self, tokens, k, context):
    ...         import torch
    ...         idx = torch.arange(k).expand(tokens.shape[0], k)
    ...         return tc.selection_result(tokens, idx)
    >>> "keep-first-doc" in tc.available()
    True
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"register: strategy name must be lower-case letters, digits, '-' or '_' starting with a "
            f"letter; got {name!r}."
        )

    def decorate(cls: C) -> C:
        if not (isinstance(cls, type) and issubclass(cls, Compressor)):
            raise ValueError(f"register({name!r}): expected a tokencomp.Compressor subclass; got {cls!r}.")
        if name in _registry:
            other = _registry[name]
            raise ValueError(
                f"register: the name {name!r} is already taken by {other.__module__}.{other.__qualname__}; "
                "choose another name."
            )
        _check_declarations(name, cls)
        cls.name = name
        _registry[name] = cls
        return cls

    return decorate


def _load() -> None:
    """Import the bundled strategies and the entry points once."""
    global _loaded, _loading
    if _loaded or _loading:
        return
    _loading = True
    try:
        package = importlib.import_module(f"{__package__}.strategies")  # strategies/, mapped in pyproject.toml

        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package.__name__}.{info.name}")
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in _registry:
                continue
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must say which one it is
                raise ImportError(
                    f"tokencomp: the strategy plugin {ep.name!r} ({ep.value}) from entry-point group "
                    f"{ENTRY_POINT_GROUP!r} failed to import: {exc}"
                ) from exc
            if ep.name in _registry:  # the plugin's module registered itself on import
                continue
            if not (isinstance(obj, type) and issubclass(obj, Compressor)):
                raise ImportError(
                    f"tokencomp: the strategy plugin {ep.name!r} ({ep.value}) from entry-point group "
                    f"{ENTRY_POINT_GROUP!r} is {obj!r}, not a tokencomp.Compressor subclass; point the entry "
                    "point at the strategy's class."
                )
            register(ep.name)(obj)
        _loaded = True
    finally:
        _loading = False


def available() -> list[str]:
    """Sorted names of all registered strategies."""
    _load()
    return sorted(_registry)


def get(name: str) -> type[Compressor]:
    """The class registered under ``name``.

    Raises
    ------
    UnknownStrategyError
        For an unknown name, with close matches (a ``KeyError`` and an ``InputError``).
    """
    _load()
    if name in _registry:
        return _registry[name]
    close = difflib.get_close_matches(str(name), list(_registry), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownStrategyError(f"unknown strategy {name!r}.{hint} Available: {', '.join(sorted(_registry))}.")


def create(name: str, **params: Any) -> Compressor:
    """Build the strategy registered under ``name`` with keyword parameters.

    Raises
    ------
    KeyError
        Unknown strategy name.
    InvalidParameterError
        A parameter the strategy does not take, or a value it does not allow.
    """
    cls = get(name)
    allowed = cls._param_names()
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise InvalidParameterError(
            f"{name}: unknown parameter(s) {', '.join(repr(u) for u in unknown)}; "
            f"allowed: {', '.join(allowed) if allowed else 'none'}."
        )
    return cls(**params)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def capability_row(name: str) -> dict[str, str]:
    """What the registered strategy ``name`` declares, as plain-text cells under their column titles.

    The one source of ``tokencomp ls``, the README's table (``ls --markdown``) and the docs' strategy
    table and pages; each picks the columns it shows and formats them.
    """
    cls = get(name)
    return {
        "name": name,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "paper": cls.paper or "(reference)",
        "summary": cls.summary,
        "stage": cls.stage,
        "needs attention": _yes(cls.needs_attention),
        "FlashAttention / SDPA": cls.flash_attention(),
        "text-conditioned": _yes(cls.text_conditioned),
        "deterministic": "yes" if cls.deterministic else "no (seeded)",
        "context it needs": ", ".join(cls.requires) or "none",
        "time": cls.complexity or "?",
        "padded batches": cls.padding,
    }
