"""`bertforge embed` and `bertforge fill-mask`: vectors equal transformers' hidden states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bertforge.cli import main
from bertforge.config import EmbedConfig, FillMaskConfig
from bertforge.embed import embed
from bertforge.errors import UserError
from bertforge.inference import fill_mask, load_model
from tests.conftest import FullDisk

transformers = pytest.importorskip("transformers")

LINES = [
    "In the beginning God created the heaven and the earth.",
    "",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "Jesus wept.",
]


@pytest.fixture(scope="module")
def hf(exported_model):
    tok = transformers.AutoTokenizer.from_pretrained(exported_model)
    model = transformers.AutoModel.from_pretrained(exported_model).eval()
    return tok, model


def hidden(hf, text: str) -> tuple[list[torch.Tensor], list[int | None]]:
    tok, model = hf
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        states = model(**enc, output_hidden_states=True).hidden_states
    return [s[0] for s in states], enc.word_ids()


def test_sentence_vectors(tmp_path, exported_model, hf):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(LINES) + "\n")
    out = tmp_path / "sent.npy"
    result = embed(
        EmbedConfig(model=str(exported_model), input=str(src), output=str(out), progress=False)
    )
    vectors = np.load(out)
    assert vectors.shape == (4, 64) and result.rows == 4
    for line, v in zip(LINES, vectors, strict=True):
        if not line:
            assert not v.any()  # a blank line: no pieces, a zero vector
            continue
        states, _ = hidden(hf, line)
        want = states[-1][1:-1].mean(0).numpy()  # mean over the pieces, [CLS]/[SEP] excluded
        np.testing.assert_allclose(v, want, atol=2e-5)

    cls_out = tmp_path / "cls.safetensors"
    embed(
        EmbedConfig(
            model=str(exported_model),
            input=str(src),
            output=str(cls_out),
            pooling="cls",
            layers="-1,-2",
            progress=False,
        )
    )
    from safetensors.numpy import load_file

    cls = load_file(cls_out)["embeddings"]
    assert cls.shape == (4, 128)
    states, _ = hidden(hf, LINES[0])
    np.testing.assert_allclose(cls[0], torch.cat([states[-1][0], states[-2][0]]).numpy(), atol=2e-5)


def test_auto_precision_is_bf16_on_a_cpu_that_multiplies_bf16_in_hardware(
    tmp_path, exported_model, monkeypatch, capsys
):
    """On such a CPU `--precision auto` embeds in bf16 (2x faster there: bench/embed.py): the
    vectors within bf16's rounding of fp32's, the precision in the summary and in the file's
    metadata; `--precision fp32` gives fp32's exactly, and fp16 on a CPU is an error."""
    from safetensors import safe_open

    from bertforge import hardware

    src = tmp_path / "in.txt"
    src.write_text("\n".join(LINES) + "\n")

    def vectors(name: str, **kw) -> np.ndarray:
        out = tmp_path / f"{name}.safetensors"
        embed(EmbedConfig(model=str(exported_model), input=str(src), output=str(out),
                          overwrite=True, **kw))  # fmt: skip
        with safe_open(out, "np") as f:
            assert f.metadata()["precision"] == kw.get("precision", name)
            return f.get_tensor("embeddings")

    fp32 = vectors("fp32", precision="fp32")
    assert "(fp32 on cpu)" in capsys.readouterr().err
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: True)
    bf16 = vectors("bf16")
    assert "(bf16 on cpu)" in capsys.readouterr().err
    np.testing.assert_array_equal(vectors("fp32", precision="fp32"), fp32)
    rows = [0, 2, 3]  # the blank line's vector is zero in both
    a, b = fp32[rows], bf16[rows]
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert not np.array_equal(a, b) and cosine.min() > 0.999
    with pytest.raises(UserError, match="--precision fp16 needs a CUDA GPU"):
        vectors("fp16", precision="fp16")


def test_a_damaged_model_file_is_an_error_naming_it(tmp_path, exported_model):
    """A model directory whose config.json holds bytes that are not UTF-8, or whose
    tokenizer_config.json (which says the casing) is cut short, is one error naming the file;
    before, a traceback (UnicodeDecodeError, JSONDecodeError)."""
    import shutil

    for name, damage in (("config.json", lambda b: b[:10] + b"\xff" + b[11:]),
                         ("tokenizer_config.json", lambda b: b[: len(b) // 2])):  # fmt: skip
        model = tmp_path / name
        shutil.copytree(exported_model, model)
        (model / name).write_bytes(damage((model / name).read_bytes()))
        with pytest.raises(UserError, match=rf"{model / name}: (cannot read|damaged)"):
            load_model(str(model), "cpu")


def test_json_lines_give_a_vector_per_record(tmp_path, exported_model, capsys):
    """A JSON Lines input gives one row per record, from its --text-field (its lines joined),
    the same vectors as the text file of those records; a record without text gives a zero
    row, and a warning."""
    import json

    records = [{"t": LINES[0] + "\n" + LINES[3]}, {"t": None}, {"t": LINES[2]}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    text = tmp_path / "in.txt"
    text.write_text(f"{LINES[0]} {LINES[3]}\n\n{LINES[2]}\n")
    for name, path, kw in (("j", src, {"text_field": "t"}), ("p", text, {})):
        cfg = EmbedConfig(model=str(exported_model), input=str(path),
                          output=str(tmp_path / f"{name}.npy"), **kw)  # fmt: skip
        assert embed(cfg).rows == 3
    j, p = np.load(tmp_path / "j.npy"), np.load(tmp_path / "p.npy")
    np.testing.assert_array_equal(j, p)
    assert j[0].any() and not j[1].any()
    err = capsys.readouterr().err
    assert "embed: 3 records -> 3 vectors x 64" in err
    assert '1 record(s) had no string "t" field (read as empty)' in err
    assert "embed: 3 lines -> 3 vectors x 64" in err
    one = tmp_path / "one.txt"  # counted in the singular ("1 lines -> 1 vectors" before)
    one.write_text(LINES[0] + "\n")
    embed(EmbedConfig(model=str(exported_model), input=str(one), output=str(tmp_path / "1.npy")))
    assert "embed: 1 line -> 1 vector x 64" in capsys.readouterr().err


def test_word_vectors_with_long_lines_cut_at_word_boundaries(tmp_path, exported_model, hf):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(LINES) + "\n")
    out = tmp_path / "words.safetensors"
    assert (
        main(
            [
                "embed",
                "--model",
                str(exported_model),
                "--input",
                str(src),
                "--output",
                str(out),
                "--level",
                "token",
                "--layers",
                "-1,-2,-3",
                "--combine",
                "mean",
                "--no-progress",
            ]
        )
        == 0
    )
    from safetensors.numpy import load_file

    arrays = load_file(out)
    vectors, offsets = arrays["embeddings"], arrays["offsets"]
    words = (tmp_path / "words.words.txt").read_text().split("\n")[:-1]
    assert len(offsets) == len(LINES) + 1 and len(words) == len(LINES)
    for i, line in enumerate(LINES):
        rows = vectors[offsets[i] : offsets[i + 1]]
        assert len(rows) == len(words[i].split())
        if not line:
            continue
        states, word_ids = hidden(hf, line)
        combined = torch.stack(states[-3:]).mean(0)
        first = [word_ids.index(w) for w in dict.fromkeys(x for x in word_ids if x is not None)]
        np.testing.assert_allclose(rows, combined[first].numpy(), atol=2e-5)
    assert words[0].split()[:3] == ["In", "the", "beginning"]

    # With passes of at most 8 pieces a line is cut at word boundaries: one row per word still.
    short = tmp_path / "short.npy"
    embed(
        EmbedConfig(
            model=str(exported_model),
            input=str(src),
            output=str(short),
            level="token",
            max_length=8,
            progress=False,
        )
    )
    assert np.load(short).shape[0] == offsets[-1]
    np.testing.assert_array_equal(np.load(tmp_path / "short.offsets.npy"), offsets)


def test_lines_are_read_as_far_as_the_model_was_trained_unless_asked(
    tmp_path, exported_model, capsys
):
    """exported_model trained on 64 pieces and has 128 positions: by default a line is read to
    64 pieces; --max-length reads further, up to its positions, and says so: past the trained
    length the positions are untrained, past the positions it reads no further."""
    src = tmp_path / "long.txt"
    src.write_text("and the earth was without form " * 40 + "\n")
    untrained = "the model was trained on sequences of up to 64 pieces, so its positions 64-"
    cases = [([], 64), (["--max-length", "60"], 60), (["--max-length", "100"], 100),
             (["--max-length", "999"], 128)]  # fmt: skip
    for extra, read in cases:
        out = tmp_path / f"v{read}.npy"
        argv = ["embed", "--model", str(exported_model), "--input", str(src), "--output", str(out)]
        assert main([*argv, *extra]) == 0
        err = capsys.readouterr().err
        assert f"1 line(s) were longer than {read} pieces" in err
        assert (f"{untrained}{read - 1} are untrained" in err) == (read > 64)
        assert ("is more than the model's 128 positions; reading 128" in err) == (read == 128)


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_a_full_disk_leaves_no_output_and_the_rerun_finishes(
    tmp_path, exported_model, monkeypatch, suffix
):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(LINES * 50) + "\n")

    def run(name: str) -> dict[str, np.ndarray]:
        out = tmp_path / f"{name}{suffix}"
        embed(EmbedConfig(model=str(exported_model), input=str(src), output=str(out),
                          level="token", progress=False))  # fmt: skip
        files = sorted(p.name.replace(name, "NAME") for p in tmp_path.glob(f"{name}*"))
        assert files == sorted(f"NAME{x}" for x in (suffix, ".words.txt", ".offsets.npy")
                               if x != ".offsets.npy" or suffix == ".npy")  # fmt: skip
        if suffix == ".npy":
            return {
                "embeddings": np.load(out),
                "offsets": np.load(f"{tmp_path / name}.offsets.npy"),
            }
        from safetensors.numpy import load_file

        return load_file(out)

    clean = run("clean")
    rows, dim = clean["embeddings"].shape
    assert rows > 500 and len(clean["offsets"]) == len(LINES * 50) + 1
    disk = FullDisk(monkeypatch, rows * dim * 2)  # half the vectors fit
    with pytest.raises(UserError, match=r"no space left on the device while writing v\."):
        run("v")
    assert not list(tmp_path.glob("v*")) and not list(tmp_path.glob(".*tmp"))
    disk.room = None
    again = run("v")
    for name, array in clean.items():
        assert np.array_equal(again[name], array)


def test_embed_errors_leave_outputs_alone(tmp_path, exported_model, capsys):
    src = tmp_path / "in.txt"
    src.write_text("a line\n")
    out = tmp_path / "v.npy"
    out.write_bytes(b"precious")
    assert (
        main(["embed", "--model", str(exported_model), "--input", str(src), "--output", str(out)])
        == 2
    )
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    with pytest.raises(UserError, match=r"--output: .* must end in \.npy or \.safetensors"):
        EmbedConfig(model="m", input="i", output="v.txt")
    with pytest.raises(UserError, match="--pooling: with --level token use first or mean"):
        EmbedConfig(model="m", input="i", output="v.npy", level="token", pooling="cls")
    with pytest.raises(UserError, match="--layers: the model has 2 layers"):
        embed(
            EmbedConfig(
                model=str(exported_model),
                input=str(src),
                output=str(tmp_path / "w.npy"),
                layers="-4",
            )
        )
    (tmp_path / "parts").mkdir()  # several files would run together: refused
    for name in ("a.txt", "b.txt"):
        (tmp_path / "parts" / name).write_text("a line\n")
    with pytest.raises(UserError, match=r"--input: .*parts names 2 files; embed reads one"):
        embed(EmbedConfig(model=str(exported_model), input=str(tmp_path / "parts"),
                          output=str(tmp_path / "p.npy")))  # fmt: skip
    assert not (tmp_path / "p.npy").exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="no lines"):
        embed(
            EmbedConfig(model=str(exported_model), input=str(empty), output=str(tmp_path / "e.npy"))
        )
    assert not (tmp_path / "e.npy").exists() and not list(tmp_path.glob(".*tmp"))
    # An output in directories not there yet: made (as every stage makes its output's); one
    # through a file: the error says so.
    nested = tmp_path / "vectors" / "of" / "v.npy"
    assert main(["embed", "--model", str(exported_model), "--input", str(src), "--output",
                 str(nested)]) == 0  # fmt: skip
    assert np.load(nested).shape[0] == 1
    assert main(["embed", "--model", str(exported_model), "--input", str(src), "--output",
                 str(src / "v.npy")]) == 1  # fmt: skip
    assert "a file is where a directory is needed" in capsys.readouterr().err
    # The text as an argument, as vocab, data and run take their corpus; one file only
    plain = tmp_path / "plain.npy"
    assert main(["embed", str(src), "--model", str(exported_model), "--output", str(plain)]) == 0
    assert np.array_equal(np.load(plain), np.load(nested))
    for extra in ([str(src), str(empty)], [str(src), "--input", str(empty)]):
        assert main(["embed", *extra, "--model", str(exported_model), "--output",
                     str(tmp_path / "two.npy")]) == 2  # fmt: skip
        assert "INPUT is one path, given as an argument or --input; got " in (
            capsys.readouterr().err
        )
    assert main(["embed", "--model", str(exported_model), "--output", str(plain)]) == 2
    assert "INPUT is required, as an argument (or --input INPUT)" in capsys.readouterr().err
    assert not (tmp_path / "two.npy").exists()
    # A Google-style checkpoint directory: its vocab.txt does not say whether it is cased, so
    # fill-mask and embed take it from --lowercase/--cased (they refused it, and told to
    # export it first); export names the vocabulary beside the checkpoint under --checkpoint.
    google = tmp_path / "google"
    assert main(["export", "--checkpoint", str(exported_model), "--output", str(google),
                 "--format", "google"]) == 0  # fmt: skip
    for name in ("tokenizer_config.json", "config.json", "model.safetensors"):
        (google / name).unlink()
    ckpt = str(google / "bert_model.ckpt")
    capsys.readouterr()
    bare = f"{google / 'vocab.txt'} has no manifest saying whether it is cased; pass --cased"
    assert main(["fill-mask", "--model", ckpt, "The [MASK] ."]) == 2
    assert f"--model: {bare}" in capsys.readouterr().err
    assert main(["export", "--checkpoint", ckpt, "--output", str(tmp_path / "x")]) == 2
    assert f"--checkpoint: {bare}" in capsys.readouterr().err
    assert main(["fill-mask", "--model", ckpt, "--lowercase", "The [MASK] ."]) == 0
    assert main(["fill-mask", "--model", str(exported_model), "The [MASK] ."]) == 0
    said = capsys.readouterr()
    lines = said.out.splitlines()  # the same model: the same guesses
    assert len(lines) == 4 and lines[:2] == lines[2:] and "[MASK] 1:" in lines[1], lines
    assert "looks" not in said.err  # lowercased, as its tokens say it was made
    vectors = tmp_path / "g.npy"
    assert main(["embed", "--model", str(google), "--cased", "--input", str(src), "--output",
                 str(vectors), "--no-progress"]) == 0  # fmt: skip
    assert np.load(vectors).shape[0] == len(src.read_text().splitlines())
    said = f"{google / 'vocab.txt'} is read cased (--cased), but none of its 1,396 tokens"
    assert said in capsys.readouterr().err  # its tokens hold no capital letter: uncased


def test_invalid_utf8_is_reported_whatever_the_bar_and_stops_with_strict_utf8(
    tmp_path, exported_model, capsys
):
    """A line with invalid UTF-8 keeps its row (its bad bytes dropped) and the warning is
    printed with --no-progress too (it was printed only with the bar's flag on); the flag it
    names, --strict-utf8, is embed's too: it stops at the line, leaving the output alone."""
    src = tmp_path / "in.txt"
    src.write_bytes(b"a line\nbad \xff byte\nthird\n")
    out = tmp_path / "v.npy"
    argv = ["embed", "--model", str(exported_model), "--input", str(src), "--output", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "embed: 3 lines -> 3 vectors" in err
    dropped = "1 line(s) had invalid UTF-8 (bytes dropped, as Google's scripts do); first at"
    assert f"{dropped} {src}:2" in err
    assert "Use --strict-utf8 to stop on them instead" in err
    kept = out.read_bytes()
    assert main([*argv, "--overwrite", "--strict-utf8"]) == 2
    assert f"{src}:2: invalid UTF-8 at byte 11 of the file" in capsys.readouterr().err
    assert out.read_bytes() == kept and not list(tmp_path.glob(".*tmp"))


def test_fill_mask(exported_model, capsys):
    loaded = load_model(str(exported_model), "cpu")
    guesses = fill_mask(loaded, "the [MASK] of the [MASK]", 3)
    assert len(guesses) == 2 and all(len(g) == 3 for g in guesses)
    for g in guesses:
        probs = [x.probability for x in g]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
        assert not any(x.token.startswith("[") for x in g)
    with pytest.raises(UserError, match=r"no \[MASK\]"):
        fill_mask(loaded, "no mask here", 3)
    assert (
        main(
            [
                "fill-mask",
                "--model",
                str(exported_model),
                "--top-k",
                "2",
                "And God said, Let there be [MASK].",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("And God said, Let there be [") and "[MASK] 1:" in out
    assert FillMaskConfig(text=("a [MASK]",), model="m").top_k == 5


def test_fill_mask_refuses_a_bare_encoder_which_embed_reads(tmp_path, exported_model, hf, capsys):
    """transformers' BertModel saves no masked-LM head: fill-mask's guesses would be random."""
    bare = tmp_path / "bare"
    hf[1].save_pretrained(bare)
    hf[0].save_pretrained(bare)
    assert main(["fill-mask", "--model", str(bare), "The [MASK] ."]) == 2
    err = capsys.readouterr().err
    assert f"--model {bare} has no masked-LM head" in err and "--init-checkpoint" in err
    (text := tmp_path / "in.txt").write_text("\n".join(LINES) + "\n")
    out = tmp_path / "v.npy"
    assert main(["embed", "--model", str(bare), "--input", str(text), "--output", str(out)]) == 0
    assert np.load(out).shape[0] == len(LINES)
