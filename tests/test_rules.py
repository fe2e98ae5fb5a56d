from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from mmwatchd import rules
from mmwatchd.config import MatchSpec, Rule
from mmwatchd.globs import glob_match
from mmwatchd.model import EndpointConfig, ImageSpec


@pytest.mark.parametrize(
    ("path", "pattern", "expected"),
    [
        ("IMG_1.JPG", "*.jpg", True),  # case-insensitive: cameras shout
        ("a/b/IMG_1.jpg", "*.jpg", True),  # no slash: matches the name in any folder
        ("a/b/IMG_1.jpg", "**/*", True),
        ("IMG_1.jpg", "**/*.jpg", True),  # **/ is zero or more folders
        ("a/IMG_1.jpg", "b/*.jpg", False),
        ("b/c/IMG_1.jpg", "b/*.jpg", False),  # * does not cross /
        ("b/c/IMG_1.jpg", "b/**", True),
        ("x1.png", "x?.png", True),
        ("xa.png", "x[0-9].png", False),
        ("xa.png", "x[!0-9].png", True),
        ("a+b (1).jpg", "a+b (1).jpg", True),  # regex metacharacters are literal
    ],
)
def test_glob(path: str, pattern: str, expected: bool) -> None:
    assert glob_match(path, pattern) is expected


def _rule(name: str, kind: str = "any", glob: tuple[str, ...] = ("**/*",), **kw: object) -> Rule:
    return Rule(name=name, prompt="p", match=MatchSpec(kind=kind, glob=glob), **kw)  # type: ignore[arg-type]


class TestMatch:
    def test_first_match_wins_and_kind_filters(self) -> None:
        rs = [_rule("videos", "video"), _rule("raw", glob=("raw/**",)), _rule("all", "image")]
        assert rules.match("raw/x.jpg", "image", rs).name == "raw"  # type: ignore[union-attr]
        assert rules.match("x.jpg", "image", rs).name == "all"  # type: ignore[union-attr]
        assert rules.match("x.mp4", "video", rs).name == "videos"  # type: ignore[union-attr]
        assert rules.match("x.mp4", "video", rs[2:]) is None

    def test_rel_to_roots_picks_the_deepest_root(self, tmp_path: Path) -> None:
        outer, inner = tmp_path, tmp_path / "sub"
        assert rules.rel_to_roots(inner / "a" / "x.jpg", [outer, inner]) == (inner, "a/x.jpg")
        assert rules.rel_to_roots(outer / "x.jpg", [outer, inner]) == (outer, "x.jpg")
        assert rules.rel_to_roots(Path("/elsewhere/x.jpg"), [outer]) == (None, "x.jpg")


class TestRender:
    def test_values_are_text_and_never_reparsed(self) -> None:
        out = rules.render("Describe {name} {{literal}} taken {taken}.", {"name": "{path} evil.jpg", "taken": ""})
        assert out == "Describe {path} evil.jpg {literal} taken ."

    def test_every_placeholder_is_accepted(self) -> None:
        template = " ".join("{" + p + "}" for p in rules.PLACEHOLDERS)
        assert rules.check_template(template) == template


class TestFingerprint:
    def test_changes_with_everything_that_changes_the_answer(self) -> None:
        ep = EndpointConfig()
        base = _rule("a")
        fp = rules.fingerprint(base, ep)
        assert fp == rules.fingerprint(_rule("a"), ep)
        variants = [
            replace(base, prompt="other"),
            replace(base, system="sys"),
            replace(base, schema={"type": "object"}),
            replace(base, model="m2"),
            replace(base, max_tokens=7),
            replace(base, temperature=0.5),
            replace(base, image=ImageSpec(max_side=512)),
        ]
        prints = {rules.fingerprint(v, ep) for v in variants}
        assert fp not in prints and len(prints) == len(variants)
        assert rules.fingerprint(base, replace(ep, model="other")) != fp
        # Not part of the answer: the rule's globs, the endpoint's URL or concurrency.
        assert rules.fingerprint(replace(base, match=MatchSpec(glob=("*.png",))), ep) == fp
        assert rules.fingerprint(base, replace(ep, base_url="http://other:1/v1", concurrency=9)) == fp
