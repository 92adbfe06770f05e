"""The build-once cache mechanism shared by renders, real-image features and alignment evaluators."""

from pathlib import Path

import pytest

from text2img.utils.files import build_once


def test_builds_once_and_later_calls_find_it(tmp_path: Path) -> None:
    calls = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        tmp.write_text("data")

    target = tmp_path / "sub" / "cache.bin"
    build_once(target, build)
    build_once(target, build)
    assert target.read_text() == "data" and len(calls) == 1
    assert calls[0] != target  # written elsewhere, then renamed into place


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_failed_build_leaves_nothing_behind(tmp_path: Path, kind: str) -> None:
    def failing(tmp: Path) -> None:
        if kind == "folder":
            tmp.mkdir()
            (tmp / "weights").write_text("half")
        else:
            tmp.write_text("half")
        raise RuntimeError("interrupted")

    target = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="interrupted"):
        build_once(target, failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.lock"]  # no target, no temporary left
    build_once(target, lambda tmp: tmp.mkdir())  # and the next call builds it
    assert target.is_dir()
