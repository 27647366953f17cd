"""Issue 8, secrets: redaction inside values, and an end-to-end plant-and-search over what the
data stages write (tables, their properties, Delta logs, stdout/stderr, SPARKTUNE_HOME)."""

import json
import os
import subprocess
import sys

import pytest

from sparktune.redact import REDACTED, is_secret_key, redact, redact_column, redact_mapping

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SECRETS = {
    "userinfo": ("https://alice:PlantedPassw0rd@mlflow.example.com/api", "PlantedPassw0rd"),
    "userinfo_s3": ("s3a://AKIAPLANTED0000KEY1:wJalrXUtnFEMI/K7MDENG/PlantedAws@bucket/x", "wJalrXUtnFEMI/K7MDENG"),
    "token_only_userinfo": ("https://ghp_PlantedGithubToken0123456789@github.com/org/repo", "PlantedGithubToken"),
    "sas": (
        "https://acct.blob.core.windows.net/c/f.jsonl?sv=2022-11-02&ss=b&sp=r&sig=Planted%2BSasSig%3D",
        "Planted%2BSasSig",
    ),
    "amz": (
        "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIAPLANTED0000KEY2%2F20240101&X-Amz-Signature=planted0abc9",
        "planted0abc9",
    ),
    "token_param": ("https://host/data?token=PlantedQueryToken&page=2", "PlantedQueryToken"),
    "key_param": ("https://host/data?key=PlantedQueryKey", "PlantedQueryKey"),
    "account_key": (
        "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=PlantedAccountKey+/==;EndpointSuffix=x",
        "PlantedAccountKey",
    ),
    "openai": ("key is sk-proj-PlantedOpenAiKey0123456789", "PlantedOpenAiKey"),
    "databricks": ("dapi0123456789abcdef0123456789abcdef-2", "dapi0123456789abcdef"),
    "aws_id": ("AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
    "hf": ("hf_PlantedHuggingFaceToken01234", "PlantedHuggingFaceToken"),
    "assignment": ("HF_TOKEN=PlantedAssigned123 other", "PlantedAssigned123"),
    "json_pair": ('{"api_key": "PlantedJsonKey", "tokenizer": "gpt2"}', "PlantedJsonKey"),
    "bearer": ("Authorization: Bearer PlantedBearer0123456789", "PlantedBearer0123456789"),
}


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_redact_removes_the_credential_and_keeps_the_rest(name):
    text, secret = SECRETS[name]
    out = redact(text)
    assert secret not in out and REDACTED in out, out


def test_redact_keeps_what_is_not_a_secret():
    for text in ("wasbs://container@acct.blob.core.windows.net/data", "sparktune.tokenizer: gpt2",
                 "n_tokens=5 max_length=128", "/work/shared/models/gpt2-tokenizer", "https://host/a?page=2&sv=2022"):
        assert redact(text) == text
    assert redact(None) is None and redact(5) == 5


def test_redact_mapping_hides_secret_keys_but_not_tokenizer():
    out = redact_mapping({
        "hf_token": "plain", "DB_PASSWORD": "pw", "api_key": "k", "credentials": {"a": 1}, "tokenizer": "gpt2",
        "n_tokens": 5, "max_tokens": 9, "nested": {"client_secret": "s", "uri": SECRETS["userinfo"][0]},
        "list": [SECRETS["sas"][0]],
    })
    assert out["hf_token"] == out["DB_PASSWORD"] == out["api_key"] == out["credentials"] == REDACTED
    assert (out["tokenizer"], out["n_tokens"], out["max_tokens"]) == ("gpt2", 5, 9)
    assert out["nested"]["client_secret"] == REDACTED and "PlantedPassw0rd" not in out["nested"]["uri"]
    assert "Planted%2BSasSig" not in out["list"][0]
    assert is_secret_key("AZURE_STORAGE_CONNECTION_STRING") and not is_secret_key("tokenizer_fingerprint")


def test_spark_rules_match_python(spark):
    from pyspark.sql import functions as F

    texts = [t for t, _ in SECRETS.values()] + ["wasbs://c@a.net/x", "/plain/path/file.jsonl"]
    df = spark.createDataFrame([(t,) for t in texts], "t string")
    got = [r[0] for r in df.select(redact_column(F.col("t"))).collect()]
    assert got == [redact(t) for t in texts]


_STAGES = """
import sys
from sparktune.cli import main
rc = main(["ingest", "--source", sys.argv[1], "--output", sys.argv[2], "--master", "local[1]"])
rc = rc or main(["tokenize", "--input", sys.argv[2], "--output", sys.argv[3], "--tokenizer", sys.argv[4],
                 "--max-length", "16"])
rc2 = main(["ingest", "--source", sys.argv[5], "--output", sys.argv[2] + "_x"])
print("missing-source rc", rc2)
sys.exit(rc)
"""


def test_planted_secrets_reach_no_output(tmp_path, gpt2_tokenizer_path):
    planted = {
        "HF_TOKEN": "hf_PlantedEnvHfToken0123456789",
        "DATABRICKS_TOKEN": "dapiPlantedEnvDatabricks0123456789",
        "DATABRICKS_HOST": "https://PlantedHostUser:PlantedHostPw@adb.example.net",
        "AWS_ACCESS_KEY_ID": "AKIAPLANTEDENV00001",
        "AWS_SECRET_ACCESS_KEY": "PlantedEnvAwsSecretKey/abc+def",
        "AZURE_STORAGE_CONNECTION_STRING": "AccountName=a;AccountKey=PlantedEnvAzureKey==;",
        "OPENAI_API_KEY": "sk-PlantedEnvOpenAiKey0123456789",
        "MLFLOW_TRACKING_URI": "https://mlf:PlantedEnvMlflowPw@mlflow.example.com",
        "MLFLOW_TRACKING_TOKEN": "PlantedEnvMlflowToken",
    }
    # Secrets in the source's path, as a pasted signed folder name would put them.
    source_dir = tmp_path / "hf_PlantedPathToken0123456789" / "sk-PlantedPathOpenAi0123456789"
    source_dir.mkdir(parents=True)
    source = source_dir / "reviews.jsonl"
    source.write_text(
        "\n".join(json.dumps({"text": f"review {i}", "label": i % 3}) for i in range(12)) + "\nnot json\n"
    )
    missing = "s3a://AKIAPLANTEDMISSING1:PlantedMissingSecret@bucket/data.jsonl"
    home = tmp_path / "home"
    env = dict(os.environ, **planted, SPARKTUNE_HOME=str(home), PYTHONPATH=ROOT)
    raw, tokens = str(tmp_path / "out" / "raw"), str(tmp_path / "out" / "tokens")
    proc = subprocess.run(
        [sys.executable, "-c", _STAGES, str(source), raw, tokens, gpt2_tokenizer_path, missing],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "missing-source rc 2" in proc.stdout and "no such file or folder" in proc.stderr
    # Every planted value contains "Planted" or "PLANTED" (the test's own tmp folder is lower case).
    needles = ["Planted", "PLANTED"]
    haystacks = {"stdout": proc.stdout, "stderr": proc.stderr}
    for folder in (tmp_path / "out", home):
        for dirpath, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(dirpath, name)
                with open(path, "rb") as handle:
                    haystacks[path] = handle.read().decode("latin-1")
    assert any("_delta_log" in p for p in haystacks) and any(p.endswith(".parquet") for p in haystacks)
    leaks = [(needle, where) for needle in needles for where, text in haystacks.items() if needle in text]
    assert not leaks, leaks
    # Redacted, not dropped: the tables still say where their data came from.
    from deltalake import DeltaTable

    props = DeltaTable(raw).metadata().configuration
    assert props["sparktune.source"].endswith("/***/***/reviews.jsonl")
    assert DeltaTable(raw).to_pandas()["source_file"].str.endswith("/***/***/reviews.jsonl").all()


@pytest.mark.timeout(300)
def test_a_secret_logged_inside_a_training_rank_is_redacted(tmp_path, gpt2_tokenizer_path):
    """Ranks that torchrun starts redact their log records as the driver does (every handler)."""
    import yaml
    from test_train_support import nest, tiny_gpt2_overrides, write_tokenized_table

    table = write_tokenized_table(tmp_path / "tok", gpt2_tokenizer_path, task="causal-lm", n_train=8, n_test=2,
                                  max_length=16)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(nest(tiny_gpt2_overrides(tmp_path, table, "", **{
        "mlflow.enabled": False, "data.eval_split": "", "train.max_steps": 1, "train.batch_size": 2,
        "checkpoint.strategy": "no"}))))
    logs = tmp_path / "rank_logs"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", SPARKTUNE_TRAIN_CALLBACKS="train_secret_log:log_secrets",
               SPARKTUNE_TEST_LOG_DIR=str(logs),
               SPARKTUNE_TEST_SECRET=("https://alice:PlantedRankPassw0rd@mlflow.example.com/api "
                                      "hf_PlantedRankHf0123456789"),
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
         "-m", "sparktune.train.train", "--config", str(config)],
        capture_output=True, text=True, env=env, timeout=280, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    for rank in (0, 1):
        shown = f"rank {rank} of 2 reports https://***@mlflow.example.com/api ***"
        assert shown in output, [line for line in output.splitlines() if "reports" in line]
        assert (logs / f"rank-{rank}.log").read_text(encoding="utf-8") == shown + "\n"
    assert "Planted" not in output
