import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refed_ray.data.seeds import read_seeds
from refed_ray.errors import UserError
from refed_ray.records.models import Reject, to_table
from tests.conftest import pairs, write_jsonl


def test_instruction_response_rows(tmp_path):
    seeds = read_seeds(str(write_jsonl(tmp_path / "s.jsonl", pairs(3))), max_bad_seeds=0)
    assert [r.instruction for r in seeds.references] == [p["instruction"] for p in pairs(3)]
    assert seeds.references[1].source == "s.jsonl:2"
    assert len({r.reference_id for r in seeds.references}) == 3


def test_lima_conversations_keep_single_turn_and_report_skips(tmp_path):
    rows = [
        {"conversations": ["What is 2+2?", "4, because two pairs make four."]},
        {"conversations": ["Hi", "Hello!", "How are you?", "Fine."]},
        {"conversations": [{"from": "human", "value": "Name a prime."}, {"from": "gpt", "value": "7"}]},
    ]
    seeds = read_seeds(str(write_jsonl(tmp_path / "lima.jsonl", rows)), max_bad_seeds=0)
    assert [r.response for r in seeds.references] == ["4, because two pairs make four.", "7"]
    assert len(seeds.skipped) == 1 and seeds.bad_rows == 0
    assert seeds.skipped[0].source == "lima.jsonl:2"
    assert "multi-turn conversation (4 turns)" in seeds.skipped[0].reason


def test_chat_messages_drop_system_and_check_roles(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                      {"role": "assistant", "content": "Paris."}]},
        {"messages": [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Capital?"}]},
    ]
    seeds = read_seeds(str(write_jsonl(tmp_path / "chat.jsonl", rows)), max_bad_seeds=1)
    assert [(r.instruction, r.response) for r in seeds.references] == [("Capital of France?", "Paris.")]
    assert "user turn then an assistant turn" in seeds.skipped[0].reason


def test_json_and_parquet_files(tmp_path):
    json_path = tmp_path / "s.json"
    json_path.write_text(json.dumps(pairs(2)))
    parquet_path = tmp_path / "s.parquet"
    pq.write_table(pa.Table.from_pylist(pairs(2)), parquet_path)
    from_json = read_seeds(str(json_path), 0).references
    from_parquet = read_seeds(str(parquet_path), 0).references
    assert [r.reference_id for r in from_json] == [r.reference_id for r in from_parquet]
    assert from_json[1].source == "s.json[1]" and from_parquet[1].source == "s.parquet:row 1"


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"instruction": "x", "response": ', "malformed JSON at column"),
        ('{"instruction": "x"}', "missing field 'response'"),
        ('{"instruction": 3, "response": "y"}', "field 'instruction' must be a string, got int"),
        ('{"instruction": "   ", "response": "y"}', "field 'instruction' is empty"),
        ('{"prompt": "x", "completion": "y"}', "no known fields"),
        ('["x", "y"]', "must be a JSON object"),
    ],
)
def test_bad_rows_are_counted_skips_naming_file_and_line(tmp_path, line, reason):
    path = write_jsonl(tmp_path / "s.jsonl", [*pairs(2), line])
    seeds = read_seeds(str(path), max_bad_seeds=1)
    assert len(seeds.references) == 2
    assert seeds.skipped[0].source == "s.jsonl:3"
    assert reason in seeds.skipped[0].reason
    with pytest.raises(UserError, match=r"1 bad rows in .*s.jsonl, more than max_bad_seeds=0:\n  s.jsonl:3: "):
        read_seeds(str(path), max_bad_seeds=0)


def test_non_utf8_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(json.dumps(pairs(1)[0]).encode() + b'\n{"instruction": "caf\xe9", "response": "x"}\n')
    seeds = read_seeds(str(path), max_bad_seeds=1)
    assert seeds.skipped[0].source == "s.jsonl:2" and "not UTF-8" in seeds.skipped[0].reason


def test_duplicates_name_the_first_occurrence(tmp_path):
    first, second = pairs(2)
    rows = [
        {**first, "id": "a"},
        {**second, "id": "b"},
        {**first, "id": "c"},  # the same pair under another id
        {**pairs(3)[2], "id": "b"},  # another pair under a taken id
    ]
    seeds = read_seeds(str(write_jsonl(tmp_path / "s.jsonl", rows)), max_bad_seeds=2)
    assert [r.reason for r in seeds.skipped] == [
        "duplicate reference (same pair as s.jsonl:1)",
        "duplicate id 'b' (also s.jsonl:2)",
    ]
    assert [r.reference_id for r in seeds.references] == ["a", "b"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", b"  \n", "seed file .*empty.jsonl is empty"),
        ("seeds.csv", b"a,b\n", "unknown seed file format '.csv'"),
        ("bad.json", b'[{"instruction": "x",\n "response": }]', r"bad.json:2: malformed JSON"),
        ("latin.json", b'[{"instruction": "caf\xe9"}]', r"latin.json:1: not UTF-8"),
        ("obj.json", b'{"instruction": "x"}', "must hold a list of rows"),
    ],
)
def test_file_level_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_seeds(str(path), max_bad_seeds=10)


def test_missing_file_and_nothing_usable(tmp_path):
    with pytest.raises(UserError, match="seed file not found"):
        read_seeds(str(tmp_path / "nope.jsonl"), 0)
    path = write_jsonl(tmp_path / "multi.jsonl", [{"conversations": ["a", "b", "c", "d"]}])
    with pytest.raises(UserError, match="no usable reference pairs"):
        read_seeds(str(path), 0)


def test_default_reference_set_is_clean_and_diverse():
    seeds = read_seeds(None, max_bad_seeds=0)
    assert 30 <= len(seeds.references) <= 50
    assert not seeds.skipped
    assert seeds.digest() == read_seeds(None, 0).digest()


# JSON's \u escapes can spell a lone surrogate: Python decodes it into a str that cannot be
# encoded (hashed, written to Parquet, printed). Each such row is a bad row, never a crash.
UNENCODABLE_ROWS = [
    ({"instruction": "Say \ud800 twice.", "response": "Twice."},
     "field 'instruction' is not valid Unicode text: surrogates not allowed ('\\ud800' at character 4)"),
    ({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello \udfff"}]},
     "messages[1] is not valid Unicode text: surrogates not allowed ('\\udfff' at character 6)"),
    ({"id": "\ud83d", "instruction": "Name a colour.", "response": "Blue."},
     "field 'id' is not valid Unicode text: surrogates not allowed ('\\ud83d' at character 0)"),
]


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_text_that_cannot_be_encoded_is_a_counted_bad_row(tmp_path, fmt):
    rows = [*pairs(2), *(row for row, _ in UNENCODABLE_ROWS)]
    if fmt == "jsonl":
        path, sources = write_jsonl(tmp_path / "s.jsonl", rows), ["s.jsonl:3", "s.jsonl:4", "s.jsonl:5"]
    else:
        path, sources = tmp_path / "s.json", ["s.json[2]", "s.json[3]", "s.json[4]"]
        path.write_text(json.dumps(rows))
    assert "\\ud800" in path.read_text()  # the file holds the escape, as a JSON writer leaves it

    seeds = read_seeds(str(path), max_bad_seeds=3)
    assert len(seeds.references) == 2 and seeds.bad_rows == 3
    assert [(r.source, r.reason) for r in seeds.skipped] == list(zip(sources, [m for _, m in UNENCODABLE_ROWS]))
    pq.write_table(to_table(seeds.skipped, Reject), tmp_path / "rejects.parquet")  # what the run commits
    with pytest.raises(UserError) as refused:
        read_seeds(str(path), max_bad_seeds=2)
    assert f"  {sources[0]}: field 'instruction' is not valid Unicode text" in str(refused.value)
    str(refused.value).encode("utf-8")  # the CLI can print it


def test_parquet_text_that_is_not_utf8_is_a_counted_bad_row(tmp_path):
    # Arrow trusts a file's string columns; a writer that skipped validation can leave bytes
    # that are not UTF-8 in them (here: latin-1, and a surrogate encoded as UTF-8 bytes).
    instructions = pa.array([b"Explain tides.", b"caf\xe9?", b"\xed\xa0\x80 here", b"Define rain."]).view(pa.string())
    responses = pa.array(["Moon.", "Coffee.", "Nothing.", "Water falling."])
    pq.write_table(pa.table({"instruction": instructions, "response": responses}), tmp_path / "s.parquet")
    seeds = read_seeds(str(tmp_path / "s.parquet"), max_bad_seeds=2)
    assert [r.instruction for r in seeds.references] == ["Explain tides.", "Define rain."]
    assert [(r.source, r.reason) for r in seeds.skipped] == [
        ("s.parquet:row 1", "field 'instruction' is not UTF-8 text (byte 3 of its value)"),
        ("s.parquet:row 2", "field 'instruction' is not UTF-8 text (byte 0 of its value)"),
    ]
