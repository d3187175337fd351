"""Path validation, property-based: what is accepted is exactly the documented grammar."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import paths
from gateway.errors import BadRequest

GRAMMAR = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
segment = st.text(alphabet="abcXYZ019._-", min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))


@given(st.lists(segment, min_size=1, max_size=10))
def test_valid_paths_are_accepted_unchanged(segs: list[str]) -> None:
    path = "/".join(segs)
    assert paths.secret_path(path) == path


@given(st.text(max_size=80))
def test_accepts_only_the_grammar(text: str) -> None:
    expected = (
        bool(GRAMMAR.match(text))
        and not any(s in (".", "..") for s in text.split("/"))
        and len(text) <= paths.MAX_PATH
        and len(text.split("/")) <= paths.MAX_SEGMENTS
    )
    try:
        paths.secret_path(text)
        accepted = True
    except BadRequest as exc:
        accepted = False
        # The message never quotes the input (short strings like "/" may occur in it by chance).
        assert exc.code == "invalid_path" and (len(text.strip()) < 4 or text not in exc.message)
    assert accepted == expected


@pytest.mark.parametrize("bad", ["..", "a/..", "../a", "a/./b", ".", "a//b", "/a", "a/", "a\x00b", "a\nb", "a b", "a:b", "ä"])
def test_known_bad_paths(bad: str) -> None:
    with pytest.raises(BadRequest):
        paths.secret_path(bad)


@pytest.mark.parametrize("good", ["a", "a.b", "..a", "a..", "team/app-1/db_main", ".hidden/x"])
def test_known_good_paths(good: str) -> None:
    assert paths.secret_path(good) == good
