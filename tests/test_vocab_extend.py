"""`bertforge vocab extend`: new words over [unusedN] lines, the rest of the vocabulary kept."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from bertforge.checkpoint import seed_new_words
from bertforge.cli import main
from bertforge.config import VocabExtendConfig
from bertforge.errors import UserError
from bertforge.tokenization import (
    build_tokenizer,
    load_vocab,
    read_vocab_file,
    wordpiece_ids,
    wordpiece_tokenizer,
)
from bertforge.vocab import extend_vocab


def ecfg(corpus: Path, vocab: Path, out: Path, **kw) -> VocabExtendConfig:
    """kjv_vocab was trained on kjv_corpus: the words it splits are rare there."""
    kw.setdefault("min_count", 3)
    return VocabExtendConfig(
        input=(str(corpus),), vocab=str(vocab), output=str(out), progress=False, **kw
    )


def expected_words(corpus: Path, tokens: list[str], n: int, min_count: int) -> list[str]:
    """The ranking worked out independently: the corpus's words as the Hugging Face tokenizer
    splits them, each scored by occurrences x (pieces - 1) under the vocabulary."""
    tok = build_tokenizer(tokens, do_lower_case=True)
    counts: Counter[str] = Counter()
    for line in corpus.read_text(encoding="utf-8").splitlines():
        normalized = tok.normalizer.normalize_str(line)
        counts.update(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(normalized))
    vocab = {t: i for i, t in enumerate(tokens)}
    split = wordpiece_tokenizer(vocab)
    scored = []
    for word, count in counts.items():
        ids = split.encode(word).ids
        if count >= min_count and word not in vocab and len(ids) > 1 and vocab["[UNK]"] not in ids:
            scored.append((-count * (len(ids) - 1), word))
    return [w for _, w in sorted(scored)[:n]]


def test_a_models_tokenizer_json_alone_is_extended_as_its_vocab_txt(
    tmp_path: Path, kjv_corpus: Path, kjv_vocab: Path
):
    """A model saved by transformers 5 has tokenizer.json and no vocab.txt."""
    transformers = pytest.importorskip("transformers")
    hf = tmp_path / "hf"
    transformers.BertTokenizerFast(str(kjv_vocab / "vocab.txt")).save_pretrained(hf)
    (hf / "vocab.txt").unlink(missing_ok=True)  # transformers 4 writes it beside
    extend_vocab(ecfg(kjv_corpus, hf, tmp_path / "a", max_words=5, heldout_sentences=0))
    extend_vocab(ecfg(kjv_corpus, kjv_vocab, tmp_path / "b", max_words=5, heldout_sentences=0))
    a, b = (read_vocab_file(tmp_path / d / "vocab.txt") for d in "ab")
    assert a == b and a != read_vocab_file(kjv_vocab / "vocab.txt")


def test_the_words_that_save_most_pieces_go_over_the_unused_lines(
    tmp_path: Path, kjv_corpus: Path, kjv_vocab: Path
):
    base = read_vocab_file(kjv_vocab / "vocab.txt")
    out = tmp_path / "ext"
    result = extend_vocab(ecfg(kjv_corpus, kjv_vocab, out, max_words=30, heldout_sentences=0))
    tokens = read_vocab_file(out / "vocab.txt")
    assert len(tokens) == len(base)
    changed = [i for i, (a, b) in enumerate(zip(base, tokens, strict=True)) if a != b]
    assert changed == list(range(1, 31))  # [unused0..29], in order; every other line kept
    want = expected_words(kjv_corpus, base, 30, min_count=3)
    assert len(want) == 30 and tokens[1:31] == want
    assert [a["word"] for a in result.added] == want and result.slots == 99
    # the manifest records the casing (later stages read it), the base and each word
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == "vocab" and m["config"]["do_lower_case"] is True
    assert m["extends"]["sha256"] == load_vocab(kjv_vocab).sha256
    assert m["added"][0] == {**result.added[0], "id": 1, "slot": "[unused0]"}
    assert load_vocab(out).do_lower_case is True
    # transformers reads each new word as one token, capitalized or not (uncased)
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    assert auto.tokenize(f"And {want[0].capitalize()} said") == ["and", want[0], "said"]
    # held-out text takes fewer pieces per word with the new words
    again = extend_vocab(ecfg(kjv_corpus, kjv_vocab, tmp_path / "q"))
    before, after = again.before.as_dict(), again.after.as_dict()
    assert after["sentences"] > 0 and after["pieces_per_word"] < before["pieces_per_word"]
    assert len(again.added) == 99 and (tmp_path / "q" / "tokenizer.json").is_file()
    assert min(a["count"] for a in again.added) >= 3  # --min-count
    rare = extend_vocab(
        ecfg(kjv_corpus, kjv_vocab, tmp_path / "r", min_count=10**6, heldout_sentences=0)
    )
    assert rare.added == [] and read_vocab_file(tmp_path / "r" / "vocab.txt") == base
    # ... and says how many words it split were too rare, where it added none or left room
    assert rare.rarer == len(expected_words(kjv_corpus, base, 10**9, min_count=1)) > 99
    assert again.rarer == 0  # its room (99 lines) was filled
    # the same inputs give the same file
    extend_vocab(ecfg(kjv_corpus, kjv_vocab, tmp_path / "same", max_words=30, heldout_sentences=0))
    assert (tmp_path / "same" / "vocab.txt").read_bytes() == (out / "vocab.txt").read_bytes()


def test_listed_words_come_first_as_the_tokenizer_normalizes_them(
    tmp_path: Path, kjv_corpus: Path, kjv_vocab: Path
):
    words = tmp_path / "words.txt"
    words.write_text("# domain terms\nZzyzx\n\nCafé\n  The  \n##quux\nzzyzx\n", encoding="utf-8")
    out = tmp_path / "ext"
    result = extend_vocab(ecfg(kjv_corpus, kjv_vocab, out, words=str(words), max_words=5))
    tokens = read_vocab_file(out / "vocab.txt")
    # lowercased and accents stripped as the uncased tokenizer does; "the" is there already
    assert tokens[1:4] == ["zzyzx", "cafe", "##quux"] and result.already == ["the"]
    assert len(result.added) == 5 and tokens[4:6] == [a["word"] for a in result.added[3:]]
    assert result.added[0]["count"] == 0
    assert wordpiece_ids("##quux", {t: i for i, t in enumerate(tokens)}) == [3]
    # a line that is several words to BERT is refused, naming the file and line
    words.write_text("Zzyzx\nNew York\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"--words {words}:2: 'New York' is not one word"):
        extend_vocab(ecfg(kjv_corpus, kjv_vocab, tmp_path / "x", words=str(words)))
    words.write_text("aaaa\nbbbb\ncccc\n", encoding="utf-8")
    with pytest.raises(UserError, match="lists 3 new words, but there is room for 2"):
        extend_vocab(ecfg(kjv_corpus, kjv_vocab, tmp_path / "x", words=str(words), max_words=2))


def test_bad_inputs_are_refused_before_anything_is_written(
    tmp_path: Path, kjv_corpus: Path, kjv_vocab: Path, capsys
):
    with pytest.raises(UserError, match="is the directory of --vocab"):
        extend_vocab(ecfg(kjv_corpus, kjv_vocab, kjv_vocab))
    assert read_vocab_file(kjv_vocab / "vocab.txt")[1] == "[unused0]"  # untouched
    # a bare vocab.txt (as in Google's checkpoint folders) needs its casing
    google = tmp_path / "google"
    google.mkdir()
    shutil.copy(kjv_vocab / "vocab.txt", google / "vocab.txt")
    with pytest.raises(
        UserError,
        match=r"pass --cased or --lowercase \(--no-do-lower-case or --do-lower-case; Google",
    ):
        extend_vocab(ecfg(kjv_corpus, google, tmp_path / "g"))
    capsys.readouterr()
    extend_vocab(ecfg(kjv_corpus, google / "vocab.txt", tmp_path / "g", do_lower_case=True))
    assert load_vocab(tmp_path / "g").do_lower_case is True
    assert "looks" not in capsys.readouterr().err
    extend_vocab(ecfg(kjv_corpus, google / "vocab.txt", tmp_path / "c", do_lower_case=False))
    said = f"{google / 'vocab.txt'} is read cased (--cased), but none of its 1,396 tokens"
    assert said in capsys.readouterr().err  # an uncased vocabulary (no capital): warned
    # no [unusedN] lines: nothing to write over
    full = [t for t in read_vocab_file(kjv_vocab / "vocab.txt") if not t.startswith("[unused")]
    (google / "vocab.txt").write_text("\n".join(full) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="has no \\[unusedN\\] lines"):
        extend_vocab(ecfg(kjv_corpus, google, tmp_path / "n", do_lower_case=True))
    assert not (tmp_path / "n" / "vocab.txt").exists()


def test_cli(tmp_path: Path, kjv_corpus: Path, kjv_vocab: Path, capsys):
    out = tmp_path / "ext"
    argv = ["vocab", "extend", "--input", str(kjv_corpus), "--vocab", str(kjv_vocab),
            "--output", str(out), "--max-words", "12", "--min-count", "3",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"12 new word(s) over the 99 [unusedN] lines of {kjv_vocab / 'vocab.txt'}" in printed
    assert "[unused0] -> " in printed and "... (2 more in manifest.json)" in printed
    assert "were seen fewer than --min-count" not in printed  # room was left, but not for that
    assert "pieces/word" in printed and f"--vocab {out}" in printed
    assert "WikiExtractor" not in capsys.readouterr().err
    wiki = tmp_path / "wiki_00"  # the corpus as WikiExtractor writes it: a note says so
    chapters = kjv_corpus.read_text().split("\n\n")
    wiki.write_text("".join(f'<doc id="{i}" title="{i}">\n{c}\n</doc>\n'
                            for i, c in enumerate(chapters)))  # fmt: skip
    wiki_argv = [*argv[:3], str(wiki), *argv[4:7], str(tmp_path / "ext2"), *argv[8:]]
    assert main(wiki_argv) == 0
    note = f"note: read as WikiExtractor output: {len(chapters):,} <doc> elements, each one"
    assert note in capsys.readouterr().err
    jsonl = tmp_path / "c.jsonl"  # as JSON Lines, from --text-field: the same words chosen
    jsonl.write_text("".join(json.dumps({"body": c}) + "\n" for c in chapters))
    json_argv = [*argv[:3], str(jsonl), *argv[4:7], str(tmp_path / "ext3"), *argv[8:]]
    assert main([*json_argv, "--text-field", "body"]) == 0
    assert f"note: read as records: {len(chapters):,} from 1 JSON Lines" in capsys.readouterr().err
    assert read_vocab_file(tmp_path / "ext3" / "vocab.txt") == read_vocab_file(out / "vocab.txt")
    assert main([*argv[:7], str(tmp_path / "ext4"), "--min-count", "100000"]) == 0
    printed = capsys.readouterr().out
    assert "0 new word(s) over the 99 [unusedN] lines" in printed
    assert "other word(s) that the vocabulary splits were seen fewer than --min-count 100000 " in (
        printed
    )
    assert "nothing added: " in printed and "next: make the data" not in printed
    assert main([*argv[:-1], "--max-wrds", "3"]) == 2
    assert "Did you mean --max-words" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["vocab", "--help"])  # where a user looks first
    assert "`bertforge vocab extend` writes new words" in capsys.readouterr().out


def test_wordpiece_ids_split_as_googles_tokenizer(kjv_vocab: Path):
    tokens = read_vocab_file(kjv_vocab / "vocab.txt")
    vocab = {t: i for i, t in enumerate(tokens)}
    split = wordpiece_tokenizer(vocab)
    words = ["jerusalem", "philistines", "abimelech", "zzyzx", "x", "lovingkindness", "é"]
    for word in words + [t for t in tokens[1000:1100] if not t.startswith("##")]:
        ids = split.encode(word).ids
        assert wordpiece_ids(word, vocab) == (None if ids == [vocab["[UNK]"]] else ids), word
    # a continuation token is split as a continuation: "##" on every piece
    cont = next(t for t in tokens if t.startswith("##") and len(t) > 4)
    ids = wordpiece_ids(cont + cont[2:], vocab)
    assert ids is not None and all(tokens[i].startswith("##") for i in ids)


def test_new_words_start_from_the_mean_of_their_pieces():
    theirs = ["[PAD]", "[unused0]", "[unused1]", "[unused2]", "[UNK]", "[CLS]", "[SEP]",
              "[MASK]", "a", "b", "c", "##b", "##c", "ab", "##bc"]  # fmt: skip
    tokens = theirs[:]
    tokens[1:4] = ["abc", "##cb", "aé"]  # ab + ##c; ##c + ##b; é is not in theirs
    emb = torch.randn(16, 4)  # one padding row, as the model pads its vocabulary
    bias = torch.randn(16)
    weights = {"word_embeddings.weight": emb.bfloat16(), "mlm_bias": bias, "other": emb}
    out, new = seed_new_words(weights, tokens, theirs)
    assert new.seeded == [1, 2] and new.unknown == [3]
    want = {1: [13, 12], 2: [12, 11]}
    for i, ids in want.items():
        torch.testing.assert_close(out["mlm_bias"][i], bias[ids].mean())
        assert out["word_embeddings.weight"].dtype == torch.bfloat16
        torch.testing.assert_close(
            out["word_embeddings.weight"][i], emb.bfloat16()[ids].float().mean(0).bfloat16()
        )
    kept = [0, 3, *range(4, 16)]
    assert torch.equal(out["word_embeddings.weight"][kept], emb.bfloat16()[kept])
    assert out["other"] is emb and torch.equal(weights["mlm_bias"], bias)  # input untouched
    bare, _ = seed_new_words({"word_embeddings.weight": emb}, tokens, theirs)  # no MLM head
    torch.testing.assert_close(bare["word_embeddings.weight"][1], emb[[13, 12]].mean(0))
    assert seed_new_words(weights, theirs, theirs)[0] is weights  # nothing new
