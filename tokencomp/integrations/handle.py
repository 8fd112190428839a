"""The handle :func:`tokencomp.apply` returns (statistics, removal, context manager), and the one recorder
of its statistics."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from ..base import Compressor

_ATTRIBUTE = "_tokencomp_handle"


class Handle:
    """An applied compression: undo it with :meth:`remove` or by leaving a ``with`` block.

    Attributes
    ----------
    model : torch.nn.Module
        The model the compression is applied to.
    stats : list of dict
        One entry per prefill: ``stage``, ``tokens_in`` and ``tokens_out`` (visual tokens over the
        batch), ``compress_seconds`` (time inside the strategy) and ``prefill_seconds`` (vision
        encoding plus the language model's prefill, compression included).
    """

    def __init__(self, model: Any, description: str) -> None:
        if getattr(model, _ATTRIBUTE, None) is not None:
            raise RuntimeError(
                f"tokencomp.apply: this model already has a compression applied "
                f"({getattr(model, _ATTRIBUTE).description}); call handle.remove() before applying another."
            )
        self.model = model
        self.description = description
        self.stats: list[dict[str, Any]] = []
        self._undo: list[Callable[[], None]] = []
        self._removed = False
        setattr(model, _ATTRIBUTE, self)

    def on_remove(self, undo: Callable[[], None]) -> None:
        """Register a step of the undo (run in reverse order by :meth:`remove`)."""
        self._undo.append(undo)

    def remove(self) -> None:
        """Restore the model exactly as it was before :func:`tokencomp.apply`.

        Raises
        ------
        RuntimeError
            If the handle was already removed.
        """
        if self._removed:
            raise RuntimeError(f"tokencomp: this compression ({self.description}) was already removed.")
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self._removed = True
        if getattr(self.model, _ATTRIBUTE, None) is self:
            delattr(self.model, _ATTRIBUTE)

    @property
    def removed(self) -> bool:
        return self._removed

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._removed:
            self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "active"
        return f"<tokencomp.Handle {self.description} ({state}, {len(self.stats)} prefills)>"


class PrefillStats:
    """One way to record a prefill's statistics into ``handle.stats``: one record per stage.

    Compression calls add up (:meth:`count`) until :meth:`flush` appends the records, each with the
    time since :meth:`begin` as ``prefill_seconds``.
    """

    def __init__(self, handle: "Handle") -> None:
        self.handle = handle
        self.reset()

    def reset(self) -> None:
        """Forget the pending prefill (after it was recorded, or abandoned)."""
        self.start: Optional[float] = None
        self.records: dict[str, dict[str, Any]] = {}

    def begin(self) -> None:
        """Start the prefill's clock, unless it is already running."""
        if self.start is None:
            self.start = time.perf_counter()

    def count(self, stage: str, compressor: Compressor, start: float, tokens_in: int, tokens_out: int) -> None:
        """Add one compression call of ``stage`` (started at ``start``, ``perf_counter``)."""
        seconds = time.perf_counter() - start
        record = self.records.setdefault(
            stage,
            {
                "stage": stage,
                "strategy": compressor.display_name(),
                "tokens_in": 0,
                "tokens_out": 0,
                "compress_seconds": 0.0,
            },
        )
        record["tokens_in"] += tokens_in
        record["tokens_out"] += tokens_out
        record["compress_seconds"] += seconds

    def flush(self) -> None:
        """Append the pending records (if any) to ``handle.stats`` and reset."""
        if self.records:
            now = time.perf_counter()
            elapsed = now - (self.start if self.start is not None else now)
            for record in self.records.values():
                record["prefill_seconds"] = elapsed
            self.handle.stats.extend(self.records.values())
        self.reset()
