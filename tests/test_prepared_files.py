"""Files of a prepared folder: vocabularies (save, Vocab.load and read_vocab row for row) and metadata.json."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.data import vocab as V
from recsys.data.metadata import OOV_TOKEN, SparseFeature, read_vocab
from recsys.errors import DataError

# Characters str.splitlines() splits on besides "\n" and "\r": ids are exact strings, so a vocabulary
# line may hold any of them (one split would shift every later row of exported embeddings).
_SPLITLINES_ONLY = ["\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def test_vocab_readers_keep_ids_with_any_non_newline_separator(tmp_path: Path) -> None:
    """Vocab.load and metadata.read_vocab read the same rows: split on "\\n" only, one row per id."""
    ids = ["a", *(f"x{c}y" for c in _SPLITLINES_ONLY), f"end{_SPLITLINES_ONLY[-1]}", "z"]
    vocab = V.Vocab(ids=ids)
    vocab.save(tmp_path / "v.txt")
    assert V.Vocab.load(tmp_path / "v.txt").ids == ids
    feature = SparseFeature(name="item", num_embeddings=vocab.num_embeddings, vocab_file="v.txt")
    assert read_vocab(tmp_path, feature) == [OOV_TOKEN, *ids]


def test_vocab_save_refuses_line_breaks_and_read_names_a_file_of_the_wrong_size(tmp_path: Path) -> None:
    """ "\\n"/"\\r" in an id cannot be saved; a file whose row count differs from the metadata is named."""
    for bad in ("a\nb", "a\rb"):
        with pytest.raises(DataError, match="line break"):
            V.Vocab(ids=["ok", bad]).save(tmp_path / "bad.txt")
    V.Vocab(ids=["a", "b"]).save(tmp_path / "v.txt")
    feature = SparseFeature(name="item", num_embeddings=4, vocab_file="v.txt")
    with pytest.raises(DataError, match=r"v\.txt: 3 rows, metadata\.json says 4.*--overwrite"):
        read_vocab(tmp_path, feature)


@pytest.mark.parametrize(
    "text",
    ["{not json", '{"format_version": 1}', "[]", "\xff\xfe garbage"],
    ids=["syntax", "fields", "type", "bytes"],
)
def test_a_corrupt_metadata_json_is_one_line_naming_the_file_and_the_fix(tmp_path: Path, text: str) -> None:
    """Truncated, hand-edited or foreign metadata.json: a DataError naming it and `--overwrite`."""
    from recsys.data.metadata import metadata_path, read_metadata

    metadata_path(tmp_path).write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError) as e:
        read_metadata(tmp_path)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and msg.startswith(f"{tmp_path / 'metadata.json'}: ")
    assert "recsys data prepare --overwrite" in msg
