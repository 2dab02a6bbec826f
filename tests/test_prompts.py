"""Label and template validation: each bad input gets its own typed error."""
from __future__ import annotations

import pytest

from steadyclip.engine.prompts import (
    TemplateSet,
    get_template_set,
    read_labels_file,
    validate_labels,
)
from steadyclip.errors import LabelError, TemplateError
from steadyclip.numerics import identity


def test_valid_labels_are_stripped() -> None:
    assert validate_labels([" red circle ", "blue square"]) == ["red circle", "blue square"]


@pytest.mark.parametrize(
    ("labels", "needle"),
    [
        ([], "empty"),
        (["cat", ""], "blank"),
        (["cat", "   "], "blank"),
        (["cat", "cat "], "twice"),
        (["cat", 3], "not a string"),
        ("cat,dog", "list of strings"),
        (None, "list of strings"),
    ],
)
def test_bad_labels_raise_label_error(labels: object, needle: str) -> None:
    with pytest.raises(LabelError, match=needle):
        validate_labels(labels)


def test_label_limit() -> None:
    with pytest.raises(LabelError, match="exceed"):
        validate_labels([f"l{i}" for i in range(11)], max_labels=10)


def test_builtin_template_sets() -> None:
    assert get_template_set(None).templates == ("a photo of a {}.",)
    imagenet = get_template_set("openai-imagenet")
    assert len(imagenet.templates) == 80
    assert all(t.count("{}") == 1 for t in imagenet.templates)
    assert imagenet.sha256 != get_template_set("photo").sha256


def test_template_hash_is_of_the_exact_ordered_strings_in_the_one_canonical_form() -> None:
    a = get_template_set(["a photo of a {}.", "a drawing of a {}."])
    assert a.sha256 == identity.sha256_json(["a photo of a {}.", "a drawing of a {}."])
    assert a.sha256 == TemplateSet("another name", a.templates).sha256  # the name is not part of it
    assert a.sha256 != get_template_set(list(reversed(a.templates))).sha256
    assert a.sha256 != get_template_set(["a photo of a {}. ", "a drawing of a {}."]).sha256


def test_template_fill_keeps_braces_in_labels() -> None:
    assert get_template_set(["x {} y"]).fill("a {b}") == ["x a {b} y"]


def test_template_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "t.txt"
    f.write_text("# comment\na photo of a {}.\n\na sketch of a {}.\n")
    assert get_template_set(f).templates == ("a photo of a {}.", "a sketch of a {}.")
    f.write_text("no placeholder here\n")
    with pytest.raises(TemplateError, match="exactly one"):
        get_template_set(f)


def test_unknown_template_name() -> None:
    with pytest.raises(TemplateError, match="built-in"):
        get_template_set("no-such-set")


def test_labels_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "labels.txt"
    f.write_text("red circle\n\n# skip\nblue square\n")
    assert read_labels_file(f) == ["red circle", "blue square"]
    with pytest.raises(LabelError, match="cannot read"):
        read_labels_file(tmp_path / "missing.txt")
