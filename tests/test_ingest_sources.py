"""Issue 19: ingest as a package: one ``SourceKind`` decided in one place, one reader per kind with
its own count of the source's records, no import cycle, and the session's configuration untouched."""

import ast
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparktune.cli import main
from sparktune.errors import SparktuneError
from sparktune.ingest import SourceKind, csv_reader, detect_source, ingest, json_reader, parquet_reader
from sparktune.ingest.readers import READERS


def _parquet(path, rows=2):
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(rows)], "label": [i % 2 for i in range(rows)]}), path)


def test_each_kind_is_detected(tmp_path):
    acl = tmp_path / "aclImdb"
    (acl / "train" / "pos").mkdir(parents=True)
    splits = tmp_path / "splits"
    splits.mkdir()
    _parquet(splits / "train.parquet")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "part-0.unknown").write_text("x")
    delta = tmp_path / "delta"
    (delta / "_delta_log").mkdir(parents=True)
    one = tmp_path / "reviews.jsonl"
    one.write_text('{"text": "a", "label": 1}\n')

    found = {
        SourceKind.ACLIMDB: detect_source(str(acl)),
        SourceKind.SPLIT_FILES: detect_source(str(splits)),
        SourceKind.FOLDER: detect_source(str(folder)),
        SourceKind.DELTA: detect_source(str(delta)),
        SourceKind.FILE: detect_source(str(one)),
        SourceKind.HF: detect_source("hf:stanfordnlp/imdb"),
        SourceKind.TABLE: detect_source("main.reviews"),
    }
    for kind, source in found.items():
        assert source.kind is kind
    assert found[SourceKind.HF].location == "stanfordnlp/imdb"
    assert found[SourceKind.FILE].location == str(one)
    # Every kind detected has its reader.
    assert set(READERS) == set(SourceKind)
    # --format forces a kind where detection would pick another.
    assert detect_source(str(splits), "delta").kind is SourceKind.DELTA
    assert detect_source(str(folder), "aclimdb").kind is SourceKind.ACLIMDB
    assert detect_source("reviews", "hf") == (SourceKind.HF, "reviews")
    assert detect_source(str(one), "table").kind is SourceKind.TABLE
    # The kind compares equal to its name (as written to sparktune.source_kind).
    assert detect_source(str(acl))[0] == "aclimdb" and str(SourceKind.SPLIT_FILES) == "split-files"


def test_an_unknown_source_or_format_names_what_was_expected(tmp_path):
    with pytest.raises(SparktuneError) as err:
        detect_source(str(tmp_path / "missing" / "reviews.csv"))
    message = str(err.value)
    assert "no such file or folder" in message and "reviews.csv" in message
    for expected in ("Parquet/CSV/JSONL file or folder", "aclImdb", "Delta table path", "hf:", "table name"):
        assert expected in message
    with pytest.raises(SparktuneError, match=r"--format 'xml' is not known: use auto, parquet, csv, json, aclimdb, "
                                             r"delta, hf or table"):
        detect_source(str(tmp_path), "xml")


def test_an_unknown_source_on_the_command_line_exits_2_without_a_traceback(spark, tmp_path, capsys):
    code = main(["ingest", "--source", str(tmp_path / "nope.csv"), "--output", str(tmp_path / "raw")])
    err = capsys.readouterr().err
    assert code == 2
    assert "nope.csv" in err and "no such file or folder" in err and "Traceback" not in err


def test_each_format_counts_its_records_without_spark(tmp_path):
    # CSV: a quoted field over two lines is one record, a stray quote costs only its own line.
    path = tmp_path / "a.csv"
    path.write_text('text,label\n"two\nlines",1\nbad "quote,0\nok,1\n', encoding="utf-8")
    assert csv_reader.count(str(path)) == 3
    # JSONL: lines end at LF, CR or CRLF; a blank line is a record (quarantined, but counted).
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "a"}\r\n{"text": "b"}\r{"text": "c"}\n\n')
    assert json_reader.count(str(path)) == 4
    path = tmp_path / "a.parquet"
    _parquet(path, rows=5)
    assert parquet_reader.count(str(path)) == 5


def test_the_csv_count_matches_what_was_read_and_written(spark, tmp_path):
    """The CSV reader's own count equals raw + quarantined rows on a file with broken quoting."""
    path = tmp_path / "train.csv"
    path.write_text('text,label\n"two\nlines",1\n"unclosed,0\nok,1\n,1\nthree,0,extra\n', encoding="utf-8")
    result = ingest(spark, str(path), str(tmp_path / "raw"))
    assert result.count_method == csv_reader.METHOD
    assert result.input_rows == csv_reader.count(str(path)) == 5
    assert result.raw_rows + result.quarantined_rows == 5
    # Kept: "two\nlines" and "ok" (after the unbalanced quote); quarantined: the unbalanced quote,
    # the missing text and the extra field.
    assert result.raw_rows == 2
    assert result.reasons == {"missing text": 1, "unparseable record": 2}


def test_ingest_leaves_the_session_configuration_as_it_found_it(spark, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n', encoding="utf-8")

    def conf():
        return {r["key"]: r["value"] for r in spark.sql("SET").collect()}

    before = conf()
    ingest(spark, str(path), str(tmp_path / "raw"))
    assert conf() == before


def test_the_ingest_package_has_no_import_cycle():
    package = pathlib.Path(__file__).resolve().parents[1] / "sparktune" / "ingest"
    modules = {f.stem for f in package.glob("*.py")}
    graph = {}
    for name in modules:
        deps = set()
        for node in ast.walk(ast.parse((package / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "sparktune.ingest":
                deps |= {a.name if a.name in modules else "__init__" for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sparktune.ingest."):
                deps.add(node.module.split(".")[2])
        graph[name] = deps - {name}
    assert graph["sources"] <= {"rules"} and not graph["rules"], "detection and rules import no reader"

    done: set = set()

    def visit(name, path):
        assert name not in path, "import cycle: " + " -> ".join([*path, name])
        if name not in done:
            for dep in graph[name]:
                visit(dep, [*path, name])
            done.add(name)

    for name in sorted(graph):
        visit(name, [])
