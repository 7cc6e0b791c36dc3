"""``stage i of n``: the one-line announcements of a long command's stages.

A command that knows its stages up front names them once (``Stages(["load the model", ...])``);
the code doing the work then calls :meth:`Stages.begin` with a stage's name as it starts it. A stage
that turns out not to be needed is announced as skipped, so that the count a user reads never jumps.
Lines go to stderr (stdout stays the command's result); the library's functions take ``stages=None``
and then say nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Sequence, TextIO


class Stages:
    """Announce each stage of a command as ``[i/n] name: detail`` with the time the previous one took."""

    def __init__(self, names: Sequence[str], *, enabled: bool = True, stream: TextIO | None = None) -> None:
        if len(set(names)) != len(names):
            raise ValueError(f"stage names repeat: {list(names)}")
        self.names = list(names)
        self.enabled = enabled
        self.stream = stream
        self._next = 0  # index of the next stage not yet begun
        self._started = time.perf_counter()
        self._stage_started: float | None = None

    def _say(self, line: str) -> None:
        if self.enabled:
            print(line, file=self.stream or sys.stderr, flush=True)

    def _took(self) -> str:
        if self._stage_started is None:
            return ""
        return f" (previous stage: {time.perf_counter() - self._stage_started:.1f} s)"

    def _reach(self, name: str) -> str | None:
        """Move to stage ``name`` (announcing the ones before it as skipped) and return its ``[i/n] name``
        prefix; None when it is not ahead in the plan (already past, or a stage the caller did not plan)."""
        if name not in self.names[self._next:]:
            return None
        position = self.names.index(name, self._next)
        self.skip_until(position)
        self._next = position + 1
        return f"[{position + 1}/{len(self.names)}] {name}"

    def begin(self, name: str, detail: str = "") -> None:
        """Start stage ``name``; stages named before it and not begun are announced as skipped.
        A name that is not in the plan (a stage of a caller that did not ask for it) is ignored."""
        if (prefix := self._reach(name)) is not None:
            self._say(f"{prefix}{': ' + detail if detail else ''}{self._took()}")
            self._stage_started = time.perf_counter()

    def skip(self, name: str, reason: str) -> None:
        """Announce stage ``name`` as not needed, with the reason."""
        if (prefix := self._reach(name)) is not None:
            self._say(f"{prefix}: skipped, {reason}")

    def skip_until(self, position: int) -> None:
        for k in range(self._next, position):
            self._say(f"[{k + 1}/{len(self.names)}] {self.names[k]}: skipped, not needed")
        self._next = max(self._next, position)

    def finish(self) -> None:
        """Announce the stages left as skipped, and the total time."""
        self.skip_until(len(self.names))
        self._say(f"done in {time.perf_counter() - self._started:.1f} s{self._took()}")
        self._stage_started = None


def begin(stages: Stages | None, name: str, detail: str = "") -> None:
    """:meth:`Stages.begin` when there are stages to announce."""
    if stages is not None:
        stages.begin(name, detail)


def skip(stages: Stages | None, name: str, reason: str) -> None:
    """:meth:`Stages.skip` when there are stages to announce."""
    if stages is not None:
        stages.skip(name, reason)
