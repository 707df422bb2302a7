"""vocab.txt reading and validation, casing from manifests, Hugging Face loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bertforge.config import VocabConfig
from bertforge.errors import UserError
from bertforge.tokenization import (
    SPECIALS,
    LineEncoder,
    basic_words,
    bert_normalizer,
    bert_pre_tokenizer,
    build_tokenizer,
    casing_doubt,
    find_vocab_file,
    google_layout,
    load_vocab,
    read_vocab_file,
    token_casing,
)
from bertforge.vocab import train_vocab
from tests.conftest import MIXED_DOCS
from tests.reference.nasty_text import nasty_lines

TOKENS = google_layout(["the", "cat", "##s", "sat", ".", "σ", "ς", "ο", "##δ", "##ο", "##ς",
                        "##σ", "a", "##a"], num_unused=2)  # fmt: skip


def write_vocab(path: Path, tokens: list[str]) -> Path:
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    return path


def test_google_layout_ids():
    tokens = google_layout(["x"], num_unused=99)
    assert tokens[:2] == ["[PAD]", "[unused0]"]
    assert [tokens.index(t) for t in ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]] == [100, 101, 102, 103]


def test_vocab_txt_validation(tmp_path: Path):
    with pytest.raises(UserError, match=r"v\.txt:4: duplicate entry 'a' \(first on line 3\)"):
        read_vocab_file(write_vocab(tmp_path / "v.txt", ["[PAD]", "[UNK]", "a", "a"]))
    with pytest.raises(UserError, match=r"v\.txt:2: empty line"):
        read_vocab_file(write_vocab(tmp_path / "v.txt", ["[PAD]", "", "a"]))
    with pytest.raises(UserError, match=r"missing special token\(s\) \[CLS\], \[SEP\], \[MASK\]"):
        read_vocab_file(write_vocab(tmp_path / "v.txt", ["[PAD]", "[UNK]", "a"]))
    with pytest.raises(UserError, match="does not exist"):
        read_vocab_file(tmp_path / "missing.txt")
    # a corpus given as the vocabulary: said at its first line, not at its first blank one
    verse = "In the beginning God created the heaven and the earth."
    corpus = write_vocab(tmp_path / "corpus.txt", [verse, "", "And God said"])
    with pytest.raises(UserError) as e:
        read_vocab_file(corpus)
    assert str(e.value) == (
        f"{corpus}:1: 'In the beginning God created the heaven ...' holds whitespace, and a "
        "vocab.txt holds one token per line (text is split at spaces before its words are "
        "looked up); is this a corpus?"
    )
    pieces = write_vocab(tmp_path / "sp.vocab", ["<unk>\t0", "\u2581the\t-3.21"])
    said = r"sp\.vocab:1: '<unk>\\t0' holds whitespace.*a SentencePiece \.vocab \(a piece and"
    with pytest.raises(UserError, match=said):
        read_vocab_file(pieces)


def test_a_missing_vocabulary_is_named_before_its_casing_is_asked_for(tmp_path: Path):
    """--vocab that is not there says so, whether or not the casing is given: not that it
    has no manifest recording its casing, which sends the user after the wrong fix."""
    for casing in (None, True):
        with pytest.raises(UserError, match=r"^--vocab: \S*missing does not exist\.$"):
            load_vocab(tmp_path / "missing", casing)
        with pytest.raises(UserError, match=r"^--vocab: \S*missing\.txt does not exist\.$"):
            load_vocab(tmp_path / "missing.txt", casing)
        with pytest.raises(UserError, match=r"^--vocab: \S*empty holds no vocab\.txt or tokeniz"):
            (tmp_path / "empty").mkdir(exist_ok=True)
            load_vocab(tmp_path / "empty", casing)
    write_vocab(tmp_path / "empty" / "vocab.txt", TOKENS)  # the casing is then what it lacks
    with pytest.raises(UserError, match="has no manifest saying whether it is cased"):
        load_vocab(tmp_path / "empty")
    assert load_vocab(tmp_path / "empty", True).tokens == tuple(TOKENS)


def test_a_tokenizer_json_alone_is_read_as_the_vocab_txt_it_was_made_from(tmp_path, kjv_vocab):
    """transformers 5 saves a BERT tokenizer as tokenizer.json without vocab.txt: its WordPiece
    vocabulary and the casing in tokenizer_config.json are the model's vocabulary."""
    transformers = pytest.importorskip("transformers")
    hf = tmp_path / "hf"
    made = transformers.BertTokenizerFast(str(kjv_vocab / "vocab.txt"))
    made.save_pretrained(hf)
    (hf / "vocab.txt").unlink(missing_ok=True)  # transformers 4 writes it beside
    assert find_vocab_file(hf) == hf / "tokenizer.json"
    assert find_vocab_file(kjv_vocab) == kjv_vocab / "vocab.txt"  # vocab.txt first
    assert read_vocab_file(hf / "tokenizer.json") == read_vocab_file(kjv_vocab / "vocab.txt")
    vocab = load_vocab(hf)
    assert vocab.path == hf / "tokenizer.json" and vocab.do_lower_case
    text = "In the Beginning GOD created the heaven and the earth, and Nebuchadnezzar's hosts."
    assert vocab.tokenizer().encode(text).ids == made(text)["input_ids"]
    with pytest.raises(UserError, match="contradicts"):  # casing as recorded beside it
        load_vocab(hf / "tokenizer.json", do_lower_case=False)
    for lower in (True, False):  # without tokenizer_config.json: its normalizer's casing
        cased = tmp_path / f"lower-{lower}"
        transformers.BertTokenizerFast(str(kjv_vocab / "vocab.txt"), do_lower_case=lower,
                                       strip_accents=False).save_pretrained(cased)  # fmt: skip
        (cased / "vocab.txt").unlink(missing_ok=True)
        (cased / "tokenizer_config.json").unlink()
        vocab = load_vocab(cased)
        assert (vocab.do_lower_case, vocab.strip_accents) == (lower, False)
        assert (
            vocab.tokenizer().encode("Élan").ids
            == made.__class__(
                str(kjv_vocab / "vocab.txt"), do_lower_case=lower, strip_accents=False
            )("Élan")["input_ids"]
        )


def test_a_tokenizer_json_that_is_not_a_bert_vocabulary_is_refused_naming_why(tmp_path):
    def model(**kw):
        vocab = {t: i for i, t in enumerate([*SPECIALS, "a", "##b"])}
        return {"type": "WordPiece", "continuing_subword_prefix": "##", "vocab": vocab, **kw}

    def read(obj):
        (tmp_path / "tokenizer.json").write_text(json.dumps(obj), encoding="utf-8")
        return read_vocab_file(tmp_path / "tokenizer.json")

    assert read({"model": model(), "added_tokens": [{"id": 4, "content": "[MASK]"}]}) == [
        *SPECIALS, "a", "##b"]  # fmt: skip
    with pytest.raises(UserError, match=r"tokenizer\.json: a BPE tokenizer, not BERT's WordPiece"):
        read({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}})
    with pytest.raises(UserError, match="continues words with '@@'"):
        read({"model": model(continuing_subword_prefix="@@")})
    with pytest.raises(UserError, match=r"'##b' has id 9, but .* of 7 tokens needs the ids 0 to 6"):
        read({"model": model(vocab={**model()["vocab"], "##b": 9})})
    with pytest.raises(
        UserError, match=r"1 token\(s\) added beyond its WordPiece .*\(ids 7 and on"
    ):
        read({"model": model(), "added_tokens": [{"id": 7, "content": "<new>"}]})
    with pytest.raises(UserError, match=r"tokenizer\.json: id 5: empty token"):
        read({"model": model(vocab={**{t: i for i, t in enumerate(SPECIALS)}, "": 5})})
    with pytest.raises(UserError, match=r"missing special token\(s\) \[MASK\]"):
        read({"model": model(vocab={"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "a": 4})})
    with pytest.raises(UserError, match=r"not a tokenizer\.json"):
        (tmp_path / "tokenizer.json").write_text("{", encoding="utf-8")
        read_vocab_file(tmp_path / "tokenizer.json")


def test_bare_vocab_needs_casing_and_manifest_wins(tmp_path: Path, mixed_corpus: Path):
    bare = write_vocab(tmp_path / "vocab.txt", TOKENS)
    with pytest.raises(
        UserError,
        match=r"pass --cased or --lowercase \(--no-do-lower-case or --do-lower-case; Google",
    ):
        load_vocab(bare)
    assert load_vocab(bare, do_lower_case=False).do_lower_case is False
    d = tmp_path / "v"
    train_vocab(VocabConfig(input=(str(mixed_corpus),), output=str(d), vocab_size=800,
                            do_lower_case=False, progress=False))  # fmt: skip
    assert load_vocab(d).do_lower_case is False
    with pytest.raises(UserError, match=r"contradicts .*manifest\.json.*do_lower_case=false"):
        load_vocab(d, do_lower_case=True)


def test_a_copied_vocabulary_says_its_casing_and_leaves_no_earlier_files(tmp_path: Path):
    """copy_vocab (a data or training directory's own copy): the files beside the vocabulary,
    and a tokenizer_config.json that records the casing even when a flag gave it; files of an
    earlier vocabulary copied there (a stage redone with --overwrite) do not survive to give
    the new one the old casing."""
    from bertforge.tokenization import copy_vocab

    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")  # an earlier, uncased vocabulary's
    (out / "tokenizer_config.json").write_text('{"do_lower_case": true}')
    (tmp_path / "bare").mkdir()
    bare = write_vocab(tmp_path / "bare" / "vocab.txt", TOKENS)
    copy_vocab(load_vocab(bare, do_lower_case=False), out)
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer_config.json", "vocab.txt"]
    assert load_vocab(out).do_lower_case is False and load_vocab(out).tokens == tuple(TOKENS)
    (bare.parent / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    copy_vocab(load_vocab(bare, do_lower_case=True), out)  # one that does not say the casing
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 64 and config["do_lower_case"] is True


def test_a_vocab_txt_edited_by_hand_travels_with_a_tokenizer_json_of_its_own(
    tmp_path: Path, capsys
):
    """Words put into [unused] slots of a `bertforge vocab` output's vocab.txt by hand leave
    its tokenizer.json behind. The tokens of vocab.txt are the ones used, so the copy beside
    what is made with them (`copy_vocab`) gets a tokenizer.json written from them, with a
    note, instead of the stale one, which would give the new words other ids."""
    from bertforge.tokenization import copy_vocab, save_tokenizer_files, tokenizer_json_tokens

    made, out = tmp_path / "vocab", tmp_path / "out"
    save_tokenizer_files(made, TOKENS, do_lower_case=True, strip_accents=None)
    out.mkdir()
    copy_vocab(load_vocab(made), out)  # as made: copied, and no note
    assert (out / "tokenizer.json").read_bytes() == (made / "tokenizer.json").read_bytes()
    assert capsys.readouterr().err == ""
    edited = [*TOKENS[:-1], "zebra"]
    (made / "vocab.txt").write_text("".join(f"{t}\n" for t in edited), encoding="utf-8")
    copy_vocab(load_vocab(made), out)
    assert capsys.readouterr().err == (
        f"bertforge: note: {made / 'tokenizer.json'} holds other tokens than "
        f"{made / 'vocab.txt'} (was vocab.txt edited by hand?); vocab.txt's are the ones "
        f"used, and {out / 'tokenizer.json'} is written from them.\n"
    )
    assert tokenizer_json_tokens(out / "tokenizer.json") == edited
    assert load_vocab(out).tokens == tuple(edited)
    pieces = build_tokenizer(edited, do_lower_case=True).encode("Zebra", add_special_tokens=False)
    assert pieces.tokens == ["zebra"]  # the written one is the edited vocabulary's, lowercased


def test_final_sigma_and_long_words():
    tok = build_tokenizer(TOKENS, do_lower_case=True)
    pieces = tok.encode("ΟΔΟΣ Σ", add_special_tokens=False).tokens
    assert pieces[:4] == ["ο", "##δ", "##ο", "##ς"] and pieces[4] == "σ"
    word199, word201 = "a" * 199, "a" * 201
    assert "[UNK]" not in tok.encode(word199, add_special_tokens=False).tokens
    assert tok.encode(word201, add_special_tokens=False).tokens == ["[UNK]"]


@pytest.mark.parametrize("lower", [True, False])
def test_autotokenizer_loads_with_the_right_casing(tmp_path: Path, mixed_corpus: Path, lower):
    from transformers import AutoTokenizer

    d = tmp_path / "v"
    train_vocab(VocabConfig(input=(str(mixed_corpus),), output=str(d), vocab_size=800,
                            do_lower_case=lower, progress=False))  # fmt: skip
    hf = AutoTokenizer.from_pretrained(str(d))
    ours = load_vocab(d).tokenizer()
    for line in [s for doc in MIXED_DOCS for s in doc] + ["ÇOK İYİ Blåbær"]:
        assert hf(line)["input_ids"] == ours.encode(line).ids, line
    enc = hf("Öğretmen", "güldü")
    assert enc["input_ids"][0] == load_vocab(d).id("[CLS]")
    assert enc["token_type_ids"][-1] == 1


@pytest.mark.parametrize("lower,strip", [(True, None), (False, None), (True, False), (False, True)])
def test_basic_words_equals_the_tokenizer_pipeline(lower, strip):
    """The bulk normalizer used to count words gives the fast tokenizer's words, line for line
    (tests/reference checks it against Google's BasicTokenizer too)."""
    texts = [raw.decode("utf-8", "ignore") for raw in nasty_lines(1500)]
    normalizer, pre = bert_normalizer(lower, strip), bert_pre_tokenizer()
    ours = [line.split() for line in basic_words(texts, lower, strip)]
    theirs = [[w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(t))] for t in texts]
    assert len(ours) == len(texts)
    differ = [texts[i] for i in range(len(texts)) if ours[i] != theirs[i]]
    assert not differ, f"{len(differ)} lines differ, e.g. {differ[:2]}"
    # Python's own Final_Sigma rule, which skips any number of case-ignorable characters:
    sigma = [line.split() for line in basic_words(["ΟΔΟΣ.", "Σ", "ΑΣ''' Α"], True, strip)]
    assert sigma == [["οδος", "."], ["σ"], ["ας", "'", "'", "'", "α"]]
    assert basic_words([], lower, strip) == []
    with pytest.raises(ValueError, match="line break"):
        basic_words(["a\nb"], lower, strip)


@pytest.mark.parametrize("lower", [True, False])
def test_line_encoder_equals_the_fast_tokenizer(tmp_path: Path, mixed_corpus: Path, lower):
    """The data stage's cached encoder gives the fast tokenizer's ids line for line, with a
    cache that is reused across calls and cut to its most used half when full, and counts per
    line that add up."""
    d = tmp_path / "v"
    train_vocab(VocabConfig(input=(str(mixed_corpus),), output=str(d), vocab_size=800,
                            do_lower_case=lower, progress=False))  # fmt: skip
    vocab = load_vocab(d)
    nasty = [raw.decode("utf-8", "ignore") for raw in nasty_lines(1500)]
    mixed = [s for d in MIXED_DOCS for s in d]  # pieces that recur, so the cache is used
    texts = [t for i in range(0, len(nasty), 20) for t in nasty[i : i + 20] + mixed]
    texts += ["", "  two  spaces ", "ΑΣ ΑΣ. ΟΔΟΣ", " ".join(["x" * 250, "long"])]
    theirs = [e.ids for e in vocab.tokenizer().encode_batch(texts, add_special_tokens=False)]
    encoder = LineEncoder(vocab.tokens, lower, None, max_entries=1000)
    ours: list[list[int]] = []
    for i in range(0, len(texts), 200):
        flat, counts = encoder.encode(texts[i : i + 200], np.dtype(np.uint16))
        assert flat.dtype == np.uint16 and counts.sum() == len(flat)
        ours += [a.tolist() for a in np.split(flat, np.cumsum(counts)[:-1])]
        assert len(encoder.pieces.slot) <= 1000 + 200 * 40, "the cache is bounded"
    differ = [texts[i] for i in range(len(texts)) if ours[i] != theirs[i]]
    assert not differ, f"{len(differ)} lines differ, e.g. {differ[:2]}"
    flat, counts = encoder.encode([], np.dtype(np.uint16))
    assert len(flat) == 0 and len(counts) == 0


def test_a_vocabularys_tokens_tell_its_casing():
    """`token_casing`: capital letters in at least 1% of the tokens (10 or more) say cased;
    none, among 100 or more tokens with lowercase letters, say uncased; a script without case
    says nothing. Bracketed specials and ## do not count."""

    def layout(tokens: list[str]) -> list[str]:
        return google_layout(tokens, num_unused=99)

    words = [f"w{i}x" for i in range(990)]
    capital = [f"W{i}" for i in range(10)]
    assert token_casing(layout([*words, *capital]))[0] is False
    made_lower, said = token_casing(layout([*words, *capital[:9]]))
    assert made_lower is None and said == ""  # 9 of 999: below 1%
    assert token_casing(layout([*words[:200], *capital[:9]]))[0] is None  # 9: below 10
    assert token_casing(layout([*words[:200], *capital]))[0] is False
    big, caps = [f"v{i}y" for i in range(3000)], [f"V{i}" for i in range(31)]
    assert token_casing(layout([*big, *caps[:30]]))[0] is None  # 30 of 3,030: below 1%
    assert token_casing(layout([*big, *caps]))[0] is False  # 31 of 3,031
    assert token_casing(layout([*words[:900], *capital]))[0] is False  # 10 of 910
    assert token_casing(layout([f"##{w}" for w in [*words[:980], *capital]]))[0] is False
    assert token_casing(layout(words)) == (
        True,
        "none of its 990 tokens holds a capital letter",
    )
    assert token_casing(layout(words[:99]))[0] is None  # too few to tell
    assert token_casing(layout([chr(0x4E00 + i) for i in range(500)]))[0] is None
    shown = token_casing(layout([*capital, "A", "The", "##Berlin", "Ülke", *words]))[1]
    assert shown == '14 of its 1,004 tokens hold capital letters ("The", "Berlin", "Ülke")'
    path = Path("v/vocab.txt")
    lower = casing_doubt(path, layout([*words, *capital]), True)
    assert lower is not None and lower.startswith(
        "bertforge: warning: the vocabulary v/vocab.txt is read lowercased (--lowercase), but 10 "
    )
    assert casing_doubt(path, layout([*words, *capital]), False) is None
    assert casing_doubt(path, layout(words), True) is None
    upper = casing_doubt(path, layout(words), False)
    assert upper is not None and "the vocabulary v/vocab.txt is read cased (--cased)" in upper
