"""The handle :func:`tokencomp.apply` returns: statistics, removal, context manager."""

from __future__ import annotations

from typing import Any, Callable

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
