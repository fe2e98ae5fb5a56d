from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from mmwatchd import config, rules, templates
from mmwatchd.cli import main
from mmwatchd.globs import compile_glob, glob_match
from mmwatchd.model import EndpointConfig, ImageSpec, MatchSpec, Rule
from mmwatchd.walk import scan, wanted


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
        # Brace expansion, as in the shell: each alternative is a pattern of its own.
        ("a/IMG_1.PNG", "*.{jpg,png}", True),
        ("a/IMG_1.jpg", "*.{jpg,png}", True),
        ("a/IMG_1.gif", "*.{jpg,png}", False),
        ("IMG_1.jpg.json", "*.{jpg,png}", False),
        ("IMG_1_edited.jpg", "IMG_1{,_edited}.jpg", True),  # an empty alternative
        ("IMG_1.jpg", "IMG_1{,_edited}.jpg", True),
        ("x.tif", "x.{jp{,e}g,ti{f,ff}}", True),  # nested groups
        ("x.jpeg", "x.{jp{,e}g,ti{f,ff}}", True),
        ("x.tiff", "x.{jp{,e}g,ti{f,ff}}", True),
        ("x.jpe", "x.{jp{,e}g,ti{f,ff}}", False),
        ("raw/2024/a.tif", "{raw/**,*.dng}", True),  # the part with a / is anchored at the root...
        ("old/raw/a.tif", "{raw/**,*.dng}", False),
        ("old/raw/a.dng", "{raw/**,*.dng}", True),  # ...the part without one matches in any folder
        ("a/b,c.jpg", "{a/b,c}.jpg", False),  # the comma splits the group, it is not part of the name
        ("a/b.jpg", "{a/b,c}.jpg", True),
        ("c.jpg", "{a/b,c}.jpg", True),
        # Escapes make a character literal; braces inside a class are members.
        ("{draft}.jpg", r"\{draft\}.jpg", True),
        ("draft.jpg", r"\{draft\}.jpg", False),
        ("a*.jpg", r"a\*.jpg", True),
        ("ab.jpg", r"a\*.jpg", False),
        ("[1].jpg", r"\[1\].jpg", True),
        ("{.jpg", "[{].jpg", True),
        ("a,b.jpg", "{a\\,b.jpg,x}", True),  # an escaped comma does not split
        ("x-1.jpg", "x[!a-z].jpg", False),
        ("x-.jpg", "x[a-].jpg", True),  # a trailing - is a member
    ],
)
def test_glob(path: str, pattern: str, expected: bool) -> None:
    assert glob_match(path, pattern) is expected


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("*.{jpg,png", "unmatched '{'"),
        ("*.jpg,png}", "unmatched '}'"),
        ("*.{jpg}", "has no comma"),  # bash keeps it literal: a pattern that matches nothing anyone meant
        ("{1..3}.jpg", "has no comma"),
        ("{,}", "empty pattern"),
        ("{a,b}" * 9, "more than 256 patterns"),
        ("a\\", "lone backslash"),
        ("x[ab.{jpg,png}", "unclosed '['"),
    ],
)
def test_malformed_globs_are_refused(pattern: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        compile_glob(pattern)


class TestGlobsInTheConfig:
    """``match.glob`` and ``watch[].include/exclude``: braces work, and a broken pattern stops ``mmwatchd check``."""

    CONFIG = """\
watch:
  - path: {root}
    include: ["*.{{jpg,png}}", "clips/*.{{mp4,mov}}"]
    exclude: ["**/{{tmp,.cache}}/**", "*_{{small,thumb}}.*"]
rules:
  - name: raw
    match: {{glob: "{{raw,scans}}/**"}}
    prompt: "p"
  - name: photos
    match: {{kind: image, glob: ["*.{{jpg,jpeg}}", "*.png"]}}
    prompt: "p"
"""

    def test_rules_and_watch_filters_expand_braces(self, tmp_path: Path) -> None:
        root = tmp_path / "lib"
        files = ["a.jpg", "b.PNG", "c.gif", "sub/d.jpg", "tmp/e.jpg", "sub/.cache/f.png", "g_thumb.jpg",
                 "clips/h.mov", "clips/deeper/i.mp4", "raw/j.png"]  # fmt: skip
        for name in files:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(b"x")
        f = tmp_path / "c.yaml"
        f.write_text(self.CONFIG.format(root=root))
        cfg = config.load(f)
        (watch_root,) = cfg.watch
        found = sorted(p.relative_to(root).as_posix() for p in scan(watch_root, sidecar_suffix=".json"))
        assert found == ["a.jpg", "b.PNG", "clips/h.mov", "raw/j.png", "sub/d.jpg"]
        for name in files:  # the live watch applies the same filter as the scan
            assert wanted(watch_root, root / name, sidecar_suffix=".json") is (name in found), name
        assert rules.match("raw/j.png", "image", cfg.rules).name == "raw"  # type: ignore[union-attr]
        assert rules.match("scans/x/k.tif", "image", cfg.rules).name == "raw"  # type: ignore[union-attr]
        assert rules.match("sub/d.JPEG", "image", cfg.rules).name == "photos"  # type: ignore[union-attr]
        assert rules.match("sub/d.jpg", "video", cfg.rules) is None

    @pytest.mark.parametrize(
        ("where", "line"),
        [
            ('include: ["*.{jpg,png"]', "watch[0].include[0]: unmatched '{' in '*.{jpg,png'"),
            ('exclude: ["a", "{tmp}/**"]', "watch[0].exclude[1]: '{tmp}' in '{tmp}/**' has no comma"),
            ('include: ["x[ab"]', "watch[0].include[0]: unclosed '['"),
        ],
    )
    def test_check_refuses_a_broken_watch_glob(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, line: str
    ) -> None:
        f = tmp_path / "c.yaml"
        f.write_text(f"watch:\n  - path: {tmp_path}\n    {where}\nrules:\n  - name: p\n    prompt: p\n")
        assert main(["check", "-c", str(f)]) == 2
        err = capsys.readouterr().err
        assert f"{f}:3:" in err and line in err, err

    def test_check_refuses_a_broken_rule_glob(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        f = tmp_path / "c.yaml"
        f.write_text('rules:\n  - name: p\n    prompt: p\n    match: {glob: ["*.{jpg,png}", "*.{heic}"]}\n')
        assert main(["check", "-c", str(f)]) == 2
        assert "rules[0].match.glob: '{heic}' in '*.{heic}' has no comma" in capsys.readouterr().err


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
        out = templates.render("Describe {name} {{literal}} taken {taken}.", {"name": "{path} evil.jpg", "taken": ""})
        assert out == "Describe {path} evil.jpg {literal} taken ."

    def test_every_placeholder_is_accepted(self) -> None:
        template = " ".join("{" + p + "}" for p in templates.PLACEHOLDERS)
        assert templates.check_template(template) == template


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
