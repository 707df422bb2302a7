"""`bertforge export`: transformers loads the directory and computes bertforge's logits."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from bertforge.checkpoint import read_init_checkpoint
from bertforge.cli import main
from bertforge.config import ExportConfig
from bertforge.errors import UserError
from bertforge.export import export
from bertforge.inference import load_model
from bertforge.model import to_hf
from tests.conftest import FullDisk, vocab_head

transformers = pytest.importorskip("transformers")

TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "And God said, Let there be light",
]


def our_logits(model_dir: Path, text: str) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    loaded = load_model(str(model_dir), "cpu")
    ids = loaded.tokenizer.encode(text).ids
    x = torch.tensor([ids])
    with torch.no_grad():
        mlm, nsp = loaded.model(
            x, torch.zeros_like(x), torch.tensor([len(ids)]), torch.arange(len(ids))[None]
        )
    return ids, mlm[0], nsp[0]


def test_transformers_loads_the_export_and_agrees(exported_model, trained_run):
    tok = transformers.AutoTokenizer.from_pretrained(exported_model)
    pretraining = transformers.BertForPreTraining.from_pretrained(exported_model).eval()
    masked_lm = transformers.AutoModelForMaskedLM.from_pretrained(exported_model).eval()
    encoder = transformers.AutoModel.from_pretrained(exported_model).eval()
    for text in TEXTS:
        ids, mlm, nsp = our_logits(trained_run, text)  # the training directory itself
        enc = tok(text, return_tensors="pt")
        assert enc["input_ids"][0].tolist() == ids
        with torch.no_grad():
            out = pretraining(**enc)
            torch.testing.assert_close(out.prediction_logits[0], mlm, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.seq_relationship_logits[0], nsp, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(masked_lm(**enc).logits[0], mlm, atol=1e-5, rtol=1e-5)
            hidden = encoder(**enc).last_hidden_state[0]
        loaded = load_model(str(exported_model), "cpu")
        x = enc["input_ids"]
        ours = loaded.model.hidden_states(x, torch.tensor([x.shape[1]]))[-1][0]
        torch.testing.assert_close(hidden, ours.detach(), atol=1e-5, rtol=1e-5)


def test_fill_mask_pipeline_gives_our_guesses(exported_model):
    from bertforge.inference import fill_mask

    fill = transformers.pipeline("fill-mask", model=str(exported_model), device="cpu")
    text = "And God said, Let there be [MASK]."
    theirs = fill(text, top_k=50)
    ours = fill_mask(load_model(str(exported_model), "cpu"), text, 5)[0]
    # Ours never guesses special tokens; theirs may: compare the ranking of ordinary tokens.
    ordinary = [g for g in theirs if not g["token_str"].startswith("[")][:5]
    assert [g.token for g in ours] == [g["token_str"] for g in ordinary]
    # Same distribution: each probability differs only by the special tokens' mass.
    scale = ours[0].probability / ordinary[0]["score"]
    for g, h in zip(ours, ordinary, strict=True):
        assert g.probability == pytest.approx(h["score"] * scale, rel=1e-4)
    loaded = load_model(str(exported_model), "cpu")
    for text, says in (("Let there be light.", "."),  # no [MASK], and "[mask]": not one either
                       ("Let there be [mask].", " ([MASK], in capitals).")):  # fmt: skip
        with pytest.raises(UserError) as e:
            fill_mask(loaded, text, 5)
        assert (
            str(e.value)
            == f"no [MASK] in {text!r}; put [MASK] where a word should be guessed{says}"
        )


def test_export_files_and_manifest(tmp_path, trained_run):
    out = tmp_path / "model"
    assert (
        main(
            ["export", "--checkpoint", str(trained_run), "--output", str(out), "--format", "google"]
        )
        == 0
    )
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "vocab.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "bert_config.json",
        "manifest.json",
    } <= names
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForPreTraining"] and config["vocab_size"] == 1500
    assert json.loads((out / "tokenizer_config.json").read_text())["do_lower_case"] is True
    assert json.loads((out / "bert_config.json").read_text())["hidden_size"] == 64
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "export"
    assert manifest["inputs"][0]["step"] == 30
    assert manifest["training"]["config"]["num_train_steps"] == 30
    assert manifest["data"]["max_seq_length"] == 64 and manifest["data"]["counts"]["instances"]
    assert manifest["eval"]["step"] == 30 and 0 <= manifest["eval"]["masked_lm_accuracy"] <= 1
    assert set(manifest["outputs"]) >= {"model.safetensors", "vocab.txt", "bert_config.json"}
    # No vocabulary padding leaks out: 1500 rows, as the vocabulary.
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("bert.embeddings.word_embeddings.weight").shape == (1500, 64)
        assert "cls.predictions.decoder.weight" not in f.keys()  # noqa: SIM118  # tied, as transformers saves
        hf = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118

    # The TF checkpoint holds the same weights (read back without TensorFlow; TensorFlow and
    # Google's own model code read it in tests/reference).
    ckpt = "bert_model.ckpt"
    assert {f"{ckpt}.index", f"{ckpt}.data-00000-of-00001"} <= set(manifest["outputs"])
    google = read_init_checkpoint(str(out / ckpt))
    assert google.kind == "google" and google.vocab_file == out / "vocab.txt"
    back = dict(to_hf(google.weights, google.config))
    assert set(hf) <= set(back)
    for name, tensor in hf.items():
        assert torch.equal(back[name], tensor), name
    # Exported again as hf: the Google files of the earlier export do not linger.
    assert main(["export", "--checkpoint", str(trained_run), "--output", str(out)]) == 0
    assert (
        not list(out.glob("bert_*"))
        and "bert_config.json" not in json.loads((out / "manifest.json").read_text())["outputs"]
    )


def test_an_export_changed_since_is_not_replaced_without_overwrite(tmp_path, trained_run, capsys):
    """Files of an export changed since it was written (a model fine-tuned and saved over
    it) are not replaced by exporting again, unless --overwrite; files the export never
    wrote (a model card) stay either way."""
    out = tmp_path / "model"
    argv = ["export", "--checkpoint", str(trained_run), "--output", str(out)]
    assert main(argv) == 0
    assert main(argv) == 0  # the same again: written again
    (out / "README.md").write_text("my model card")
    weights = out / "model.safetensors"
    exported = weights.read_bytes()
    weights.write_bytes(exported[:-1] + bytes([exported[-1] ^ 1]))  # one weight, same size
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"bertforge: error: --output: {out} holds an export whose model.safetensors changed "
        "since it was written (a model fine-tuned and saved there?); exporting again would "
        "replace them. Give another --output, or pass --overwrite.\n"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main([*argv, "--overwrite"]) == 0
    assert weights.read_bytes() == exported
    assert (out / "README.md").read_text() == "my model card"


def test_the_export_reads_no_further_than_training_did(tmp_path, trained_run, capsys):
    """trained_run trained on sequences of 64 pieces and has 128 positions: rows 64-127 are as
    initialized. The export's model_max_length is 64, so transformers' tokenizer (and flair's
    windows) stop there, and so do embed and fill-mask; Google's format keeps it beside the
    checkpoint. A directory whose tokenizer_config.json has transformers' no-limit number
    reads every position."""
    out = tmp_path / "model"
    argv = ["export", "--checkpoint", str(trained_run), "--output", str(out)]
    assert main([*argv, "--format", "google"]) == 0
    assert "model_max_length 64: trained on sequences of up to 64 pieces, so its positions " \
           "64-127 are untrained" in capsys.readouterr().out  # fmt: skip
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 64
    assert json.loads((out / "manifest.json").read_text())["trained_length"] == 64
    assert transformers.AutoTokenizer.from_pretrained(out).model_max_length == 64
    assert load_model(str(out)).max_length == load_model(str(trained_run)).max_length == 64
    assert read_init_checkpoint(str(out / "bert_model.ckpt")).trained_length == 64
    assert read_init_checkpoint(str(out)).config.max_position_embeddings == 128
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 10**30}))
    assert read_init_checkpoint(str(out)).trained_length is None
    assert load_model(str(out)).max_length == 128
    assert "model_max_length" not in capsys.readouterr().out


def test_continue_from_run_pretrainings_output_directory(
    tmp_path, trained_run, train_data, tiny_bert_config, capsys
):
    """run_pretraining.py's --output_dir: model.ckpt-N checkpoints, TensorFlow's `checkpoint`
    state file naming the latest (absolute, from the machine that trained), no bert_config.json
    and no vocab.txt. The latest is read, and --bert-config gives the size."""
    google = tmp_path / "google"
    assert main(["export", "--checkpoint", str(trained_run), "--output", str(google),
                 "--format", "google"]) == 0  # fmt: skip
    run = tmp_path / "pretraining_output"
    run.mkdir()
    for step in (9, 10):  # sorted by name, model.ckpt-9 would come last
        for f in google.glob("bert_model.ckpt.*"):
            (run / f.name.replace("bert_model.ckpt", f"model.ckpt-{step}")).write_bytes(
                f.read_bytes()
            )
    (run / "checkpoint").write_text(
        'model_checkpoint_path: "gs://bucket/pretraining_output/model.ckpt-10"\n'
        'all_model_checkpoint_paths: "gs://bucket/pretraining_output/model.ckpt-9"\n'
        'all_model_checkpoint_paths: "gs://bucket/pretraining_output/model.ckpt-10"\n'
    )
    argv = ["train", "--data", str(train_data), "--output", str(tmp_path / "cont"),
            "--init_checkpoint", str(run), "--train-batch-size", "8", "--num-train-steps", "2",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{run}/model.ckpt-10: no bert_config.json" in err and "--bert-config FILE" in err
    assert main([*argv, "--bert_config_file", str(tiny_bert_config)]) == 0
    init = read_init_checkpoint(str(run), bert_config=str(tiny_bert_config))
    assert init.kind == "google" and init.path == run / "model.ckpt-10"
    want = read_init_checkpoint(str(trained_run))
    for name, t in init.weights.items():
        assert torch.equal(t, want.weights[name]), name
    # A data file cut short (a copy or download that stopped) is named as such.
    data = run / "model.ckpt-9.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(UserError, match=r"model.ckpt-9: variable .* the checkpoint is truncated"):
        read_init_checkpoint(str(run / "model.ckpt-9"), bert_config=str(tiny_bert_config))
    # A state file naming a checkpoint that is not there says which.
    (run / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-11"\n')
    with pytest.raises(UserError, match=r"names the checkpoint model.ckpt-11, which is not in"):
        read_init_checkpoint(str(run), bert_config=str(tiny_bert_config))


def test_export_of_an_export_is_identical(tmp_path, exported_model):
    again = tmp_path / "again"
    export(ExportConfig(checkpoint=str(exported_model), output=str(again)))
    a = (exported_model / "model.safetensors").read_bytes()
    assert a == (again / "model.safetensors").read_bytes()
    for name in ("vocab.txt", "tokenizer.json", "config.json"):
        assert (exported_model / name).read_text() == (again / name).read_text()


@pytest.mark.parametrize("fill", ["weights", "google checkpoint"])
def test_a_full_disk_stops_cleanly_and_the_rerun_finishes(tmp_path, trained_run, monkeypatch, fill):
    clean = tmp_path / "clean"
    export(ExportConfig(checkpoint=str(trained_run), output=str(clean), format="google"))
    weights = (clean / "model.safetensors").stat().st_size
    room = weights // 2 if fill == "weights" else 2 * weights  # the TF data file comes later
    disk = FullDisk(monkeypatch, room)
    out = tmp_path / "m"
    with pytest.raises(UserError, match=r"no space left on the device .*run the same command"):
        export(ExportConfig(checkpoint=str(trained_run), output=str(out), format="google"))
    assert not (out / "manifest.json").exists() and not list(out.glob(".*.tmp"))
    disk.room = None
    export(ExportConfig(checkpoint=str(trained_run), output=str(out), format="google"))
    names = sorted(p.name for p in clean.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        if name != "manifest.json":  # it records the time and command
            assert (out / name).read_bytes() == (clean / name).read_bytes(), name


def test_export_errors(tmp_path, trained_run, exported_model, kjv_vocab, train_data, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    assert main(["export", "--checkpoint", str(trained_run), "--output", str(occupied)]) == 2
    assert "not a bertforge export output" in capsys.readouterr().err
    assert (occupied / "notes.txt").read_text() == "mine"  # nothing touched
    manifest = (trained_run / "manifest.json").read_bytes()
    argv = ["export", "--checkpoint", str(trained_run), "--output", str(trained_run)]
    assert main([*argv, "--overwrite"]) == 2  # another stage's output: refused all the same
    assert f"{trained_run} holds a bertforge train output, which an export output written " in (
        capsys.readouterr().err
    )
    assert (trained_run / "manifest.json").read_bytes() == manifest

    # A vocabulary of the right size but other words than the one beside the model: refused
    tokens = (trained_run / "vocab.txt").read_text().split("\n")
    tokens[200], tokens[201] = tokens[201], tokens[200]
    (tmp_path / "swapped").mkdir()
    (tmp_path / "swapped" / "vocab.txt").write_text("\n".join(tokens))
    with pytest.raises(UserError, match=rf"is not the vocabulary beside the model, .* \(id 200: "
                       rf"{tokens[200]!r} here, {tokens[201]!r} there\)"):  # fmt: skip
        export(ExportConfig(checkpoint=str(trained_run), output=str(tmp_path / "sw"),
                            vocab=str(tmp_path / "swapped"), do_lower_case=True))  # fmt: skip
    assert not (tmp_path / "sw" / "model.safetensors").exists()
    export(ExportConfig(checkpoint=str(trained_run), output=str(tmp_path / "sw"),
                        vocab=str(trained_run)))  # its own, named: taken  # fmt: skip
    # Its very tokens, but cased: the exported tokenizer would keep capitals the model never saw
    (tmp_path / "same").mkdir()
    shutil.copy(trained_run / "vocab.txt", tmp_path / "same")
    said = (
        f"--vocab: {tmp_path / 'same' / 'vocab.txt'} keeps case and keeps accents, but the "
        f"model's tokenizer lowercases and strips accents ({trained_run / 'tokenizer_config.json'}"
        "), so the exported tokenizer would feed it text unlike what it learned from"
    )
    capsys.readouterr()
    with pytest.raises(UserError, match=re.escape(said)):
        export(ExportConfig(checkpoint=str(trained_run), output=str(tmp_path / "cased"),
                            vocab=str(tmp_path / "same"), do_lower_case=False))  # fmt: skip
    assert not (tmp_path / "cased" / "model.safetensors").exists()
    assert capsys.readouterr().err == ""  # the error alone, not the casing's warning before it
    export(ExportConfig(checkpoint=str(trained_run), output=str(tmp_path / "cased"),
                        vocab=str(tmp_path / "same"), do_lower_case=True))  # fmt: skip

    # A model without a vocabulary beside it (a copied checkpoint): say to give --vocab.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((exported_model / name).read_bytes())
    with pytest.raises(UserError, match=r"no vocab\.txt or tokenizer\.json beside .* --vocab"):
        export(ExportConfig(checkpoint=str(bare), output=str(tmp_path / "x")))
    # A vocabulary of another size.
    small = vocab_head(exported_model, 800, tmp_path / "small")
    export(ExportConfig(checkpoint=str(bare), output=str(tmp_path / "bc"),
                        vocab=str(tmp_path / "same"), do_lower_case=False))  # fmt: skip
    said = (
        f"the vocabulary {tmp_path / 'same' / 'vocab.txt'} is read cased (--cased), but none of its"
    )
    assert said in capsys.readouterr().err  # nothing beside the model to contradict: a warning
    with pytest.raises(UserError, match=r"800 tokens but the model .* vocab_size 1500"):
        export(
            ExportConfig(
                checkpoint=str(bare),
                output=str(tmp_path / "x"),
                vocab=str(small),
                do_lower_case=True,
            )
        )
    with pytest.raises(UserError, match=r"--checkpoint: .* does not exist"):
        export(ExportConfig(checkpoint=str(tmp_path / "nothing"), output=str(tmp_path / "x")))
    # A directory holding no model: say what is read; a training run's checkpoints/ is read.
    (tmp_path / "starting" / "checkpoints").mkdir(parents=True)  # a run before its first save
    not_yet = r"is a training directory with no checkpoint yet \(training saves one every "
    for given in ("starting", "starting/checkpoints"):
        with pytest.raises(UserError, match=rf"{given} {not_yet}"):
            export(ExportConfig(checkpoint=str(tmp_path / given), output=str(tmp_path / "x")))
    with pytest.raises(UserError, match=r"--checkpoint: .*small holds no model .*\(ckpt-\*\.pt\)"):
        export(ExportConfig(checkpoint=str(small.parent), output=str(tmp_path / "x")))
    for given, stage, what in ((kjv_vocab, "vocab", "a vocabulary"),
                               (train_data, "data", "pretraining data")):  # fmt: skip
        with pytest.raises(UserError) as e:  # another stage's output: named, not "holds no model"
            export(ExportConfig(checkpoint=str(given), output=str(tmp_path / "x")))
        assert str(e.value).startswith(
            f"--checkpoint: {given} is a `bertforge {stage}` output ({what}), not a model; give "
            "a bertforge training directory"
        )
    # A file that is no checkpoint: said so (a corpus was "no bert_config.json beside it"), and
    # a Hugging Face model's file is sent to its directory.
    model_file = exported_model / "model.safetensors"
    for given, says in ((small, r"give a bertforge .*\(ckpt-\*\.pt\)"),
                        (model_file, f"give {exported_model}, the directory")):  # fmt: skip
        with pytest.raises(UserError, match=rf"{given} is not a model checkpoint .*; {says}"):
            export(ExportConfig(checkpoint=str(given), output=str(tmp_path / "x")))
    export(ExportConfig(checkpoint=str(trained_run / "checkpoints"), output=str(tmp_path / "c")))
    again = tmp_path / "again"
    export(ExportConfig(checkpoint=str(trained_run), output=str(again)))
    a, b = (tmp_path / "c" / "model.safetensors"), (again / "model.safetensors")
    assert a.read_bytes() == b.read_bytes()
