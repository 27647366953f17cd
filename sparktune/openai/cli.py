"""``sparktune openai ...``: export, validate, submit, follow, deploy and score a hosted fine-tune.

    sparktune openai export   --table ./data/imdb_raw --output ./data/openai --limit 1000 --validation-limit 200
    sparktune openai validate --data ./data/openai
    sparktune openai submit   --data ./data/openai --suffix imdb --epochs 2 --wait
    sparktune openai deploy   --data ./data/openai --name imdb-ft
    sparktune openai score    --table ./data/imdb_raw --deployment imdb-ft --data ./data/openai \\
                              --predictions ./data/openai_predictions --compare <open model's run id>

Credentials come from the environment only (AZURE_OPENAI_ENDPOINT, AZURE_OPENAI_API_KEY or
AZURE_OPENAI_AD_TOKEN, OPENAI_API_VERSION; or OPENAI_API_KEY), or a Databricks secret scope
(--secret-scope); see docs/azure_openai.md.
"""

from __future__ import annotations

import argparse
import os
import sys

from sparktune.errors import SparktuneError

__all__ = ["add_cli"]


def _template_args(p) -> None:
    from sparktune.openai.export import DEFAULT_SYSTEM_PROMPT, DEFAULT_USER_TEMPLATE

    p.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT, help="system message ('' for none)")
    p.add_argument("--user-template", default=DEFAULT_USER_TEMPLATE, help="user message; {text} is replaced by the "
                                                                          "review")
    p.add_argument("--label-names", default="negative,positive", help="answers for labels 0,1,... (comma-separated)")


def _template(args):
    from sparktune.openai.export import PromptTemplate

    return PromptTemplate(args.system_prompt, args.user_template.replace("\\n", "\n"),
                          tuple(n.strip() for n in args.label_names.split(",")))


def _validation_args(p) -> None:
    from sparktune.openai.client import DEFAULT_BASE_MODEL
    from sparktune.openai.validate import DEFAULT_PRICE_PER_MILLION

    p.add_argument("--base-model", default=DEFAULT_BASE_MODEL, help="base model to fine-tune (default "
                                                                    f"{DEFAULT_BASE_MODEL})")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the service chooses from the "
                                                            "example count)")
    p.add_argument("--price-per-million", type=float, default=DEFAULT_PRICE_PER_MILLION,
                   help=f"USD per 1M training tokens for the cost estimate (default {DEFAULT_PRICE_PER_MILLION:g}; "
                        "check your price list)")


def _service_args(p) -> None:
    p.add_argument("--secret-scope", help="on Databricks: read the AZURE_OPENAI_* values from this secret scope")
    p.add_argument("--poll-interval", type=float, default=10.0, help="seconds between status checks (default 10)")
    p.add_argument("--timeout", type=float, default=0.0, help="stop waiting after this many seconds (default 0: no "
                                                              "limit)")


def _files(args) -> tuple[str, str | None]:
    from sparktune.openai.export import TRAIN_FILE, VALIDATION_FILE

    if getattr(args, "train", None):
        return args.train, args.validation
    if not args.data:
        raise SparktuneError("give --data DIR (an export folder) or --train FILE [--validation FILE]")
    return os.path.join(args.data, TRAIN_FILE), os.path.join(args.data, VALIDATION_FILE)


def _validate(args, train: str, validation: str | None):
    from sparktune.openai.validate import validate_files

    return validate_files(train, validation, base_model=args.base_model, epochs=args.epochs,
                          price_per_million=args.price_per_million)


def _run_export(args, ctx):
    from sparktune.openai.export import ExportSpec, export_chat_jsonl

    spec = ExportSpec(
        table=args.table, output=args.output, train_split=args.train_split, validation_split=args.validation_split,
        validation_fraction=args.validation_fraction, limit=args.limit, validation_limit=args.validation_limit,
        seed=args.seed, template=_template(args),
    )
    spec.check()
    result = export_chat_jsonl(ctx.spark(), spec, force=args.force)
    if not args.no_validate:
        result.validation = _validate(args, result.train_path, result.validation_path)
    return result


def _run_validate(args, ctx):
    train, validation = _files(args)
    return _validate(args, train, validation)


def _credentials(args):
    from sparktune.openai.client import credentials_from_env

    return credentials_from_env(getattr(args, "secret_scope", None))


def _run_submit(args, ctx):
    from sparktune.openai.client import JobSpec, follow_job, submit_job

    creds = _credentials(args)  # before any work: a missing key fails here
    spec = JobSpec(args.base_model, args.epochs, args.batch_size, args.learning_rate_multiplier, args.suffix, args.seed)
    spec.check()
    train, validation = _files(args)
    report = _validate(args, train, validation)
    tracker = ctx.tracker()
    result = submit_job(creds, args.data, spec, tracker, report, poll_interval=min(args.poll_interval, 5.0))
    print(f"job_id: {result.job_id}")
    print(f"run_id: {result.run_id}")
    sys.stdout.flush()
    if args.wait:
        result.followed = follow_job(creds, result.job_id, tracker, result.run_id, args.poll_interval, args.timeout,
                                     data_dir=args.data)
        result.status = result.followed.status
    return result


def _job_record(args) -> dict:
    from sparktune.openai.client import read_job_file

    return read_job_file(args.data) if getattr(args, "data", None) else {}


def _run_follow(args, ctx):
    from sparktune.openai.client import follow_job

    creds = _credentials(args)
    record = _job_record(args)
    job_id = args.job or record.get("job_id")
    if not job_id:
        raise SparktuneError("give --job JOB_ID or --data DIR (an export folder that `submit` wrote job.json into)")
    return follow_job(creds, job_id, ctx.tracker(), args.run_id or record.get("run_id"), args.poll_interval,
                      args.timeout, data_dir=args.data)


def _run_deploy(args, ctx):
    from sparktune.openai.client import Provider
    from sparktune.openai.deploy import DeploymentSpec, DeployResult, deploy_model, management_from_env

    creds = _credentials(args)
    model = args.model or _job_record(args).get("fine_tuned_model")
    if not model:
        raise SparktuneError("give --model (the fine-tuned model name) or --data DIR after `sparktune openai follow` "
                             "recorded it")
    if creds.provider == Provider.OPENAI:
        return DeployResult(model, model, creds.provider.value, "served by name")
    spec = DeploymentSpec(args.name, model, args.sku, args.capacity)
    return deploy_model(management_from_env(), spec, poll_interval=args.poll_interval, timeout=args.timeout or 3600.0)


def _run_score(args, ctx):
    from sparktune.openai.export import PromptTemplate, read_manifest
    from sparktune.openai.score import ScoreSpec, run_row, score_model

    creds = _credentials(args)
    template = _template(args)
    record = {}
    if args.data:
        manifest = read_manifest(args.data)
        if manifest is None:
            raise SparktuneError(f"--data {args.data}: no manifest.json there; give the folder `sparktune openai "
                                 "export` wrote")
        t = manifest["settings"]["template"]
        template = PromptTemplate(t["system"], t["user"], tuple(t["label_names"]))  # score with the prompt it learnt
        record = _job_record(args) if os.path.isfile(os.path.join(args.data, "job.json")) else {}
    spec = ScoreSpec(
        table=args.table,
        model=args.deployment,
        split=args.split,
        limit=args.limit,
        predictions=args.predictions,
        concurrency=args.concurrency,
        partitions=args.partitions,
        max_retries=args.max_retries,
        max_tokens=args.max_tokens,
        template=template,
    )
    spec.check()
    tracker = None if args.no_mlflow else ctx.tracker()
    result = score_model(ctx.spark(), creds, spec, tracker, run_id=args.run_id or record.get("run_id"),
                         job_id=record.get("job_id"))
    if tracker is not None and result.run_id:
        split = spec.split or "eval"
        result.comparison = [run_row(tracker, result.run_id, split, f"{result.model} (hosted)")]
        result.comparison += [run_row(tracker, run_id, split) for run_id in args.compare or []]
    return result


def add_cli(subparsers) -> None:
    from sparktune.cli import stage_parser

    parser = subparsers.add_parser(
        "openai", help="fine-tune a hosted model (Azure OpenAI / OpenAI) from the same tables and score it",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="openai_command", metavar="STEP")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    p = stage_parser(sub, "export", help="raw Delta table -> chat JSONL (train + validation), then validate")
    p.add_argument("--table", required=True, help="raw TABLE (row_id, split, text, label)")
    p.add_argument("--output", required=True, help="folder for train.jsonl, validation.jsonl and manifest.json")
    p.add_argument("--train-split", default="train", help="split whose rows become training examples (default train)")
    p.add_argument("--validation-split", default="", help="split for validation (default: carve --validation-fraction "
                                                          "of the training split)")
    p.add_argument("--validation-fraction", type=float, default=0.1, help="share of the training split held out "
                                                                          "(default 0.1)")
    p.add_argument("--limit", type=int, default=0, help="at most this many training examples (default 0: all)")
    p.add_argument("--validation-limit", type=int, default=0, help="at most this many validation examples (default 0: "
                                                                   "all)")
    p.add_argument("--seed", type=int, default=42, help="seed of the shuffle and the held-out choice (default 42)")
    p.add_argument("--force", action="store_true", help="rewrite even when the files are up to date")
    p.add_argument("--no-validate", action="store_true", help="skip the validation summary")
    _template_args(p)
    _validation_args(p)
    p.set_defaults(func=_run_export)

    p = stage_parser(sub, "validate", help="check chat JSONL and count tokens offline: examples, tokens, cost")
    p.add_argument("--data", help="an export folder (train.jsonl + validation.jsonl)")
    p.add_argument("--train", help="a training JSONL file (instead of --data)")
    p.add_argument("--validation", help="a validation JSONL file (with --train)")
    _validation_args(p)
    p.set_defaults(func=_run_validate)

    p = stage_parser(sub, "submit",
                     help="validate, upload the files and create the fine-tuning job (--wait: follow it)")
    p.add_argument("--data", required=True, help="the export folder")
    _validation_args(p)
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default: the service chooses)")
    p.add_argument("--learning-rate-multiplier", type=float, default=None, help="(default: the service chooses)")
    p.add_argument("--suffix", default="", help="added to the fine-tuned model's name (at most 40 characters)")
    p.add_argument("--seed", type=int, default=None, help="the job's seed, for reproducible runs")
    p.add_argument("--wait", action="store_true", help="follow the job until it ends")
    _service_args(p)
    p.set_defaults(func=_run_submit)

    p = stage_parser(sub, "follow", help="print a job's status and events until it ends; log its metrics to MLflow")
    p.add_argument("--job", help="fine-tuning job id (default: the one in --data's job.json)")
    p.add_argument("--data", help="the export folder `submit` wrote job.json into")
    p.add_argument("--run-id", help="MLflow run of the job (default: found by the job id)")
    _service_args(p)
    p.set_defaults(func=_run_follow)

    p = stage_parser(sub, "deploy", help="create an Azure OpenAI deployment of the fine-tuned model and wait for it")
    p.add_argument("--name", required=True, help="deployment name (what score's --deployment takes)")
    p.add_argument("--model", help="fine-tuned model name (default: from --data's job.json)")
    p.add_argument("--data", help="the export folder `follow` recorded the model in")
    p.add_argument("--sku", default="standard", help="deployment SKU: standard, globalstandard, developer ... (default "
                                                     "standard)")
    p.add_argument("--capacity", type=int, default=1, help="capacity units (thousands of tokens per minute; default 1)")
    _service_args(p)
    p.set_defaults(func=_run_deploy)

    p = stage_parser(sub, "score",
                     help="score the deployment on a table's test rows: metrics, predictions table, MLflow")
    p.add_argument("--table", required=True, help="raw TABLE with row_id, split, text, label")
    p.add_argument("--deployment", required=True, help="Azure deployment name (on OpenAI: the fine-tuned model name)")
    p.add_argument("--data", help="the export folder: score with its prompt template, log into its job's MLflow run")
    p.add_argument("--split", default="test", help="split to score (default test; '' for all rows)")
    p.add_argument("--limit", type=int, default=0, help="score at most this many rows (default 0: all)")
    p.add_argument("--predictions", metavar="TABLE", help="write the predictions Delta table here")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at most, in total (default 8)")
    p.add_argument("--partitions", type=int, default=2, help="Spark tasks sharing them (default 2)")
    p.add_argument("--max-retries", type=int, default=6, help="retries per request on 429/5xx, with backoff (default "
                                                              "6)")
    p.add_argument("--max-tokens", type=int, default=5, help="longest answer (default 5 tokens)")
    p.add_argument("--run-id", help="MLflow run to log to (default: the job's run from --data, else a new run)")
    p.add_argument("--compare", action="append", metavar="RUN_ID", help="print this run's metrics beside (repeatable)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--secret-scope", help="on Databricks: read missing AZURE_OPENAI_* values from this secret scope")
    _template_args(p)
    p.set_defaults(func=_run_score)
