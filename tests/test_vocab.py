"""`bertforge vocab`: exact size, Google layout, determinism, conversion hygiene, bad input."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import bertforge.vocab as vocab_module
from bertforge.cli import main
from bertforge.config import VocabConfig
from bertforge.errors import UserError
from bertforge.tokenization import read_vocab_file
from bertforge.vocab import (
    convert_sentencepiece_pieces,
    count_texts,
    count_words,
    train_vocab,
    trainer_feed,
)
from tests.conftest import MIXED_DOCS, FullDisk, report_of, write_corpus


def cfg(corpus: Path, out: Path, **kw) -> VocabConfig:
    return VocabConfig(input=(str(corpus),), output=str(out), progress=False, **kw)


def check_hygiene(tokens: list[str], size: int) -> None:
    assert len(tokens) == size and len(set(tokens)) == size
    assert tokens[0] == "[PAD]" and tokens[100:104] == ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert all(t and t == t.strip() for t in tokens)
    assert not any(t in ("<s>", "</s>", "<unk>", "▁") or "▁" in t for t in tokens)
    assert not any(t.startswith("##[") for t in tokens)
    singles = {t for t in tokens if len(t) == 1}
    for ch in singles:
        assert "##" + ch in tokens, f"{ch!r} exists only word-initially"
    for t in tokens:
        if t.startswith("##") and len(t) == 3:
            assert t[2] in singles, f"{t!r} exists only as a continuation"


@pytest.mark.parametrize("algorithm,model", [("wordpiece", "bpe"), ("sentencepiece", "bpe"),
                                             ("sentencepiece", "unigram")])  # fmt: skip
def test_exact_size_layout_and_hygiene(tmp_path: Path, demo_path: Path, algorithm, model):
    out = tmp_path / "v"
    result = train_vocab(cfg(demo_path, out, vocab_size=3000, algorithm=algorithm,
                             sentencepiece_model=model))  # fmt: skip
    tokens = read_vocab_file(out / "vocab.txt")
    check_hygiene(tokens, 3000)
    assert result.padded_unused == 0
    assert {"the", "lord", "god", "##s"} <= set(tokens)
    manifest = json.loads((out / "manifest.json").read_text())
    q = manifest["quality"]
    assert q["unk_rate"] == 0.0 and 1.0 < q["pieces_per_word"] < 1.3 and q["vocab_used"] > 0.3
    assert manifest["counts"]["vocab_size"] == 3000 and manifest["config"]["algorithm"] == algorithm
    assert manifest["outputs"]["vocab.txt"]["sha256"]


@pytest.mark.parametrize("algorithm", ["wordpiece", "sentencepiece"])
def test_deterministic_across_processes(tmp_path: Path, mixed_corpus: Path, algorithm):
    """Byte-identical vocab.txt from two separate processes (hash seeds differ)."""
    outs = []
    for i in range(2):
        out = tmp_path / f"v{i}"
        code = "import sys; from bertforge.cli import main; sys.exit(main(sys.argv[1:]))"
        subprocess.run(
            [sys.executable, "-c", code, "vocab", "--input", str(mixed_corpus), "--output",
             str(out), "--vocab-size", "700", "--algorithm", algorithm, "--min-frequency", "1"],
            check=True, capture_output=True, env={"PYTHONHASHSEED": str(i), "PATH": ""},
        )  # fmt: skip
        outs.append((out / "vocab.txt").read_bytes())
    assert outs[0] == outs[1]


def test_casing_and_accents(tmp_path: Path, mixed_corpus: Path):
    result = train_vocab(cfg(mixed_corpus, tmp_path / "c", vocab_size=900, do_lower_case=False))
    cased = read_vocab_file(result.output / "vocab.txt")
    assert {"İ", "Ö", "ç", "ş", "ğ", "ø", "å"} <= set(cased)
    assert not any(w.startswith(("note: lowercasing", "note: the corpus looks Turkish"))
                   for w in result.warnings)  # fmt: skip
    result = train_vocab(cfg(mixed_corpus, tmp_path / "l", vocab_size=900))
    lower = read_vocab_file(result.output / "vocab.txt")
    assert "ç" not in lower and "c" in lower and "İ" not in lower
    (note,) = [w for w in result.warnings if w.startswith("note: lowercasing")]
    assert "--no-strip-accents keeps them" in note
    manifest = json.loads((result.output / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["warnings"] == result.warnings  # for `bertforge run`'s report.md:
    (turkish,) = [w for w in result.warnings if w.startswith("note: the corpus looks Turkish")]
    report = report_of(tmp_path, vocab="l")
    assert f"- {note}\n" in report and f"- {turkish}\n" in report
    result = train_vocab(cfg(mixed_corpus, tmp_path / "k", vocab_size=900, strip_accents=False))
    keep = read_vocab_file(result.output / "vocab.txt")
    assert {"ç", "ş", "ğ", "ø"} <= set(keep) and "Ö" not in keep
    assert not any(w.startswith("note: lowercasing") for w in result.warnings)
    (turkish,) = [w for w in result.warnings if w.startswith("note: the corpus looks Turkish")]
    assert "İ into i and a combining dot" in turkish
    assert any("\u0307" in t for t in keep)  # the dot of İ's lowercase, in the pieces


def test_a_note_says_when_default_accent_stripping_changes_many_letters():
    """Lowercasing strips accents unless told (Google's default): where that takes marks
    off, or splits letters (NFD: Korean syllables into jamo), for at least 0.5% of the
    letters, a note says how many and which (the most frequent first); never where the user
    chose, or on mostly unaccented text."""
    from bertforge.vocab import accent_note, count_chars

    def note(text: str, **kw) -> str | None:  # type: ignore[no-untyped-def]
        counts = np.zeros(0x110000, dtype=np.int64)
        count_chars([text], counts)
        return accent_note(counts, VocabConfig(input=("-",), output="o", **kw))

    turkish = "Öğretmen çocuklara şarkı söyledi, İstanbul'da güneşli bir gün. " * 3
    found = note(turkish)
    assert found is not None
    letters = sum(c.isalpha() for c in turkish)
    changed = sum(c in "ÖöğçşüİÜ" for c in turkish)
    assert f"takes the marks off {changed / letters:.1%} of the corpus's letters" in found
    assert "splits" not in found
    assert found.index("ş→s") < found.index("ç→c")  # ş three times a sentence, ç once
    assert "ö→o" in found and "i̇→i" in found  # Ö lowercases to ö; İ to i + a dot mark
    assert note(turkish, strip_accents=True) is None  # chosen: no note
    assert note(turkish, strip_accents=False) is None
    assert note(turkish, do_lower_case=False) is None
    english = "The café served a naïve résumé of the quarter's figures to everyone there. "
    english += "Plain words without any marks in them at all, many of them. " * 40
    assert note(english) is None  # 4 of about 2,000 letters
    assert note("é " + "a" * 199) is not None  # 0.5% of the letters: the threshold
    assert note("é " + "a" * 200) is None
    decomposed = unicodedata.normalize("NFD", turkish)  # marks as characters of their own
    assert "combining marks dropped" in (note(decomposed) or "")
    korean = note("한국어 한국 한글 텍스트.")  # NFD splits each syllable into its jamo
    assert korean is not None and "takes the marks off" not in korean
    assert "splits 100.0% of the corpus's letters into their parts (" in korean
    assert "(한→\u1112 \u1161 \u11ab, 국→" in korean  # the most frequent first
    assert note("한국어 한국 한글 텍스트.", strip_accents=False) is None


def test_a_note_says_when_the_corpus_writes_letters_decomposed(tmp_path, capsys):
    """Text not in Unicode's composed form (NFC), as macOS writes it, reads as other pieces
    than the composed text a model mostly sees later: a note where at least 1% of the sampled
    sentences are so, naming a letter; none where accents are stripped (both forms end alike)."""
    from bertforge.vocab import nfc_note

    def note(sentences: list[str], **kw) -> str | None:  # type: ignore[no-untyped-def]
        return nfc_note(sentences, VocabConfig(input=("-",), output="o", **kw))

    norwegian = ["Hun så på månen.", "Vi gikk på tur i går.", "Det er kaldt nå."]
    nfd = [unicodedata.normalize("NFD", s) for s in norwegian]
    found = note(nfd, do_lower_case=False)
    assert found is not None and found.startswith("note: 3 of the 3 sampled sentences are not ")
    assert '("å" written as "a" + U+030A)' in found
    assert note(nfd, strip_accents=False) is not None  # lowercased, accents kept
    assert note(nfd) is None  # lowercasing strips accents: both forms end alike
    assert note(norwegian, do_lower_case=False) is None
    plain = ["plain text"] * 99
    assert note([nfd[0], *plain], do_lower_case=False) is not None  # 1 in 100: the threshold
    assert note([nfd[0], *plain, "one more"], do_lower_case=False) is None
    corpus = tmp_path / "nfd.txt"  # the vocab stage says so
    corpus.write_text("\n".join(nfd * 20) + "\n")
    out = tmp_path / "v"
    assert main(["vocab", str(corpus), "--output", str(out), "--cased", "--vocab-size", "200",
                 "--no-progress"]) == 0  # fmt: skip
    assert "sampled sentences are not in Unicode's composed form, NFC" in capsys.readouterr().err


def test_a_note_says_when_lowercasing_meets_turkish_i():
    """Unicode's lowercasing (Google's and transformers') makes Turkish I into i, not ı, and
    İ into i with a combining dot: a note where ı and İ are 0.5% of the letters and capital
    I and İ a tenth of that; none when cased, on English, or on text lowercased by Turkish
    rules. The vocabulary's manifest records it."""
    from bertforge.tokenization import basic_words
    from bertforge.vocab import count_chars, dotless_i_note

    def note(text: str, **kw) -> str | None:  # type: ignore[no-untyped-def]
        counts = np.zeros(0x110000, dtype=np.int64)
        count_chars([text], counts)
        return dotless_i_note(counts, VocabConfig(input=("-",), output="o", **kw))

    turkish = "Işık İstanbul'da yandı. Irmak kıyısında oturdu, Ilgaz dağını izledi. " * 3
    letters = sum(c.isalpha() for c in turkish)
    found = note(turkish)
    assert found is not None
    share = sum(c in "ıİ" for c in turkish) / letters
    assert f"(ı and İ are {share:.1%} of its letters)" in found
    assert "makes its 9 I into i, not ı, and its 3 İ into i: " in found
    assert '"IŞIK" becomes "isik" and "ışık" "ısık"' in found
    kept = note(turkish, strip_accents=False) or ""
    assert "İ into i and a combining dot: " in kept and '"IŞIK" becomes "işik"' in kept
    # what the note says is what lowercasing does
    assert basic_words(["IŞIK", "ışık"], True, True) == ["isik", "ısık"]
    assert basic_words(["IŞIK", "ışık", "İ"], True, False) == ["işik", "ışık", "i\u0307"]
    assert note(turkish, do_lower_case=False) is None
    assert note("I said I would go, and I went. " * 20) is None  # English: no ı
    lowered = turkish.replace("I", "ı").replace("İ", "i").lower()  # Turkish rules
    assert note(lowered) is None
    assert note(lowered * 20 + " IBM") is None  # one capital in 3,000 letters
    assert note("ı" + "a" * 198 + "I") is not None  # the thresholds, exactly: 1 in 200 ı
    assert note("ı" + "a" * 199 + "I") is None
    assert note("İ" + "a" * 199) is not None  # İ counts as both
    assert note("ı" * 10 + "a" * 1989 + "I") is not None  # and 1 in 2,000 capitals
    assert note("ı" * 11 + "a" * 2188 + "I") is None


def test_wikiextractor_markup_stays_out_of_the_vocabulary(tmp_path: Path):
    """WikiExtractor's <doc ...> lines would make "doc", "url", "https" and "curid" the most
    frequent words; read as markup they give none of them, and a note says how the corpus
    was read (in the manifest, for report.md)."""
    wiki = tmp_path / "wiki_00"
    wiki.write_text("".join(
        f'<doc id="{i}" url="https://no.wikipedia.org/wiki?curid={i}" title="T{i}">\nT{i}\n\n'
        + "\n".join(d) + "\n</doc>\n" for i, d in enumerate(MIXED_DOCS * 40)
    ))  # fmt: skip
    result = train_vocab(cfg(wiki, tmp_path / "v", vocab_size=700))
    tokens = read_vocab_file(result.output / "vocab.txt")
    assert not {"doc", "url", "https", "curid", "wikipedia"} & set(tokens)
    assert "note: read as WikiExtractor output: 200 <doc> elements, each one document" in (
        "\n".join(result.warnings))  # fmt: skip
    manifest = json.loads((result.output / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["counts"]["doc_elements"] == 200 and manifest["warnings"] == result.warnings


def test_json_lines_give_the_vocabulary_of_their_text(tmp_path: Path):
    """Read as text, JSON Lines (ASCII-escaped, as WikiExtractor --json and json.dumps write
    them) would put "u0131", "text" and "id" in the vocabulary; read as records (here from
    --text-field body) they give the vocab.txt of the same documents in Google's format."""
    docs = MIXED_DOCS * 40
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": "\n".join(d)}) + "\n"
                             for i, d in enumerate(docs)))  # fmt: skip
    plain = write_corpus(tmp_path / "c.txt", docs)
    result = train_vocab(cfg(jsonl, tmp_path / "j", vocab_size=700, text_field="body"))
    train_vocab(cfg(plain, tmp_path / "p", vocab_size=700))
    tokens = read_vocab_file(result.output / "vocab.txt")
    assert tokens == read_vocab_file(tmp_path / "p" / "vocab.txt")
    assert not {"u0131", "body", "id"} & set(tokens) and "ı" in tokens
    assert 'note: read as records: 200 from 1 JSON Lines file(s), the "body" field' in (
        "\n".join(result.warnings))  # fmt: skip
    with pytest.raises(UserError, match=r'without a "text" field .*"id", "body".*--text-field'):
        train_vocab(cfg(jsonl, tmp_path / "t", vocab_size=700))


def test_small_corpus_pads_with_unused(tmp_path: Path):
    corpus = write_corpus(tmp_path / "tiny.txt", [["a b c", "abc abc"]])
    result = train_vocab(cfg(corpus, tmp_path / "v", vocab_size=300))
    tokens = read_vocab_file(tmp_path / "v" / "vocab.txt")
    assert len(tokens) == 300 and result.padded_unused > 0 and tokens[-1].startswith("[unused")
    (padded,) = [w for w in result.warnings if "filled the remaining" in w]
    assert "--limit-alphabet" not in padded  # every character has its pieces
    # Room left while --limit-alphabet left characters out ([UNK]): the warning says so. Each
    # of 60 CJK characters is a word of its own; 20 of them are kept.
    corpus = write_corpus(tmp_path / "cjk.txt", [["".join(chr(0x4E00 + i) for i in range(60))]])
    result = train_vocab(cfg(corpus, tmp_path / "c", vocab_size=300, limit_alphabet=20))
    (padded,) = [w for w in result.warnings if "filled the remaining" in w]
    assert padded.endswith(
        "--limit-alphabet 20 left out 40 rarer characters of the corpus, [UNK] wherever they "
        "occur: raise it to give them pieces instead."
    )


def test_vocab_too_small_for_alphabet(tmp_path: Path):
    corpus = write_corpus(tmp_path / "c.txt", [["".join(chr(0x4E00 + i) for i in range(200))]])
    with pytest.raises(UserError, match="raise --vocab-size to at least 504, or lower") as e:
        train_vocab(cfg(corpus, tmp_path / "v", vocab_size=300))
    assert "leaves 196 pieces" in str(e.value) and "fewer than the 400" in str(e.value)
    assert not (tmp_path / "v" / "vocab.txt").exists()
    train_vocab(cfg(corpus, tmp_path / "v", vocab_size=504, overwrite=True))  # the size it names
    assert len(read_vocab_file(tmp_path / "v" / "vocab.txt")) == 504


def test_limit_alphabet_keeps_the_most_frequent(tmp_path: Path):
    corpus = write_corpus(tmp_path / "c.txt", [["aaaa bbb cc d"]] * 5)
    tokens = read_vocab_file(train_vocab(cfg(corpus, tmp_path / "v", vocab_size=200,
                                            limit_alphabet=3)).output / "vocab.txt")  # fmt: skip
    assert {"a", "b", "c"} <= set(tokens) and "d" not in tokens


def test_output_dir_protection(tmp_path: Path, mixed_corpus: Path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and is not a bertforge vocab output"):
        train_vocab(cfg(mixed_corpus, foreign, vocab_size=600))
    assert (foreign / "notes.txt").read_text() == "mine"
    train_vocab(cfg(mixed_corpus, foreign, vocab_size=600, overwrite=True))
    train_vocab(cfg(mixed_corpus, foreign, vocab_size=600))  # its own output: rerun is fine


def test_a_vocabulary_made_another_way_is_not_replaced_without_overwrite(
    tmp_path: Path, mixed_corpus: Path, kjv_corpus: Path, kjv_vocab: Path
):
    """A rerun into a finished vocabulary with other settings, other files or standard input
    is refused, naming what differs, and leaves every file as it was; the same settings on the
    same files make it again; --overwrite replaces it; so does nothing else, extend included."""
    out = tmp_path / "v"
    train_vocab(cfg(mixed_corpus, out, vocab_size=600))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = tmp_path / "other.txt"
    write_corpus(other, MIXED_DOCS * 3)
    refusals = [
        (cfg(mixed_corpus, out, vocab_size=700, do_lower_case=False),
         "--vocab-size was 600, now 700, --do-lower-case was True, now False"),
        (cfg(mixed_corpus, out, vocab_size=600, algorithm="sentencepiece", min_frequency=3,
             num_unused=5, seed=1), "--num-unused was 99, now 5; 1 more"),
        (cfg(other, out, vocab_size=600), f"the input files differ ({other} is new)"),
        (cfg(Path("-"), out, vocab_size=600), "standard input or a pipe cannot be checked"),
    ]  # fmt: skip
    for config, said in refusals:
        with pytest.raises(UserError, match=re.escape(f"--output: {out} holds a vocabulary "
                                                      f"made another way (")) as e:  # fmt: skip
            train_vocab(config)
        assert said in str(e.value) and "pass --overwrite to replace it" in str(e.value)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    said = "(it was made by `bertforge vocab`, this by `bertforge vocab extend`; the input files"
    with pytest.raises(UserError, match=re.escape(said)):
        from bertforge.config import VocabExtendConfig
        from bertforge.vocab import extend_vocab

        extend_vocab(VocabExtendConfig(input=(str(kjv_corpus),), vocab=str(kjv_vocab),
                                       output=str(out), progress=False))  # fmt: skip
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    train_vocab(cfg(mixed_corpus, out, vocab_size=600))  # the same again: made again, the same
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "manifest.json"} == {
        k: v for k, v in before.items() if k != "manifest.json"
    }
    # vocab.txt edited by hand (a word in an [unused] slot): the same rerun would undo it
    tokens = read_vocab_file(out / "vocab.txt")
    tokens[tokens.index("[unused5]")] = "zzzword"
    (out / "vocab.txt").write_text("".join(f"{t}\n" for t in tokens), encoding="utf-8")
    edited = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match=re.escape(
        "(its vocab.txt was edited after it was written, new words in its [unused] slots "
        "perhaps, which making it again would undo); use another directory, or pass "
        "--overwrite")):  # fmt: skip
        train_vocab(cfg(mixed_corpus, out, vocab_size=600))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == edited
    train_vocab(cfg(other, out, vocab_size=700, overwrite=True))
    assert len(read_vocab_file(out / "vocab.txt")) == 700


def test_the_corpus_directory_is_no_output(tmp_path: Path, kjv_vocab: Path):
    """`vocab corpus/ --output corpus/ --overwrite` wrote vocab.txt, tokenizer.json and the
    manifest among the corpus, which the next run over corpus/ read as text; the data stage's
    shards likewise. Refused, --overwrite or not, by directory or glob, and nothing written."""
    from bertforge.config import DataConfig
    from bertforge.data import create_data

    corpus = tmp_path / "corpus"
    write_corpus(corpus / "a.txt", MIXED_DOCS * 20)
    for given, output in ((corpus, corpus), (corpus / "*.txt", f"{corpus}/")):
        said = f"--output: {output} is the directory the corpus is read from ({given})"
        with pytest.raises(UserError, match=re.escape(said)):
            train_vocab(VocabConfig(input=(str(given),), output=str(output), vocab_size=600,
                                    overwrite=True, progress=False))  # fmt: skip
    with pytest.raises(UserError, match="is the directory the corpus is read from"):
        create_data(DataConfig(input=(str(corpus),), vocab=str(kjv_vocab), output=str(corpus),
                               overwrite=True, progress=False))  # fmt: skip
    assert [p.name for p in corpus.iterdir()] == ["a.txt"]
    train_vocab(cfg(corpus, corpus / "vocab", vocab_size=600))  # below it: left out when read


def test_binary_and_empty_input_leave_nothing(tmp_path: Path):
    png = tmp_path / "img.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(UserError, match="PNG image"):
        train_vocab(cfg(png, tmp_path / "v1"))
    assert not (tmp_path / "v1").exists()  # not even the directory, which it had made
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="contains no text"):
        train_vocab(cfg(empty, tmp_path / "v2"))
    assert not (tmp_path / "v2").exists()
    (tmp_path / "mine").mkdir()  # a directory that was there before is kept
    with pytest.raises(UserError, match="contains no text"):
        train_vocab(cfg(empty, tmp_path / "mine"))
    assert (tmp_path / "mine").is_dir() and not (tmp_path / "mine" / "manifest.json").exists()


@pytest.mark.parametrize("room", [0, 3000, 9000])  # the disk fills before/at/after vocab.txt
def test_a_full_disk_stops_cleanly_and_the_rerun_finishes(
    tmp_path, mixed_corpus, monkeypatch, room
):
    clean = train_vocab(cfg(mixed_corpus, tmp_path / "clean", vocab_size=600)).output
    disk = FullDisk(monkeypatch, room)
    out = tmp_path / "v"
    with pytest.raises(UserError, match=r"no space left on the device .*run the same command"):
        train_vocab(cfg(mixed_corpus, out, vocab_size=600))
    assert not (out / "manifest.json").exists() and not list(out.glob(".*.tmp"))
    disk.room = None  # space freed: the same command finishes (the output is its own)
    train_vocab(cfg(mixed_corpus, out, vocab_size=600))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (clean / name).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir())


def test_sentencepiece_conversion_rules():
    raw = ["▁the", "s", "▁", "ing", "<s>", "▁[SEP]", "▁th", "e", "▁x▁y", "ß"]
    out = convert_sentencepiece_pieces(raw, ["e", "h", "i", "n", "g", "s", "t"])
    assert out[:14] == ["e", "h", "i", "n", "g", "s", "t",
                        "##e", "##h", "##i", "##n", "##g", "##s", "##t"]  # fmt: skip
    assert out[14:] == ["the", "##ing", "th"]


def test_cli_vocab_from_stdin(tmp_path: Path, monkeypatch, capsys):
    import io

    text = "\n\n".join("\n".join(d) for d in MIXED_DOCS * 10).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text)))
    out = tmp_path / "v"
    assert main(["vocab", "--input", "-", "--output", str(out), "--vocab_size=650",
                 "--cased", "--no-progress"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "vocab: 650 tokens (wordpiece, cased)" in printed and "held-out" in printed
    assert len(read_vocab_file(out / "vocab.txt")) == 650
    assert not list(out.glob(".stdin-*"))


def test_count_words_is_the_tokenizers_word_count(monkeypatch):
    """Counting distinct tokens then normalizing them in bulk gives the same counts as running
    the tokenizer's normalizer and pre-tokenizer over every sentence; so does the forked half."""
    from collections import Counter

    from bertforge.tokenization import bert_normalizer, bert_pre_tokenizer
    from tests.reference.nasty_text import nasty_lines

    nasty = [raw.decode("utf-8", "ignore") for raw in nasty_lines(300)]
    # A capital sigma lowercases by its neighbours, across an apostrophe or a period.
    sigma = ["ΑΣ'Α and Α'Σ, ΟΔΟΣ. ΣΑΣ.Α Σ' ΑΣ:Α plain", "Ξ'Σ ΣΑ'ΣΑ"]
    sentences = [s for doc in MIXED_DOCS for s in doc] * 40 + nasty + sigma * 3
    for lower in (True, False):
        c = VocabConfig(input=("x",), output="y", do_lower_case=lower)
        normalizer, pre = bert_normalizer(lower, None), bert_pre_tokenizer()
        want = Counter(
            w for s in sentences for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(s))
        )
        assert count_texts([" ".join(sentences)], c).to_counter() == want
        monkeypatch.setattr(vocab_module, "BATCH_LINES", 50)  # small enough to fork
        assert len(sentences) >= 4 * vocab_module.BATCH_LINES
        assert count_words(sentences, c) == want
        monkeypatch.undo()


def test_trainer_feed_keeps_the_frequent_words_and_their_proportions(monkeypatch):
    from collections import Counter

    words = Counter({f"w{i:03d}": 1000 - 3 * i for i in range(300)})
    words.update({"tie_b": 400, "tie_a": 400, "tie_c": 400})  # w200 has 400 too
    batches, scale = trainer_feed(words, seed=1)  # under both limits: fed exactly
    assert scale == 1 and Counter(" ".join(s for b in batches for s in b).split()) == words
    monkeypatch.setattr(vocab_module, "TRAIN_WORDS", 202)
    monkeypatch.setattr(vocab_module, "TRAIN_OCCURRENCES", 30_000)
    batches, scale = trainer_feed(words, seed=1)
    fed = Counter(" ".join(s for b in batches for s in b).split())
    # The 200 words above 400, then the two alphabetically first of the four tied at 400.
    assert set(fed) == {f"w{i:03d}" for i in range(200)} | {"tie_a", "tie_b"}
    total = sum(words[w] for w in fed)
    assert abs(scale - total / 30_000) / scale < 0.02
    assert all(abs(fed[w] - words[w] / scale) < 1.05 for w in fed)  # rounded down or up
    again, _ = trainer_feed(words, seed=1)
    assert again == batches and trainer_feed(words, seed=2)[0] != batches


def test_trainer_feed_does_not_depend_on_counting_order(monkeypatch):
    from collections import Counter

    monkeypatch.setattr(vocab_module, "TRAIN_OCCURRENCES", 1000)  # counts / ~6.5: rounding
    words = Counter({f"w{i}": 7 + i % 13 for i in range(500)})
    reordered = Counter(dict(reversed(list(words.items()))))
    a, _ = trainer_feed(words, seed=3)
    b, _ = trainer_feed(reordered, seed=3)
    assert Counter(" ".join(s for x in a for s in x).split()) == Counter(
        " ".join(s for x in b for s in x).split()
    )


def reference_scan(docs: list[list[str]], cfg: VocabConfig) -> tuple[list[str], list[str]]:
    """The sample and held-out sentences of scan_corpus, written the plain way: a reservoir
    sentence by sentence (Algorithm R) and a heap of every short document."""
    import heapq

    rng, sample_rng = random.Random(cfg.seed), random.Random(cfg.seed + 1)
    reservoir: list[tuple[int, str]] = []
    heap: list[tuple[float, int, list[str]]] = []
    seen = held = 0
    for index, doc in enumerate(docs):
        for sentence in doc:
            if seen < cfg.max_sentences:
                reservoir.append((index, sentence))
            elif (j := sample_rng.randrange(seen + 1)) < cfg.max_sentences:
                reservoir[j] = (index, sentence)
            seen += 1
        if cfg.heldout_sentences and len(doc) <= cfg.heldout_sentences:
            heapq.heappush(heap, (-rng.random(), index, doc))
            held += len(doc)
            while held > cfg.heldout_sentences:
                held -= len(heapq.heappop(heap)[2])
    kept = sorted(heap, reverse=True)[: int(len(docs) * vocab_module.HELDOUT_MAX_SHARE)]
    out = {index for _, index, _ in kept}
    heldout = [s for _, _, doc in sorted(kept, key=lambda x: x[1]) for s in doc]
    return [s for index, s in reservoir if index not in out], heldout


@pytest.mark.parametrize("max_sentences", [7, 150, 1000, 10**6])
@pytest.mark.parametrize("heldout", [0, 3, 40])
def test_scan_samples_like_the_plain_algorithm(tmp_path: Path, max_sentences, heldout):
    from bertforge.corpus import resolve_inputs

    rng = random.Random(5)
    docs = [[f"s{d}.{i} {rng.random()}" for i in range(rng.randint(1, 9))] for d in range(200)]
    path = write_corpus(tmp_path / "c.txt", docs)
    cfg = VocabConfig(input=(str(path),), output="y", max_sentences=max_sentences,
                      heldout_sentences=heldout, progress=False)  # fmt: skip
    scan = vocab_module.scan_corpus(resolve_inputs(cfg.input), cfg)
    assert (scan.sample, scan.heldout) == reference_scan(docs, cfg)
    assert len(scan.sample) <= max_sentences and len(scan.heldout) <= heldout
    if max_sentences >= 1000 and not heldout:  # everything fits: every sentence, in order
        assert scan.sample == [s for doc in docs for s in doc]


def test_count_chars_ascii_and_not():
    import numpy as np

    for lines in (["ab", "c\x00\x7f", "zz z"], ["odd"], ["é ü", "Σ 東京 🙂", "ascii"], []):
        counts = np.zeros(0x110000, dtype=np.int64)
        vocab_module.count_chars(lines, counts)
        want = Counter("".join(lines))
        assert {chr(c): int(counts[c]) for c in np.flatnonzero(counts)} == want


def test_joined_bounds_texts_by_sentences_and_characters(monkeypatch):
    monkeypatch.setattr(vocab_module, "COUNT_CHUNK", 100)
    sentences = [("w" * random.Random(i).randint(1, 60)) for i in range(500)] + ["x" * 1000, "y"]
    texts = vocab_module.joined(sentences)
    assert " ".join(texts) == " ".join(sentences)
    assert all(len(t) < 100 + 1001 for t in texts) and max(map(len, texts)) > 1000
    assert all(t.count(" ") + 1 <= vocab_module.BATCH_LINES for t in texts)
    assert sum(t.count(" ") + 1 for t in texts) == len(sentences) and len(texts) > 100
    assert vocab_module.joined([]) == []


def test_words_too_long_to_tokenize_are_not_trained_on(tmp_path: Path):
    """The tokenizer makes a word over 200 characters one [UNK]; the trainer never sees one
    (its merges are quadratic in a word's length: a 1 MB line without spaces would take hours)."""
    words = Counter({"a" * 200: 5, "b" * 201: 50, "ok": 3})
    batches, _ = trainer_feed(words, seed=1)
    assert Counter(" ".join(s for b in batches for s in b).split()) == {"a" * 200: 5, "ok": 3}
    corpus = write_corpus(tmp_path / "c.txt", [["x" * 300_000], *MIXED_DOCS * 5])
    result = train_vocab(VocabConfig(input=(str(corpus),), output=str(tmp_path / "v"),
                                     vocab_size=500, progress=False))  # fmt: skip
    assert "x" in result.tokens and len(result.tokens) == 500
