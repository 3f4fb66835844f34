"""ATF reading, the character vocabulary, and simulated damage."""

from __future__ import annotations

import numpy as np
import pytest

from xsae_cli.core.errors import XsaeError
from xsae_cli.restore.data import (
    CodepointVocab,
    Doc,
    Encoded,
    Vocab,
    load_docs,
    mask_spans,
    parse_atf,
    parse_inline,
    read_atf,
    sample_windows,
)


def _marks(doc: Doc) -> str:
    return "".join("^" if d else "." for d in doc.damaged)


def test_atf_damage_marks(letters_atf) -> None:
    docs = read_atf(letters_atf)
    assert len(docs) == 6
    first = docs[0]
    assert first.text.startswith("a-na be-li2-ia\nqi2-bi2-ma\n")
    i = first.text.index("i-qa-ab-bu")  # editor's restoration inside [...]: damaged, kept out of training
    assert all(first.damaged[i : i + 10]) and not first.damaged[i + 10]
    j = first.text.index("usz-pu")  # 'usz#': the flagged sign only
    assert all(first.damaged[j : j + 3]) and not first.damaged[j - 1] and not first.damaged[j + 3]
    k = first.text.index("a-na ... x")
    assert _marks(Doc(first.text[k : k + 10], first.damaged[k : k + 10])) == ".....^^^.^"
    assert "$" not in first.text and "@" not in first.text and "#" not in first.text
    assert "isz-ti-ia" in docs[1].text  # an indented continuation line joins its line
    assert "to my father" not in docs[1].text  # translations are not transliteration
    half = docs[2].text.index("a-wa-tam")
    assert all(docs[2].damaged[half : half + 4]) and not docs[2].damaged[half + 5]


def test_inline_x_only_counts_as_a_sign() -> None:
    doc = parse_inline("x-x ša-ax x")
    assert doc.text == "x-x ša-ax x" and _marks(doc) == "^.^.......^"


@pytest.mark.parametrize(
    "text, line, needle",
    [
        ("&X1\n1. a-na\n2. ]qi2-bi2-ma\n", 3, "']' without a matching '['"),
        ("&X1\n1. a-na [be-li2\n2. qi2-bi2-ma\n&X2\n1. a\n", 2, "never closed"),
        ("&X1\n1. a-na [x [x]]\n", 2, "'[' inside a '['"),
        ("&X1\n1. a-na\nqi2-bi2-ma\n", 3, "not a valid ATF line"),
    ],
)
def test_atf_syntax_errors_name_the_line(text: str, line: int, needle: str) -> None:
    with pytest.raises(XsaeError) as err:
        parse_atf(text, "t.atf")
    msg = err.value.one_line()
    assert f"t.atf line {line}" in msg and needle in msg and "\n" not in msg


def test_bad_atf_file_names_line_5(bad_atf) -> None:
    with pytest.raises(XsaeError, match=r"bad.atf line 5: not a valid ATF line"):
        load_docs([str(bad_atf)])


def test_vocab_round_trip_and_unknown_characters(tmp_path) -> None:
    vocab = Vocab.build([Doc("ab𒀀c"), Doc("ba", [True, False])])
    assert vocab.itos[:3] == ["<pad>", "<unk>", "<mask>"] and "𒀀" in vocab.stoi  # cuneiform signs are characters too
    vocab.save(tmp_path / "vocab.json")
    again = Vocab.load(tmp_path / "vocab.json")
    assert again.itos == vocab.itos
    unknown: dict[str, int] = {}
    ids = again.encode("aΩbΩ", unknown=unknown)
    assert ids[1] == ids[3] == again.unk_id and unknown == {"Ω": 2}
    assert again.encode("ab", damaged=[False, True]) == [again.index("a"), again.mask_id]


def test_codepoint_vocab_matches_the_original_ids() -> None:
    v = CodepointVocab(11812)
    assert v.encode("a-na") == [ord(c) for c in "a-na"]
    assert v.mask_id == ord("#") and v.pad_id == ord(" ")
    unknown: dict[str, int] = {}
    assert v.encode("𒀀", unknown=unknown) == [v.unk_id] and "𒀀" in unknown


def test_simulated_damage_spans_never_target_real_damage_or_padding() -> None:
    docs = [Doc("a-na be-li2-ia qi2-bi2-ma um-ma " * 4, [i % 7 == 0 for i in range(128)]), Doc("x" * 30)]
    vocab = Vocab.build(docs)
    enc, _ = Encoded.from_docs(docs, vocab)
    rng = np.random.default_rng(0)
    ids, attn, dmg = sample_windows(enc, 64, 48, rng, vocab.pad_id)
    inputs, labels = mask_spans(ids, attn, dmg, rng, vocab.mask_id)
    target = labels != -100
    assert target.any()
    assert not (target & dmg).any() and not (target & (attn == 0)).any()
    assert (inputs[target] == vocab.mask_id).all() and (labels[target] == ids[target]).all()
    assert (inputs[dmg & (attn > 0)] == vocab.mask_id).all()  # real damage reaches the model as masks
    ratio = target.sum() / ((attn > 0) & ~dmg).sum()
    assert 0.1 < ratio < 0.35
    # Spans: runs of consecutive targets are 1..10 long unless two spans touch.
    runs = [len(r) for row in target for r in "".join("1" if t else "0" for t in row).split("0") if r]
    assert min(runs) >= 1 and np.median(runs) <= 10


def test_builtin_corpus_is_the_default() -> None:
    docs = load_docs(None)
    assert len(docs) > 100 and not any(any(d.damaged) for d in docs[:50])
