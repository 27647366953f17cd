"""The hosted path: fine-tune an OpenAI model (Azure OpenAI or OpenAI) from the same Delta tables.

raw Delta -> ``export`` (chat JSONL, Spark) -> ``validate`` (offline token counts, cost)
-> ``submit``/``follow`` (files + fine-tuning job, one MLflow run) -> ``deploy`` (Azure
management REST) -> ``score`` (chat completions on the test split, the open model's metrics).

Submodules import their heavy dependencies (pyspark, openai, mlflow) lazily; import them directly,
e.g. ``from sparktune.openai.export import export_chat_jsonl``.
"""

__all__: list[str] = []
