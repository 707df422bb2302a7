"""BERT tokenization identical to Google's FullTokenizer, and the Hugging Face tokenizer files.

The engine is Hugging Face `tokenizers` (Rust, parallel). Its stock BertNormalizer and
BertPreTokenizer differ from Google's Python in corners that a multilingual corpus hits: they
drop private-use and unassigned characters (Google keeps them, as [UNK]), they use older
Unicode tables than Python's `unicodedata` (U+061D is punctuation to Google, not to them), and
they lowercase a word-final Σ to σ where Python gives ς. So we assemble the pipeline from
explicit character classes computed with Python's `unicodedata`, the tables Google's code
uses, and write them into tokenizer.json, which then behaves the same wherever it is loaded.
WordPiece turns words over 200 characters into [UNK], as Google's does. Equality of token ids
with Google's FullTokenizer is tested line by line in tests/reference/.

For bulk work the data stage uses `LineEncoder`, written here because it is where the data
stage's time went: it tokenizes each distinct space-separated piece of a corpus once (Google's
BasicTokenizer in bulk with Python's string methods, `basic_words`, then the WordPiece model)
and gathers ids with numpy; the same ids, several times faster than the fast tokenizer.

This module also reads and validates Google's vocab.txt (or the WordPiece vocabulary of a
Hugging Face tokenizer.json, all that transformers 5 saves) and writes the files with which
`transformers.AutoTokenizer.from_pretrained(DIR)` loads the tokenizer with the right casing.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import sys
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from bertforge.errors import UserError
from bertforge.fileio import (
    RUN_STATE,
    atomic_open,
    copy_file,
    read_manifest,
    sha256_file,
    write_json,
    write_text,
)

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIALS = (PAD, UNK, CLS, SEP, MASK)
MAX_INPUT_CHARS_PER_WORD = 200  # Google's WordpieceTokenizer: longer words become [UNK]
MODEL_MAX_LENGTH = 512


def google_layout(pieces: Sequence[str], num_unused: int) -> list[str]:
    """Google's vocab.txt order: [PAD], [unused0..], [UNK], [CLS], [SEP], [MASK], pieces."""
    unused = [f"[unused{i}]" for i in range(num_unused)]
    return [PAD, *unused, UNK, CLS, SEP, MASK, *pieces]


def find_vocab_file(path: str | Path, flag: str | None = None) -> Path:
    """The vocabulary file of a vocabulary given as its directory or as the file itself: the
    directory's vocab.txt, else its Hugging Face tokenizer.json (transformers 5 saves a BERT
    tokenizer as that alone, without vocab.txt). Given the flag that named `path`, a missing
    file is an error naming it: the path given, or the directory that holds neither file."""
    p = Path(path)
    if not p.is_dir():
        found = p
    elif not (p / "vocab.txt").is_file() and (p / "tokenizer.json").is_file():
        found = p / "tokenizer.json"
    else:
        found = p / "vocab.txt"
    if flag is not None and not found.is_file():
        if p.is_dir() and (p / RUN_STATE).is_file() and (p / "vocab").is_dir():
            raise UserError(
                f"{flag}: {p} is a `bertforge run` directory; its vocabulary is {p / 'vocab'}: "
                "give that."
            )
        if p.is_dir():
            raise UserError(f"{flag}: {p} holds no vocab.txt or tokenizer.json.")
        raise UserError(f"{flag}: {p} does not exist.")
    return found


def read_vocab_file(path: str | Path) -> list[str]:
    """Read a vocabulary, validating it: Google's vocab.txt (one token per line, id = line
    number), or the WordPiece vocabulary of a Hugging Face tokenizer.json (a `.json` file)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--vocab: {p} does not exist.")
    if p.suffix == ".json":
        tokens, unit = tokenizer_json_tokens(p), "token"
    else:
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{p}: not UTF-8 text (byte {e.start}); is this a vocab.txt?") from None
        tokens = [line.strip() for line in text.split("\n")]
        if tokens and tokens[-1] == "":
            tokens.pop()  # the final newline
        unit = "line"

    def at(i: int) -> str:  # vocab.txt:LINE, or tokenizer.json: id ID
        return f"{p}:{i + 1}" if unit == "line" else f"{p}: id {i}"

    seen: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if unit == "line" and any(c.isspace() for c in tok):  # never a token: text splits there
            shown = tok if len(tok) <= 40 else tok[:40] + "..."
            why = "is this a corpus?"
            if "\t" in tok:  # a piece, a tab and its score
                why = ("a SentencePiece .vocab (a piece and its score a line) is not one: "
                       "`bertforge vocab --algorithm sentencepiece` writes SentencePiece's "
                       "pieces as WordPiece.")  # fmt: skip
            raise UserError(
                f"{at(i)}: {shown!r} holds whitespace, and a vocab.txt holds one token per line "
                f"(text is split at spaces before its words are looked up); {why}"
            )
        if not tok:
            raise UserError(f"{at(i)}: empty {unit} in the vocabulary; remove it.")
        if tok in seen:
            raise UserError(
                f"{at(i)}: duplicate entry {tok!r} (first on {entry(p, seen[tok])}); each token "
                "must appear once."
            )
        seen[tok] = i
    missing = [s for s in SPECIALS if s not in seen]
    if missing:
        raise UserError(f"{p}: missing special token(s) {', '.join(missing)}; BERT needs them.")
    return tokens


def entry(path: Path, i: int) -> str:
    """Where token id `i` is in a vocabulary file: its line in a vocab.txt, its id in JSON."""
    return f"id {i}" if path.suffix == ".json" else f"line {i + 1}"


def tokenizer_json_tokens(p: Path) -> list[str]:
    """The tokens of a Hugging Face tokenizer.json's WordPiece model, in id order. Tokens added
    beyond it (`add_tokens`) are refused: WordPiece would split them, as transformers does not."""
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(
            f"{p}: not a tokenizer.json ({e}); give a vocab.txt with --vocab."
        ) from None
    model = data.get("model") if isinstance(data, dict) else None
    kind = model.get("type") if isinstance(model, dict) else None
    if kind != "WordPiece" or not isinstance(model.get("vocab"), dict):
        raise UserError(
            f"{p}: a {kind or 'non-WordPiece'} tokenizer, not BERT's WordPiece; give the model's "
            "vocab.txt with --vocab."
        )
    if model.get("continuing_subword_prefix", "##") != "##":
        raise UserError(
            f"{p}: its WordPiece continues words with {model['continuing_subword_prefix']!r}, "
            "not Google's '##'; bertforge reads '##' vocabularies only."
        )
    vocab: dict[str, int] = model["vocab"]
    tokens: list[str | None] = [None] * len(vocab)
    for tok, i in vocab.items():
        if not isinstance(i, int) or not 0 <= i < len(tokens) or tokens[i] is not None:
            raise UserError(
                f"{p}: {tok!r} has id {i}, but a WordPiece vocabulary of {len(vocab)} tokens "
                f"needs the ids 0 to {len(vocab) - 1}, each once; the file is damaged."
            )
        tokens[i] = tok
    ids = [a.get("id") for a in data.get("added_tokens") or [] if isinstance(a, dict)]
    added = sorted(i for i in ids if isinstance(i, int) and i >= len(vocab))
    if added:
        raise UserError(
            f"{p}: {len(added)} token(s) added beyond its WordPiece vocabulary (ids {added[0]} "
            f"and on, `added_tokens`); bertforge reads the WordPiece vocabulary alone. Give a "
            "vocab.txt with --vocab, or a model without added tokens."
        )
    return [t for t in tokens if t is not None]


def build_tokenizer(
    tokens: Sequence[str], do_lower_case: bool, strip_accents: bool | None = None
) -> Tokenizer:
    """The fast tokenizer equivalent to Google's FullTokenizer for this vocab and casing."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = wordpiece_tokenizer(vocab)
    tok.normalizer = bert_normalizer(do_lower_case, strip_accents)
    tok.pre_tokenizer = bert_pre_tokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS}:0 $A:0 {SEP}:0",
        pair=f"{CLS}:0 $A:0 {SEP}:0 $B:1 {SEP}:1",
        special_tokens=[(CLS, vocab[CLS]), (SEP, vocab[SEP])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def wordpiece_tokenizer(vocab: dict[str, int]) -> Tokenizer:
    """Google's WordpieceTokenizer alone, on text already split into words by whitespace."""
    tok = Tokenizer(
        models.WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD)
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def char_classes(cps: np.ndarray, cats: np.ndarray) -> dict[str, np.ndarray]:
    """Google's character classes as boolean masks over code points with their categories:

    removed: _clean_text drops NUL, U+FFFD and control/format characters but \\t\\n\\r;
    whitespace: _is_whitespace (\\t, \\n, \\r, category Zs) less the plain space, which needs no
    rewriting (rewriting it costs the normalizer a third of its time);
    punctuation: _is_punctuation, non-alphanumeric ASCII and categories P*;
    nonspacing: what _run_strip_accents drops after NFD (category Mn)."""
    tnr = np.isin(cps, [9, 10, 13])
    ascii_punct = (
        ((cps >= 33) & (cps <= 47)) | ((cps >= 58) & (cps <= 64))
        | ((cps >= 91) & (cps <= 96)) | ((cps >= 123) & (cps <= 126))
    )  # fmt: skip
    return {
        "removed": ~tnr & (np.isin(cps, [0, 0xFFFD]) | np.isin(cats, ["Cc", "Cf"])),
        "whitespace": tnr | ((cats == "Zs") & (cps != 32)),
        "punctuation": ascii_punct | np.char.startswith(cats, "P"),
        "nonspacing": cats == "Mn",
    }


def categories(cps: np.ndarray) -> np.ndarray:
    """Unicode general category of each code point, from Python's unicodedata."""
    return np.array(list(map(unicodedata.category, map(chr, cps.tolist()))), dtype="U2")


@functools.cache
def char_ranges() -> dict[str, list[tuple[int, int]]]:
    """Code point ranges of each class, from Python's unicodedata (once a process)."""
    # Planes 4-13 hold no assigned character and 15-16 only private use: none is in a class.
    cps = np.concatenate([np.arange(0x40000), np.arange(0xE0000, 0xF0000)])
    out = {}
    for name, mask in char_classes(cps, categories(cps)).items():
        members = cps[mask]
        breaks = np.flatnonzero(np.diff(members) != 1)
        starts = np.concatenate([members[:1], members[breaks + 1]])
        ends = np.concatenate([members[breaks], members[-1:]])
        out[name] = list(zip(starts.tolist(), ends.tolist(), strict=True))
    return out


def onig_class(name: str) -> str:
    """The class as a regex for tokenizers (Oniguruma syntax)."""
    parts = (f"\\x{{{a:x}}}" + (f"-\\x{{{b:x}}}" if b > a else "") for a, b in char_ranges()[name])
    return "[" + "".join(parts) + "]"


# Python's str.lower() maps Σ to ς at the end of a word (Unicode's Final_Sigma condition:
# a cased letter before it, none after it, case-ignorable characters skipped).
FINAL_SIGMA = (
    r"(?<=\p{Cased}|\p{Cased}\p{Case_Ignorable}|\p{Cased}\p{Case_Ignorable}{2})"
    r"Σ(?!\p{Case_Ignorable}*\p{Cased})"
)


def bert_normalizer(do_lower_case: bool, strip_accents: bool | None) -> normalizers.Normalizer:
    """Google's BasicTokenizer text cleaning; accents follow casing unless set explicitly."""
    steps = [
        normalizers.Replace(Regex(onig_class("removed")), ""),
        normalizers.Replace(Regex(onig_class("whitespace")), " "),
        normalizers.BertNormalizer(
            clean_text=False, handle_chinese_chars=True, strip_accents=False, lowercase=False
        ),
    ]
    if do_lower_case:
        steps += [normalizers.Replace(Regex(FINAL_SIGMA), "ς"), normalizers.Lowercase()]
    if do_lower_case if strip_accents is None else strip_accents:
        steps += [normalizers.NFD(), normalizers.Replace(Regex(onig_class("nonspacing")), "")]
    return normalizers.Sequence(steps)


# Google's _is_chinese_char: the CJK Unified Ideographs blocks, each split off as a word.
CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)  # fmt: skip


def basic_words(lines: Sequence[str], do_lower_case: bool, strip_accents: bool | None) -> list[str]:
    """Google's BasicTokenizer on many lines at once: for each line (no line breaks in it),
    its words (punctuation split off) separated by spaces.

    The same words as bert_normalizer + bert_pre_tokenizer (tested), for a bulk job such as
    normalizing the distinct tokens of a corpus: Python's string methods do it at C speed over
    one large string, where the Hugging Face normalizer tracks alignments character by
    character. Every step maps characters independently (Python's lower() applies Unicode's
    Final_Sigma rule itself, and a line break is not case-ignorable), so lines never influence
    each other."""
    if not lines:
        return []
    text = "\n".join(lines)
    if text.count("\n") != len(lines) - 1:
        raise ValueError("basic_words: a line contains a line break")
    chars = set(text)
    classes = classes_of(chars)
    table = {c: "" for c in classes["removed"]}
    # BERT's whitespace, and what else str.split() splits on (U+2028, U+2029), become spaces.
    table.update((c, " ") for c in chars if c.isspace() and c != "\n" and c not in table)
    table.update((c, f" {c} ") for c in classes["cjk"])
    if table:
        text = char_class_re(table).sub(lambda m: table[m.group()], text)
        chars = (chars - table.keys()) | set("".join(table.values()))
    if do_lower_case:
        text = text.lower()
        chars = set("".join(c.lower() for c in chars)) | ({"ς"} if "Σ" in chars else set())
    if do_lower_case if strip_accents is None else strip_accents:
        text = unicodedata.normalize("NFD", text)
        chars = set(unicodedata.normalize("NFD", "".join(chars)))
        marks = classes_of(chars)["nonspacing"]
        if marks:
            text = char_class_re(marks).sub("", text)
    punctuation = classes_of(chars)["punctuation"]
    if punctuation:
        text = " ".join(char_class_re(punctuation, group=True).split(text))
    return text.split("\n")


def char_class_re(chars: Iterable[str], group: bool = False) -> re.Pattern[str]:
    """A regex matching any one of `chars` (captured with group=True)."""
    body = "[" + "".join(re.escape(c) for c in sorted(chars)) + "]"
    return re.compile(f"({body})" if group else body)


def classes_of(chars: Iterable[str]) -> dict[str, list[str]]:
    """The characters among `chars` in each of Google's character classes, and CJK."""
    cps = np.array(sorted(map(ord, chars)), dtype=np.int64)
    masks = char_classes(cps, categories(cps))
    masks["cjk"] = np.zeros(len(cps), dtype=bool)
    for a, b in CJK_RANGES:
        masks["cjk"] |= (cps >= a) & (cps <= b)
    return {name: [chr(cp) for cp in cps[mask].tolist()] for name, mask in masks.items()}


def bert_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Google's whitespace split, then every punctuation character as its own word."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(onig_class("punctuation")), behavior="isolated"),
        ]
    )


def save_tokenizer_files(
    directory: str | Path,
    tokens: Sequence[str],
    do_lower_case: bool,
    strip_accents: bool | None,
    model_max_length: int = MODEL_MAX_LENGTH,
) -> list[str]:
    """Write vocab.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json."""
    d = Path(directory)
    with atomic_open(d / "vocab.txt", "w") as f:
        f.write("".join(t + "\n" for t in tokens))
    tokenizer = build_tokenizer(tokens, do_lower_case, strip_accents)
    with atomic_open(d / "tokenizer.json", "w") as f:
        f.write(tokenizer.to_str(pretty=True))
    write_json(
        d / "tokenizer_config.json",
        {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": do_lower_case,
            "strip_accents": strip_accents,
            "tokenize_chinese_chars": True,
            "model_max_length": model_max_length,
            "unk_token": UNK,
            "sep_token": SEP,
            "pad_token": PAD,
            "cls_token": CLS,
            "mask_token": MASK,
            "clean_up_tokenization_spaces": True,
        },
    )
    write_json(
        d / "special_tokens_map.json",
        {"unk_token": UNK, "sep_token": SEP, "pad_token": PAD, "cls_token": CLS,
         "mask_token": MASK},
    )  # fmt: skip
    return ["vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


@dataclass(frozen=True)
class Vocab:
    """A vocabulary as later stages consume it: tokens, casing, and where it came from."""

    path: Path  # the vocab.txt
    tokens: tuple[str, ...]
    do_lower_case: bool
    strip_accents: bool | None
    sha256: str
    # A warning where the casing was given (nothing beside the file records it) and the
    # tokens say the other (`casing_doubt`); the stage reading it prints it.
    casing_doubt: str | None = None

    @property
    def size(self) -> int:
        return len(self.tokens)

    def id(self, token: str) -> int:
        return self.tokens.index(token)

    def tokenizer(self) -> Tokenizer:
        return build_tokenizer(self.tokens, self.do_lower_case, self.strip_accents)

    def encoder(self) -> LineEncoder:
        return LineEncoder(self.tokens, self.do_lower_case, self.strip_accents)


UNUSED = re.compile(r"\[unused\d+\]")


def check_init_vocab(tokens: Sequence[str], path: Path, theirs_file: Path) -> None:
    """Continued pretraining: the data's vocabulary (`tokens`, read from `path`) must be the
    checkpoint's, token for token, except where the checkpoint has an [unusedN] slot: Google
    left those for new words, written over in a copy of vocab.txt (`bertforge vocab extend`)."""
    theirs = read_vocab_file(theirs_file)
    if (first := first_difference(tokens, theirs, UNUSED.fullmatch)) is not None:
        raise UserError(
            f"--init-checkpoint: its vocabulary {theirs_file} ({len(theirs)} tokens) is not "
            f"the data's {path} ({len(tokens)} tokens; first difference at "
            f"{entry(theirs_file, first)}, not an [unusedN] slot); make the data with --vocab "
            f"{theirs_file}, or a copy of it that writes new words over its [unusedN] lines "
            "only (`bertforge vocab extend`); or keep this vocabulary with --transfer-vocab "
            "(shared tokens keep the checkpoint's embeddings, the others start from those of "
            "their pieces)."
        )


def first_difference(
    ours: Sequence[str], theirs: Sequence[str], free: Callable[[str], object] | None = None
) -> int | None:
    """The first id at which two vocabularies differ, or the shorter one's end; None where
    they are the same. A token of `theirs` that `free` accepts (an [unusedN] slot) may differ."""
    for i, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if a != b and not (free and free(b)):
            return i
    return None if len(ours) == len(theirs) else min(len(ours), len(theirs))


def new_words(tokens: Sequence[str], theirs: Sequence[str]) -> list[int]:
    """Ids at which `tokens` has a word where the vocabulary `theirs` has an [unusedN] slot."""
    pairs = zip(tokens, theirs, strict=False)
    return [i for i, (a, b) in enumerate(pairs) if a != b and UNUSED.fullmatch(b)]


def wordpiece_ids(token: str, vocab: dict[str, int]) -> list[int] | None:
    """The ids of `token`'s pieces under `vocab`, by Google's greedy longest-match-first
    (a `##` token is split as a word's continuation); None where a piece is missing ([UNK])."""
    prefix = "##" if token.startswith("##") and len(token) > 2 else ""
    word = token[len(prefix) :]
    ids: list[int] = []
    start = 0
    while start < len(word):
        end = len(word)
        while end > start and (prefix if start == 0 else "##") + word[start:end] not in vocab:
            end -= 1
        if end == start:
            return None
        ids.append(vocab[(prefix if start == 0 else "##") + word[start:end]])
        start = end
    return ids


def recorded_casing(path: Path) -> tuple[bool | None, bool | None, Path | None]:
    """(do_lower_case, strip_accents, the file saying so) recorded beside a vocabulary: in a
    `bertforge vocab` manifest (for a directory) or a tokenizer_config.json, else in the
    BertNormalizer of a tokenizer.json read as the vocabulary; Nones if none of them."""
    directory = path if path.is_dir() else path.parent
    manifest = read_manifest(directory) if path.is_dir() else None
    if manifest is not None and manifest.get("stage") == "vocab":
        cfg = manifest["config"]
        return cfg["do_lower_case"], cfg.get("strip_accents"), directory / "manifest.json"
    source = directory / "tokenizer_config.json"
    if source.is_file():
        try:
            cfg = json.loads(source.read_text(encoding="utf-8"))
        except ValueError as e:  # JSON's errors and UnicodeDecodeError
            raise UserError(
                f"{source}: damaged ({e}); it says whether the vocabulary is cased: restore it "
                "(export the model again), or delete it and give --do-lower-case or "
                "--no-do-lower-case."
            ) from None
        if isinstance(cfg, dict) and "do_lower_case" in cfg:
            return bool(cfg["do_lower_case"]), cfg.get("strip_accents"), source
    tokenizer = find_vocab_file(path)
    if tokenizer.suffix == ".json" and tokenizer.is_file():
        try:
            norm = json.loads(tokenizer.read_text(encoding="utf-8")).get("normalizer") or {}
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            norm = {}  # reading its vocabulary says what is wrong with it
        if norm.get("type") == "BertNormalizer" and isinstance(norm.get("lowercase"), bool):
            return norm["lowercase"], norm.get("strip_accents"), tokenizer
    return None, None, None


def normalization(do_lower_case: bool, strip_accents: bool | None) -> str:
    """What a tokenizer does to text before its words are looked up, in words; accents
    follow the casing unless set (Google's and transformers' BasicTokenizer)."""
    stripped = do_lower_case if strip_accents is None else strip_accents
    case = "lowercases" if do_lower_case else "keeps case"
    return f"{case} and {'strips' if stripped else 'keeps'} accents"


def other_normalization(vocab: Vocab, model_vocab: Path) -> tuple[str, str, Path] | None:
    """(what `vocab`'s tokenizer does to text, what the one recorded beside a model's
    vocabulary file does, the file recording it) where the two differ; None where they are
    the same or nothing is recorded (Google's checkpoints have a bare vocab.txt)."""
    lower, accents, said = recorded_casing(model_vocab.parent)
    if lower is None or said is None:
        return None
    ours, theirs = (
        normalization(vocab.do_lower_case, vocab.strip_accents),
        normalization(lower, accents),
    )
    return None if ours == theirs else (ours, theirs, said)


CASED_SHARE = 0.01  # of a vocabulary's tokens holding a capital letter: it was made cased
CASED_MIN = 10  # ... and at least this many
UNCASED_MIN = 100  # tokens with lowercase letters and no capital one: it was made lowercased


def token_casing(tokens: Sequence[str]) -> tuple[bool | None, str]:
    """What a vocabulary's own tokens say of its casing: (True: made from lowercased text,
    False: from cased text, None: they do not tell; the evidence, in words). Lowercased text
    holds no capital letter, so neither does a vocabulary made from it; one made from cased
    text holds many (a cased vocabulary of the demo corpus: 19% of its tokens). A script
    without case (Chinese, Arabic, Hindi) tells nothing. Bracketed specials ([CLS],
    [unused0]) are passed over."""
    words = [t.removeprefix("##") for t in tokens if not (t.startswith("[") and t.endswith("]"))]
    capital = [w for w in words if w != w.lower()]
    if len(capital) >= max(CASED_MIN, CASED_SHARE * len(words)):
        shown = [w for w in capital if len(w) > 2][:3] or capital[:3]
        examples = ", ".join(f'"{w}"' for w in shown)
        held = f"{len(capital):,} of its {len(words):,} tokens hold capital letters"
        return False, f"{held} ({examples})"
    if not capital and sum(w != w.upper() for w in words) >= UNCASED_MIN:
        return True, f"none of its {len(words):,} tokens holds a capital letter"
    return None, ""


def casing_doubt(path: Path, tokens: Sequence[str], do_lower_case: bool) -> str | None:
    """A warning where a vocabulary's tokens (`token_casing`) say it was made with the other
    casing than the one it is read with: read lowercased, a cased vocabulary's capitalized
    tokens are never used and its accents are stripped (mBERT and Turkish models are cased);
    read cased, an uncased one turns every capitalized word into [UNK]."""
    made_lower, evidence = token_casing(tokens)
    if made_lower is None or made_lower == do_lower_case:
        return None
    if do_lower_case:
        return (
            f"bertforge: warning: the vocabulary {path} is read lowercased (--lowercase), but "
            f"{evidence}, which lowercased text never reaches: it looks cased. Read so, those "
            "tokens are never used and accents are stripped (Turkish ç ş ğ ö ü become c s g o "
            "u). Pass --cased if it was made from cased text."
        )
    return (
        f"bertforge: warning: the vocabulary {path} is read cased (--cased), but {evidence}: it "
        "looks uncased. Read so, every word with a capital letter becomes [UNK]. Pass "
        "--lowercase if it was made from lowercased text (or leave it, if the text has no "
        "capital letters)."
    )


def load_vocab(path: str | Path, do_lower_case: bool | None = None, flag: str = "--vocab") -> Vocab:
    """Load a vocab directory (casing from its manifest, tokenizer_config.json or tokenizer.json:
    `recorded_casing`) or a bare vocab.txt (casing must then be given). A given casing that
    contradicts the recorded one is an error: that mismatch silently ruins a model. `flag`
    names where the vocabulary came from in errors (--checkpoint: the one beside it)."""
    p = Path(path)
    vocab_file = find_vocab_file(p, flag)  # before the casing: a missing file says so
    recorded, strip_accents, source = recorded_casing(p)
    if recorded is not None and do_lower_case is not None and recorded != do_lower_case:
        raise UserError(
            f"{'--lowercase' if do_lower_case else '--cased'} (--do-lower-case="
            f"{str(do_lower_case).lower()}) contradicts {source}, which records "
            f"do_lower_case={str(recorded).lower()}; drop the flag (it is read from there)."
        )
    casing = recorded if recorded is not None else do_lower_case
    if casing is None:
        raise UserError(
            f"{flag}: {vocab_file} has no manifest saying whether it is cased; pass --cased "
            "or --lowercase (--no-do-lower-case or --do-lower-case; Google: "
            "--do_lower_case=False/True)."
        )
    tokens = read_vocab_file(vocab_file)
    doubt = casing_doubt(vocab_file, tokens, casing) if recorded is None else None
    return Vocab(vocab_file, tuple(tokens), casing, strip_accents, sha256_file(vocab_file), doubt)


class _IdTable:
    """Keys (strings) -> their token ids, stored end to end in one growing numpy array, and
    how often each key was used."""

    def __init__(self) -> None:
        self.slot: dict[str, int] = {}  # in slot order: keys are added with the next slots
        self.uses = np.zeros(0, dtype=np.int64)
        self.starts = np.zeros(1 << 16, dtype=np.int64)  # slot -> where its ids start
        self.lengths = np.zeros(1 << 16, dtype=np.int64)  # slot -> how many ids
        self.ids = np.zeros(1 << 18, dtype=np.int64)
        self.used = 0

    def add(self, keys: list[str], lengths: np.ndarray, ids: np.ndarray) -> None:
        first, end = len(self.slot), len(self.slot) + len(keys)
        if end > len(self.starts):
            self.starts = np.resize(self.starts, max(end, 2 * len(self.starts)))
            self.lengths = np.resize(self.lengths, len(self.starts))
        if self.used + len(ids) > len(self.ids):
            self.ids = np.resize(self.ids, max(self.used + len(ids), 2 * len(self.ids)))
        self.starts[first:end] = self.used + np.cumsum(lengths) - lengths
        self.lengths[first:end] = lengths
        self.ids[self.used : self.used + len(ids)] = ids
        self.used += len(ids)
        self.slot.update(zip(keys, range(first, end), strict=True))
        self.uses = np.concatenate([self.uses, np.zeros(len(keys), np.int64)])

    def count(self, slots: np.ndarray) -> None:
        """Record one use of each slot in `slots`."""
        self.uses += np.bincount(slots, minlength=len(self.uses))

    def most_used(self, keep: int) -> _IdTable:
        """A table of the `keep` most used keys (counts halved, so that recent use counts)."""
        order = np.argsort(-self.uses, kind="stable")[:keep]
        keys = list(self.slot)
        table = _IdTable()
        table.add([keys[i] for i in order.tolist()], *self.gather(order)[::-1])
        table.uses = self.uses[order] // 2
        return table

    def slots(self, keys: list[str]) -> np.ndarray:
        """Slot of each key, -1 where it is not in the table."""
        return np.fromiter(map(self.slot.get, keys, itertools.repeat(-1)), np.int64, len(keys))

    def lookup(self, keys: list[str]) -> np.ndarray:
        """Slot of each key, all of which are in the table."""
        return np.array(list(map(self.slot.__getitem__, keys)), dtype=np.int64)

    def gather(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the ids of the slots end to end, how many each slot has)."""
        lengths = self.lengths[slots]
        ends = np.cumsum(lengths)
        total = int(ends[-1]) if len(ends) else 0
        where = np.repeat(self.starts[slots] - (ends - lengths), lengths) + np.arange(total)
        return self.ids[where], lengths


def segment_sums(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Sums of consecutive runs of `values`, run i being counts[i] long (runs may be empty)."""
    cum = np.concatenate([[0], np.cumsum(values)])
    return np.diff(cum[np.concatenate([[0], np.cumsum(counts)])])


class LineEncoder:
    """Google's FullTokenizer over many lines, as flat token ids, with each distinct
    space-separated piece of text tokenized once.

    Exact because Google's tokenization of a line is the concatenation of the tokenizations of
    its space-separated pieces: cleaning, CJK spacing, accent stripping and punctuation
    splitting act on characters, lowercasing (with its Final_Sigma rule) on whitespace-split
    tokens, and WordPiece on words, none across a space. A corpus repeats its pieces (Zipf), so
    a table of piece -> ids turns tokenization into one dict lookup per piece and numpy
    gathers. Pieces not yet in it go through basic_words, and their distinct words not yet in
    a second table through the WordPiece model, in bulk (the Hugging Face tokenizer's per-call
    cost is larger than a dict lookup's by two orders of magnitude). When the pieces would
    exceed `max_entries`, the half most used stay; the words are then cleared when they would.
    That bounds the memory (about 300 bytes an entry); the output never depends on what the
    tables hold."""

    def __init__(
        self, tokens: Sequence[str], do_lower_case: bool, strip_accents: bool | None,
        max_entries: int = 1 << 18,
    ) -> None:  # fmt: skip
        self.do_lower_case = do_lower_case
        self.strip_accents = strip_accents
        self.max_entries = max_entries
        self.wordpiece = wordpiece_tokenizer({tok: i for i, tok in enumerate(tokens)})
        self.pieces = _IdTable()
        self.words = _IdTable()

    def _add(self, pieces: list[str]) -> None:
        """Add pieces (and their words not yet known) to the tables."""
        split = basic_words(pieces, self.do_lower_case, self.strip_accents)
        words = " ".join(split).split()
        per_piece = np.fromiter(map(len, map(str.split, split)), np.int64, len(split))
        new = [w for w in dict.fromkeys(words) if w not in self.words.slot]
        if len(self.words.slot) + len(new) > self.max_entries:
            self.words = _IdTable()  # words are looked up only for new pieces: start afresh
            new = list(dict.fromkeys(words))
        if new:
            tokenize = self.wordpiece.model.tokenize
            encoded = [[t.id for t in tokenize(w)] for w in new]
            lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
            flat = np.fromiter(itertools.chain.from_iterable(encoded), np.int64, lengths.sum())
            self.words.add(new, lengths, flat)
        ids, lengths = self.words.gather(self.words.lookup(words))
        self.pieces.add(pieces, segment_sums(lengths, per_piece), ids)

    def encode(self, lines: Sequence[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """(all ids end to end, number of ids per line). Lines hold no line breaks."""
        pieces = " ".join(lines).split(" ")
        slots = self.pieces.slots(pieces)
        missing = np.flatnonzero(slots < 0)
        if len(missing):
            absent = [pieces[i] for i in missing.tolist()]
            new = list(dict.fromkeys(absent))
            if len(self.pieces.slot) + len(new) > self.max_entries:
                self.pieces = self.pieces.most_used(self.max_entries // 2)
                slots = self.pieces.slots(pieces)
                missing = np.flatnonzero(slots < 0)
                absent = [pieces[i] for i in missing.tolist()]
                new = list(dict.fromkeys(absent))
            self._add(new)
            slots[missing] = self.pieces.lookup(absent)
        self.pieces.count(slots)
        ids, lengths = self.pieces.gather(slots)
        per_line = np.fromiter(map(str.count, lines, itertools.repeat(" ")), np.int64, len(lines))
        return ids.astype(dtype), segment_sums(lengths, per_line + 1)


VOCAB_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def same_tokens(tokenizer_json: Path, vocab: Vocab) -> bool:
    """Whether a tokenizer.json holds `vocab`'s tokens, in its order (one it cannot read
    as BERT's WordPiece does not)."""
    if tokenizer_json.resolve() == vocab.path.resolve():
        return True
    try:
        return tuple(tokenizer_json_tokens(tokenizer_json)) == vocab.tokens
    except UserError:
        return False


def copy_vocab(vocab: Vocab, out: Path) -> None:
    """The vocabulary travels with what was made with it (a training run's model, which export
    and later stages read from there; a data directory's records, which hold token ids only):
    `VOCAB_FILES` from beside `vocab`, and a tokenizer_config.json saying its casing. A
    tokenizer.json beside a vocab.txt that holds other tokens (vocab.txt edited by hand after
    `bertforge vocab`, to put words in [unused] slots) is written anew from vocab.txt, whose
    tokens are the ones used: a copy would disagree with the token ids it travels with."""
    source = vocab.path.parent
    for name in VOCAB_FILES:
        src, target = (vocab.path if name == "vocab.txt" else source / name), out / name
        if name == "vocab.txt" and vocab.path.suffix == ".json":  # read from a tokenizer.json
            write_text(target, "".join(f"{token}\n" for token in vocab.tokens))
        elif name == "tokenizer.json" and src.is_file() and not same_tokens(src, vocab):
            print(
                f"bertforge: note: {src} holds other tokens than {vocab.path} (was vocab.txt "
                f"edited by hand?); vocab.txt's are the ones used, and {target} is written "
                "from them.",
                file=sys.stderr,
            )
            tokenizer = build_tokenizer(vocab.tokens, vocab.do_lower_case, vocab.strip_accents)
            write_text(target, tokenizer.to_str(pretty=True))
        elif src.is_file():
            if src.resolve() != target.resolve():
                copy_file(src, target)
        else:  # an earlier vocabulary's, where a stage was redone with another (--overwrite)
            target.unlink(missing_ok=True)
    config_path = out / "tokenizer_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or "do_lower_case" not in config:  # a casing given by flag
        casing = {"do_lower_case": vocab.do_lower_case, "strip_accents": vocab.strip_accents}
        config = config if isinstance(config, dict) else {"tokenizer_class": "BertTokenizer"}
        write_json(config_path, {**config, **casing})
