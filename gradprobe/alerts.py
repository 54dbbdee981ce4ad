"""How a probe reports trouble: each kind of warning once, and a metric that failed as NaN
with one warning per kind of failure (raised instead under ``strict=True``).

User training never dies because a metric failed, and a long run's log is not flooded:
the second warning of a kind is dropped.

>>> import warnings
>>> alerts = Alerts(strict=False)
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     for block in ("a", "b"):
...         alerts.fail(f"input gradient of block {block}", ValueError("bad"))
>>> len(caught), "input gradient" in alerts
(1, True)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable


class Alerts:
    """The warnings one probe has given; ``key in alerts`` says whether one was."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self._warned: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self._warned

    def once(self, key: str, message: str) -> None:
        """Warn with ``message`` unless a warning of ``key`` was given already."""
        if key not in self._warned:
            self._warned.add(key)
            # stacklevel: past this, the probe's method and its hook, to the user's call
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def fail(self, where: str, exc: BaseException) -> None:
        """A metric failed at ``where``: raise under strict, else warn once per kind of failure."""
        if self.strict:
            raise exc
        # Once per kind of failure (not per block and step): later ones would flood the log.
        self.once(
            where.split(" of block ")[0],
            f"gradprobe: {where} failed ({type(exc).__name__}: {exc}); recording NaN there and "
            "carrying on. Pass strict=True to attach() to raise instead.",
        )

    def once_each(self, prefix: str, names: list[str], message: Callable[[list[str]], str]) -> None:
        """One warning for those of ``names`` not yet warned about under ``prefix:name``."""
        fresh = [n for n in names if f"{prefix}:{n}" not in self._warned]
        if fresh:
            self._warned.update(f"{prefix}:{n}" for n in fresh)
            warnings.warn(message(fresh), RuntimeWarning, stacklevel=4)
