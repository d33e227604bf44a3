"""Malformed text data is refused with its file and line, before anything is written; long fields are read."""

import pytest

from kdkit.data.text import _read_records
from kdkit.errors import KdkitError
from kdkit.lm.data import splits_from_documents, text_lm


def test_a_csv_row_with_too_many_or_too_few_fields_names_its_file_and_line(tmp_path):
    for rows, fields in (("a b,0\nc d,1,extra\n", 3), ("a b,0\nc d\n", 1)):
        path = tmp_path / "t.csv"
        path.write_text("text,label\n" + rows)
        with pytest.raises(KdkitError, match=rf"t\.csv line 3 has {fields} fields; the header has 2"):
            _read_records(path, "csv")


def test_csv_fields_longer_than_pythons_default_limit_are_read(tmp_path):
    long = "word " * 60_000  # 300,000 characters, beyond csv's default 131,072
    path = tmp_path / "long.csv"
    path.write_text(f'text,label\n"{long}",1\nshort,0\n')
    rows = _read_records(path, "csv")
    assert [r["label"] for r in rows] == ["1", "0"] and rows[0]["text"] == long


def test_a_one_per_line_file_read_as_one_document_says_which_option_to_set(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"line number {i} of the corpus\n" for i in range(50)))
    with pytest.raises(KdkitError, match="separator: line"):
        text_lm(str(path))


def test_a_corpus_without_held_out_documents_is_refused_naming_the_options():
    docs = [f"document {i} here" for i in range(10)]
    with pytest.raises(KdkitError, match="val_fraction=0.0 and data.test_fraction=0.0"):
        splits_from_documents(docs, max_length=8, vocab_size=64, tokenizer=None, val_fraction=0.0,
                              test_fraction=0.0)
