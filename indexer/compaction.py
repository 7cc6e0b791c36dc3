"""Segment compaction of an index directory: the patch store's segments stay few.

Each commit (add or remove) ends by merging the small segments (under ``COMPACT_SMALL_ROWS``
images) into one new segment once there are more than ``COMPACT_MAX_SMALL`` of them,
synchronously. The merged segment is written first, then one transaction repoints the images'
``(segment, offset)`` and the segment list, then the old files are deleted; a crash leaves the
old or the new layout, and the next open removes the files of the other. Segments left without
images are dropped the same way.

:class:`SegmentCompaction` is a part of :class:`indexer.index_dir.IndexDir`; it uses the index
directory's ``db``, ``store``, ``segments``, ``next_segment``, ``checksums`` and ``folder``, and
keeps a count of images per segment in ``_counts`` (None: read again when needed).
"""

from __future__ import annotations

import logging
import sqlite3

COMPACT_SMALL_ROWS = 256  # a segment holding fewer images than this is small
COMPACT_MAX_SMALL = 32  # more small segments than this are merged into one

log = logging.getLogger(__name__)


class SegmentCompaction:
    """Merging small segments and dropping empty ones (a part of :class:`~indexer.index_dir.IndexDir`)."""

    _counts: dict[int, int] | None = None  # images per live segment, read when first needed

    def _segment_counts(self) -> dict[int, int]:
        """Images per live segment (0 for a segment whose images were all removed)."""
        if self._counts is None:
            stored = self.db.segment_counts()
            self._counts = {seg: stored.get(seg, 0) for seg in self.segments}
        return self._counts

    def compact(self, *, force: bool = False) -> int:
        """Merge the small segments into one new segment when there are more than
        ``COMPACT_MAX_SMALL`` of them (with ``force``: when there are two or more), and drop
        the segments without images. Every image keeps its FAISS id and exact features; the
        change is one transaction (see the module's docstring). Returns the segments removed."""
        counts = self._segment_counts()
        empty = [seg for seg in self.segments if counts.get(seg, 0) == 0]
        small = [seg for seg in self.segments if 0 < counts.get(seg, 0) < COMPACT_SMALL_ROWS]
        merge = small if len(small) > COMPACT_MAX_SMALL or (force and len(small) > 1) else []
        if not merge and not empty:
            return 0
        segments = [seg for seg in self.segments if seg not in set(merge) | set(empty)]
        next_segment = self.next_segment
        relocate: list[tuple[int, int, int]] = []
        if merge:
            target = next_segment
            next_segment += 1
            locations = self.db.locations_in(merge)
            try:
                merged = self.store.write_merged(target, [(seg, off) for _, seg, off in locations])
            except BaseException:
                self.store.remove_segments([target])  # never committed: nothing refers to it
                raise
            relocate = [(row, target, k) for k, (row, _, _) in enumerate(locations)]
            segments.append(target)
        # On a failed commit the new segment is left to the next open's garbage collection:
        # whether it became live is then read from the database, not guessed here.
        gone = [*merge, *empty]
        checksums = {k: v for k, v in self.checksums.items() if int(k) not in set(gone)}
        if merge:
            checksums[str(target)] = merged
        self.db.commit(relocate=relocate, state={"segments": segments, "next_segment": next_segment,
                                                 "checksums": checksums})
        self.segments, self.next_segment, self.checksums = segments, next_segment, checksums
        for seg in gone:
            counts.pop(seg, None)
        if merge:
            counts[target] = len(relocate)
        self.store.remove_segments(gone)
        return len(gone)

    def _compact_after_commit(self) -> None:
        """Compact after a change that is already committed: a failure leaves the previous
        (valid) layout and is logged, not raised, since the change itself succeeded."""
        try:
            self.compact()
        except (OSError, sqlite3.Error) as err:
            self._counts = None
            log.warning("compacting the patch store of %s failed; the index is unchanged: %s", self.folder, err)

