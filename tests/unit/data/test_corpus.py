"""xsae_cli.data.corpus: sources, chat rendering, splits, token contexts."""

from __future__ import annotations

import json

import pytest
import torch

from xsae_cli.core.errors import XsaeError
from xsae_cli.data.corpus import (
    builtin_texts,
    load_contexts,
    load_texts,
    render_texts,
    split_documents,
    tokenize_contexts,
)

from . import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# --------------------------------------------------------------------------------------- sources


def test_builtin_corpus_is_large_deterministic_prose():
    docs = builtin_texts()
    assert sum(map(len, docs)) > 460_000  # pydoc topics alone are ~460 KB
    assert len(docs) == len(set(docs))  # deduplicated
    assert all(isinstance(d, str) and d.strip() for d in docs)
    from pydoc_data.topics import topics

    assert docs[0] == topics[sorted(topics)[0]].strip()
    assert any("Return" in d for d in docs[len(topics) :])  # stdlib docstrings follow the topics
    assert load_texts("builtin", limit=5) == list(docs[:5])
    assert load_texts("BUILTIN", limit=5) == list(docs[:5])


def test_txt_splits_on_blank_lines(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first para\nstill first\n\n\n  \nsecond\r\n\r\nthird\n", encoding="utf-8")
    assert load_texts(str(p)) == ["first para\nstill first", "second", "third"]
    assert load_texts(str(p), limit=2) == ["first para\nstill first", "second"]


def test_folder_of_files_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("b1\n\nb2", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"text": "a1"}\n', encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert load_texts(str(tmp_path)) == ["a1", "b1", "b2"]
    assert load_texts(str(tmp_path), limit=2) == ["a1", "b1"]


def test_jsonl_fields_chats_and_errors(tmp_path):
    p = tmp_path / "c.jsonl"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    p.write_text(
        json.dumps({"text": "plain", "body": "other"}) + "\n\n" + json.dumps({"messages": chat, "id": 3}) + "\n",
        encoding="utf-8",
    )
    assert load_texts(str(p)) == ["plain", chat]
    q = tmp_path / "d.jsonl"
    q.write_text(json.dumps({"body": "x"}) + "\n" + json.dumps({"text": "y"}) + "\n", encoding="utf-8")
    assert load_texts(str(q), text_field="body", limit=1) == ["x"]
    with pytest.raises(XsaeError) as err:
        load_texts(str(q))
    assert f"{q} line 1" in err.value.message and "'text'" in err.value.message and "body" in err.value.message
    assert "--text-field" in err.value.hint
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(XsaeError, match="line 2 is not valid JSON"):
        load_texts(str(bad))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(XsaeError, match="line 1: 'text' holds int"):
        load_texts(str(wrong))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"content": ["one", "", "two", "three"], "n": [1, 2, 3, 4]}), p)
    assert load_texts(str(p), text_field="content") == ["one", "two", "three"]
    assert load_texts(str(p), text_field="content", limit=2) == ["one", "two"]
    with pytest.raises(XsaeError) as err:
        load_texts(str(p))
    assert str(p) in err.value.message and "content, n" in err.value.message
    chats = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"messages": [[{"role": "user", "content": "q"}]]}), chats)
    assert load_texts(str(chats)) == [[{"role": "user", "content": "q"}]]


def test_datasets_folder(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["x", "y", "z"]}).save_to_disk(str(tmp_path / "ds"))
    assert load_texts(str(tmp_path / "ds"), limit=2) == ["x", "y"]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t"]}), "test": datasets.Dataset.from_dict({"text": ["e"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_texts(str(tmp_path / "dd")) == ["t"]


def test_source_errors_name_the_file(tmp_path):
    with pytest.raises(XsaeError, match="corpus not found: .*nope.txt"):
        load_texts(str(tmp_path / "nope.txt"))
    csv = tmp_path / "x.csv"
    csv.write_text("a,b", encoding="utf-8")
    with pytest.raises(XsaeError, match=r"unsupported corpus file .*x.csv \(extension '.csv'\)"):
        load_texts(str(csv))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n", encoding="utf-8")
    with pytest.raises(XsaeError, match="empty.txt holds no text"):
        load_texts(str(empty))
    (tmp_path / "sub").mkdir()
    with pytest.raises(XsaeError, match="holds no .txt"):
        load_texts(str(tmp_path / "sub"))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(XsaeError, match="latin.txt is not UTF-8"):
        load_texts(str(latin))


# --------------------------------------------------------------------------------------- chat


def test_render_chats_with_the_template(tok):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert render_texts(["plain", chat], tok) == ["plain", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"]
    with pytest.raises(XsaeError, match="row 0 is a chat but the tokenizer .* has no chat template"):
        render_texts([chat], tiny_tokenizer(chat=False))


# --------------------------------------------------------------------------------------- split


def test_split_documents_is_disjoint_and_deterministic():
    docs = [f"doc {i}" for i in range(50)]
    train, held = split_documents(docs, 0.2, seed=1)
    assert len(held) == 10 and len(train) == 40
    assert sorted(train + held) == sorted(docs) and not set(train) & set(held)
    assert train == sorted(train, key=docs.index)  # corpus order kept
    assert split_documents(docs, 0.2, seed=1) == (train, held)
    assert split_documents(docs, 0.2, seed=2)[1] != held
    assert split_documents(docs, 0.0) == (docs, [])
    assert len(split_documents(docs[:3], 0.01)[1]) == 1  # a positive fraction holds out at least one
    with pytest.raises(XsaeError, match="must be in"):
        split_documents(docs, 1.0)
    with pytest.raises(XsaeError, match="keep any for training"):
        split_documents(["only"], 0.5)


# --------------------------------------------------------------------------------------- tokens


def test_packed_contexts(tok):
    docs = ["The quick brown fox.", "Jumps over the lazy dog, again and again.", "End"]
    ids = [tok(d, add_special_tokens=False).input_ids for d in docs]
    c = tokenize_contexts(docs, tok, 8)
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    stream = [t for d in ids for t in d + [eos]]
    assert c.packed and c.n_documents == 3 and c.context_size == 8
    assert len(c) == -(-len(stream) // 7)
    assert c.input_ids.dtype == torch.int64 and c.attention_mask.dtype == torch.int64 and c.special_mask.dtype == torch.bool
    assert (c.input_ids[:, 0] == bos).all()
    real = c.input_ids[:, 1:][c.attention_mask[:, 1:].bool()].tolist()
    assert real == stream  # documents concatenated with EOS separators, nothing lost
    assert c.attention_mask[-1].tolist()[-1] == 0 and c.input_ids[-1, -1] == pad  # last context padded
    expected_special = (c.input_ids == bos) | (c.input_ids == eos) | (c.attention_mask == 0)
    assert torch.equal(c.special_mask, expected_special)
    assert c.n_content_tokens == sum(map(len, ids))
    assert c.n_tokens == len(stream) + len(c)
    no_bos = tokenize_contexts(docs, tok, 8, prepend_bos=False)
    assert no_bos.input_ids.view(-1)[: len(stream)].tolist() == stream
    assert torch.equal(tokenize_contexts(docs, tok, 8).input_ids, c.input_ids)  # deterministic


def test_unpacked_contexts_truncate_and_pad(tok):
    docs = ["short", "a much longer document that will not fit into a tiny context window at all"]
    c = tokenize_contexts(docs, tok, 10, pack=False)
    assert c.input_ids.shape == (2, 10) and not c.packed
    assert c.n_truncated == 1
    n0 = len(tok("short", add_special_tokens=False).input_ids)
    assert c.input_ids[0, : n0 + 2].tolist() == [tok.bos_token_id, *tok("short", add_special_tokens=False).input_ids, tok.eos_token_id]
    assert c.attention_mask[0].tolist() == [1] * (n0 + 2) + [0] * (10 - n0 - 2)
    assert c.special_mask[0, n0 + 2 :].all() and not c.special_mask[0, 1 : n0 + 1].any()
    assert c.attention_mask[1].all()
    assert c.select([1]).input_ids.shape == (1, 10)


def test_chat_markers_are_special_anywhere(tok):
    rows = ["plain words here", [{"role": "user", "content": "question"}, {"role": "assistant", "content": "answer"}]]
    c = tokenize_contexts(render_texts(rows, tok), tok, 16)
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    marks = (c.input_ids == start) | (c.input_ids == end)
    assert int(marks.sum()) == 4
    assert c.special_mask[marks].all()


def test_tokenize_errors(tok):
    with pytest.raises(XsaeError, match="document 1 is a list, not text") as err:
        tokenize_contexts(["x", [{"role": "user", "content": "y"}]], tok, 8)  # type: ignore[list-item]
    assert "render_texts" in err.value.hint
    with pytest.raises(XsaeError, match="at least 2"):
        tokenize_contexts(["x"], tok, 1)


def test_load_contexts_end_to_end(tok, tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"text": f"document number {i} says something"}) + "\n" for i in range(20)), encoding="utf-8")
    train, held = load_contexts(str(p), tok, 16, held_out_fraction=0.25, seed=0)
    assert held is not None and train.n_documents == 15 and held.n_documents == 5
    assert train.meta["corpus"] == str(p)
