"""``stage i of n`` for long commands: the announcer (``index build`` / ``index add`` using it: test_index_cli)."""

from __future__ import annotations

import io
import re

import pytest

from indexer.stages import Stages


def _lines(stream: io.StringIO) -> list[str]:
    return [re.sub(r" \(previous stage: [0-9.]+ s\)", "", line) for line in stream.getvalue().splitlines()]


def test_stages_count_every_stage_once_in_order():
    out = io.StringIO()
    stages = Stages(["load", "embed", "train", "check"], stream=out)
    stages.begin("load", "test_vit")
    stages.begin("train")  # "embed" was never begun: announced as skipped, so the count does not jump
    stages.skip("check", "no threshold")
    stages.begin("load")  # already past: ignored, never counted twice
    stages.begin("unknown stage")  # not in the plan: ignored
    stages.finish()
    lines = _lines(out)
    assert lines[:4] == ["[1/4] load: test_vit", "[2/4] embed: skipped, not needed", "[3/4] train",
                         "[4/4] check: skipped, no threshold"]
    assert len(lines) == 5 and re.fullmatch(r"done in [0-9.]+ s", lines[4])


def test_stages_finish_announces_what_was_left_and_can_be_silenced():
    out = io.StringIO()
    stages = Stages(["a", "b"], stream=out)
    stages.begin("a")
    stages.finish()
    assert _lines(out)[:2] == ["[1/2] a", "[2/2] b: skipped, not needed"]
    quiet = io.StringIO()
    silent = Stages(["a"], enabled=False, stream=quiet)
    silent.begin("a")
    silent.finish()
    assert quiet.getvalue() == ""
    with pytest.raises(ValueError, match="repeat"):
        Stages(["a", "a"])
