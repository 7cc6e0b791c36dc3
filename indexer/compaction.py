"""Segment compaction of an index directory: the patch store's segments stay few.

Each commit (add or remove) ends by merging the small segments (under ``COMPACT_SMALL_ROWS``
images) into one new segment once there are more than ``COMPACT_MAX_SMALL`` of them,
synchronously. The merged segment is written first, then one transaction repoints the images'
``(segment, offset)`` and the segment list, then the old files are deleted; a crash leaves the
old or the new layout, and the next open removes the files of the other. Segments left without
images are dropped the same way.

:class:`SegmentCompaction` is a component of :class:`indexer.index_dir.IndexDir` (its ``compaction``):
it works on the index it is given (its ``db``, ``store``, ``folder`` and committed ``segments``,
``next_segment``, ``checksums``) and keeps the count of images per segment.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .index_dir import IndexDir

COMPACT_SMALL_ROWS = 256  # a segment holding fewer images than this is small
COMPACT_MAX_SMALL = 32  # more small segments than this are merged into one

log = logging.getLogger(__name__)


class SegmentCompaction:
    """Merging small segments and dropping empty ones, in ``index``."""

    def __init__(self, index: "IndexDir") -> None:
        self.index = index
        self._counts: dict[int, int] | None = None  # images per live segment, read when first needed

    def forget_counts(self) -> None:
        """Read the counts again when next needed (after a commit that may not have happened)."""
        self._counts = None

    def record_added(self, segment: int, images: int) -> None:
        """A committed segment of ``images`` new images."""
        if self._counts is not None:
            self._counts[segment] = images

    def segment_counts(self) -> dict[int, int]:
        """Images per live segment (0 for a segment whose images were all removed)."""
        if self._counts is None:
            stored = self.index.db.segment_counts()
            self._counts = {seg: stored.get(seg, 0) for seg in self.index.segments}
        return self._counts

    def compact(self, *, force: bool = False) -> int:
        """Merge the small segments into one new segment when there are more than
        ``COMPACT_MAX_SMALL`` of them (with ``force``: when there are two or more), and drop
        the segments without images. Every image keeps its FAISS id and exact features; the
        change is one transaction (see the module's docstring). Returns the segments removed."""
        counts = self.segment_counts()
        empty = [seg for seg in self.index.segments if counts.get(seg, 0) == 0]
        small = [seg for seg in self.index.segments if 0 < counts.get(seg, 0) < COMPACT_SMALL_ROWS]
        merge = small if len(small) > COMPACT_MAX_SMALL or (force and len(small) > 1) else []
        if not merge and not empty:
            return 0
        segments = [seg for seg in self.index.segments if seg not in set(merge) | set(empty)]
        next_segment = self.index.next_segment
        relocate: list[tuple[int, int, int]] = []
        if merge:
            target = next_segment
            next_segment += 1
            locations = self.index.db.locations_in(merge)
            try:
                merged = self.index.store.write_merged(target, [(seg, off) for _, seg, off in locations])
            except BaseException:
                self.index.store.remove_segments([target])  # never committed: nothing refers to it
                raise
            relocate = [(row, target, k) for k, (row, _, _) in enumerate(locations)]
            segments.append(target)
        # On a failed commit the new segment is left to the next open's garbage collection:
        # whether it became live is then read from the database, not guessed here.
        gone = [*merge, *empty]
        checksums = {k: v for k, v in self.index.checksums.items() if int(k) not in set(gone)}
        if merge:
            checksums[str(target)] = merged
        self.index.db.commit(relocate=relocate, state={"segments": segments, "next_segment": next_segment,
                                                 "checksums": checksums})
        self.index.segments, self.index.next_segment, self.index.checksums = segments, next_segment, checksums
        for seg in gone:
            counts.pop(seg, None)
        if merge:
            counts[target] = len(relocate)
        self.index.store.remove_segments(gone)
        return len(gone)

    def after_commit(self) -> None:
        """Compact after a change that is already committed: a failure leaves the previous
        (valid) layout and is logged, not raised, since the change itself succeeded."""
        try:
            self.compact()
        except (OSError, sqlite3.Error) as err:
            self._counts = None
            log.warning("compacting the patch store of %s failed; the index is unchanged: %s", self.index.folder, err)

