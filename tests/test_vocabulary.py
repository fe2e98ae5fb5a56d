"""Controlled vocabulary: parsing with file:line errors, rendering for the prompt, mapping answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmwatchd.errors import ConfigError
from mmwatchd.vocabulary import load, parse

TEXT = """\
# Keywords from my digiKam library
Animals/Dog; dog, dogs, puppy
Animals/Cat; kitten,          # a trailing comma is fine
Places/France/Paris
Places/France/Lyon
Sports/Bat
Animals/Bat
C#
"""


class TestParse:
    def test_entries_hierarchy_synonyms_and_comments(self) -> None:
        vocab = parse(TEXT)
        assert vocab.entries == (
            ("Animals", "Dog"), ("Animals", "Cat"), ("Places", "France", "Paris"), ("Places", "France", "Lyon"),
            ("Sports", "Bat"), ("Animals", "Bat"), ("C#",),
        )  # fmt: skip
        assert vocab.synonyms["puppy"] == ("Animals", "Dog")
        assert vocab.synonyms["kitten"] == ("Animals", "Cat")
        assert len(vocab) == 7

    def test_every_bad_line_is_reported_with_file_and_line(self, tmp_path: Path) -> None:
        path = tmp_path / "tags.txt"
        path.write_text(
            "Animals/Dog; dog\n"  # 1: fine
            "Animals//Cat\n"  # 2
            "; orphan\n"  # 3
            "Birds/Owl; owl; hoot\n"  # 4
            "Places|Paris\n"  # 5
            "animals/dog\n"  # 6: the same as line 1
            "Pets/Rex; dog\n"  # 7: "dog" already means Animals/Dog
            "Trees/Oak; a,,b\n"  # 8
            "Fish/Cod;\n"  # 9
            "Fruit/Fig; fig/tree\n"  # 10
        )
        with pytest.raises(ConfigError) as caught:
            load(path)
        problems = caught.value.problems
        assert [p.split(": ", 1)[0] for p in problems] == [f"{path}:{n}" for n in (2, 3, 4, 5, 6, 7, 8, 9, 10)]
        assert "empty level" in problems[0]
        assert "no keyword" in problems[1]
        assert "more than one ';'" in problems[2]
        assert "'|'" in problems[3]
        assert "already listed on line 1" in problems[4]
        assert "already means 'Animals/Dog' (line 1)" in problems[5]
        assert "empty synonym" in problems[6]
        assert "no synonyms" in problems[7]
        assert "contains '/'" in problems[8]

    def test_file_problems(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="vocabulary file not found"):
            load(tmp_path / "missing.txt")
        with pytest.raises(ConfigError, match="is a folder"):
            load(tmp_path)
        latin = tmp_path / "latin.txt"
        latin.write_bytes("Animals/Dog\nPlaces/Mûnster\n".encode("latin-1"))
        with pytest.raises(ConfigError, match=rf"{latin}:2: not UTF-8"):
            load(latin)

    def test_a_bom_and_crlf_are_fine(self, tmp_path: Path) -> None:
        path = tmp_path / "tags.txt"
        path.write_bytes("\ufeffAnimals/Dog; dog\r\nPlaces/Paris\r\n".encode())
        assert load(path).entries == (("Animals", "Dog"), ("Places", "Paris"))


class TestRender:
    def test_compact_one_line_per_parent(self) -> None:
        assert parse(TEXT).render() == (
            "C#\nAnimals: Dog, Cat, Bat\nPlaces: France\nPlaces/France: Paris, Lyon\nSports: Bat"
        )

    def test_synonyms_stay_out_of_the_prompt(self) -> None:
        assert "puppy" not in parse(TEXT).render()


class TestMap:
    def test_case_synonyms_leaves_and_paths(self) -> None:
        mapped = parse(TEXT).map(["PUPPY", "dog", "kitten", "paris", "places / france", "Animals", "c#"])
        assert mapped.keywords == (
            ("Animals", "Dog"), ("Animals", "Cat"), ("Places", "France", "Paris"), ("Places", "France"),
            ("Animals",), ("C#",),
        )  # fmt: skip
        assert mapped.unknown == ()

    def test_unknown_and_ambiguous_leaves_are_not_guessed(self) -> None:
        mapped = parse(TEXT).map(["bat", "Sports/Bat", "tree", "Tree", "  "])
        assert mapped.keywords == (("Sports", "Bat"),)
        assert mapped.unknown == ("bat", "tree")
        assert mapped.ambiguous == ("bat",)
        assert mapped.describe() == {"keywords": ["Sports/Bat"], "unknown": ["bat", "tree"], "ambiguous": ["bat"]}

    def test_a_synonym_wins_over_another_entrys_leaf(self) -> None:
        vocab = parse("Animals/Dog; hound\nBreeds/Hound\n")
        assert vocab.map(["Hound"]).keywords == (("Animals", "Dog"),)
        assert vocab.map(["breeds/hound"]).keywords == (("Breeds", "Hound"),)


class TestConfigSpecs:
    """The config values, validated the way config.py validates every section (pydantic on the dataclasses)."""

    def test_defaults_and_values(self, tmp_path: Path) -> None:
        from pydantic import TypeAdapter

        from mmwatchd.model import KeywordsSpec, XmpSpec

        assert TypeAdapter(XmpSpec).validate_python({}) == XmpSpec(
            description="caption", keywords="tags", prefix="", naming="name"
        )
        spec = TypeAdapter(XmpSpec).validate_python({"prefix": "AI", "naming": "stem", "keywords": None})
        assert (spec.prefix, spec.naming, spec.keywords) == ("AI/", "stem", None)
        vocab = tmp_path / "tags.txt"
        vocab.write_text("Animals/Dog; dog\n")
        assert TypeAdapter(KeywordsSpec).validate_python({"vocabulary": str(vocab)}).unknown == "keep"

    @pytest.mark.parametrize(
        ("spec", "data", "says"),
        [
            ("XmpSpec", {"prefix": "AI|x"}, "prefix"),
            ("XmpSpec", {"naming": "full"}, "naming"),
            ("XmpSpec", {"descripton": "caption"}, "descripton"),
            ("KeywordsSpec", {"vocabulary": "VOCAB", "unknown": "maybe"}, "unknown"),
            ("KeywordsSpec", {"vocabulary": "VOCAB"}, "VOCAB:2: empty level"),
        ],
    )
    def test_problems_are_reported_at_the_key(self, tmp_path: Path, spec: str, data: dict[str, str], says: str) -> None:
        from pydantic import TypeAdapter, ValidationError

        from mmwatchd import model as xmpspec

        vocab = tmp_path / "tags.txt"
        vocab.write_text("Animals/Dog\nAnimals//Cat\n")
        data = {k: v.replace("VOCAB", str(vocab)) for k, v in data.items()}
        with pytest.raises(ValidationError) as caught:
            TypeAdapter(getattr(xmpspec, spec)).validate_python(data)
        assert says.replace("VOCAB", str(vocab)) in str(caught.value)
