"""The pytest decorator that parametrises a test over compressors x conformance checks."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Iterable

from ..base import Compressor
from ._skip import SkipCheck

__all__ = ["parametrize_with_checks"]


def parametrize_with_checks(compressors: Iterable[Compressor], checks: Iterable[Callable] | None = None) -> Any:
    """A ``pytest.mark.parametrize`` over every ``(compressor, check)`` pair, as scikit-learn's.

    Each test receives one compressor and one check, with the id ``"<compressor>-<check name>"``
    (``<compressor>`` is the registry name, followed by the parameters that differ from their defaults).
    A check that does not apply (:class:`SkipCheck`) is reported as skipped with its reason, never as
    passed; a failing one raises ``AssertionError``.

    Parameters
    ----------
    compressors : iterable of Compressor
        The instances to check.
    checks : iterable of callable, optional
        The checks to run (default: :func:`all_checks`).

    Examples
    --------
    >>> import tokencomp as tc
    >>> from tokencomp.testing import parametrize_with_checks
    >>> @parametrize_with_checks([tc.create("random"), tc.create("apet", basis="qr")])
    ... def test_conforms(compressor, check):
    ...     check(compressor)
    """
    import pytest

    from . import all_checks

    compressors = list(compressors)
    bad = [c for c in compressors if not isinstance(c, Compressor)]
    if bad:
        raise TypeError(f"parametrize_with_checks expects tokencomp.Compressor instances; got {bad[0]!r}")
    checks = list(all_checks() if checks is None else checks)
    params = [
        pytest.param(compressor, _skipping(check), id=f"{compressor_id(compressor)}-{check.__name__}")
        for compressor in compressors
        for check in checks
    ]
    return pytest.mark.parametrize("compressor, check", params)


def compressor_id(compressor: Compressor) -> str:
    """``name`` or ``name[param=value,...]`` with the parameters that differ from their defaults."""
    init = inspect.signature(type(compressor).__init__).parameters
    changed = {
        name: value
        for name, value in compressor.get_params().items()
        if name not in init or init[name].default is inspect.Parameter.empty or init[name].default != value
    }
    name = compressor.display_name()
    return name + ("[" + ",".join(f"{p}={v}" for p, v in changed.items()) + "]" if changed else "")


def _skipping(check: Callable[[Compressor], None]) -> Callable[[Compressor], None]:
    """``check`` with :class:`SkipCheck` turned into ``pytest.skip`` with its reason."""

    @functools.wraps(check)
    def run(compressor: Compressor) -> None:
        import pytest

        try:
            check(compressor)
        except SkipCheck as exc:
            pytest.skip(str(exc))

    return run
