"""Google TF checkpoints, read without TensorFlow: a checkpoint that TensorFlow writes with
Google's modeling.py and run_pretraining.py heads loads into bertforge's model, which then
gives Google's masked-LM and next-sentence log-probabilities."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from bertforge.checkpoint import read_init_checkpoint
from bertforge.cli import main
from bertforge.errors import UserError
from bertforge.model import BertForPretraining, load_weights
from bertforge.tfcheckpoint import read_checkpoint

pytestmark = pytest.mark.reference

CONFIG = {
    "vocab_size": 1500,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 128,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
}


@pytest.fixture(scope="module")
def google_checkpoint(tmp_path_factory, google, kjv_vocab):
    d = tmp_path_factory.mktemp("google_ckpt")
    rng = np.random.default_rng(0)
    b, s, p = 3, 24, 5
    lengths = np.array([24, 17, 9])
    ids = rng.integers(5, 1500, (b, s))
    mask = (np.arange(s)[None] < lengths[:, None]).astype(int)
    ids = ids * mask
    segments = ((np.arange(s)[None] >= lengths[:, None] // 2) * mask).astype(int)
    positions = np.stack([rng.permutation(np.arange(1, n - 1))[:p] for n in lengths])
    google.run([{"checkpoint": {
        "directory": str(d), "config": CONFIG, "input_ids": ids.tolist(),
        "input_mask": mask.tolist(), "segment_ids": segments.tolist(),
        "positions": positions.tolist(), "output": str(d / "reference.npz"),
    }}], d)  # fmt: skip
    (d / "bert_config.json").write_text(json.dumps(CONFIG))
    (d / "vocab.txt").write_text((kjv_vocab / "vocab.txt").read_text())
    inputs = {"ids": ids, "lengths": lengths, "segments": segments, "positions": positions}
    return d, dict(np.load(d / "reference.npz")), inputs


def test_reader_returns_what_tensorflow_saved(google_checkpoint):
    d, ref, _ = google_checkpoint
    ours = read_checkpoint(d / "bert_model.ckpt")
    saved = {k[4:]: v for k, v in ref.items() if k.startswith("var:")}
    assert set(ours) == set(saved)
    for name, value in saved.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


def test_google_weights_give_googles_outputs(google_checkpoint):
    d, ref, x = google_checkpoint
    init = read_init_checkpoint(str(d / "bert_model.ckpt"))
    assert init.kind == "google" and init.vocab_file == d / "vocab.txt"
    assert_googles_log_probs(init, x, ref)


def test_run_pretrainings_latest_checkpoint_is_read(google_checkpoint):
    """An output directory as run_pretraining.py leaves it (written by TensorFlow's Saver):
    the `checkpoint` state file names model.ckpt-10, the latest; no bert_config.json."""
    d, ref, x = google_checkpoint
    assert (d / "run" / "checkpoint").is_file() and not (d / "run" / "bert_config.json").exists()
    init = read_init_checkpoint(str(d / "run"), bert_config=str(d / "bert_config.json"))
    assert init.path == d / "run" / "model.ckpt-10"
    assert_googles_log_probs(init, x, ref)


def assert_googles_log_probs(init, x, ref) -> None:
    """bertforge's model with `init`'s weights gives Google's log-probabilities `ref`."""
    # Google's TF code computes "gelu" with the tanh formula (transformers' gelu_new).
    model = BertForPretraining(dataclasses.replace(init.config, hidden_act="gelu_new")).eval()
    load_weights(model, init.weights, init.kind)
    with torch.no_grad():
        mlm, nsp = model(torch.tensor(x["ids"]), torch.tensor(x["segments"]),
                         torch.tensor(x["lengths"]), torch.tensor(x["positions"]))  # fmt: skip
    np.testing.assert_allclose(torch.log_softmax(mlm, -1).flatten(0, 1).numpy(),
                               ref["mlm_log_probs"], atol=2e-5, rtol=1e-5)  # fmt: skip
    np.testing.assert_allclose(torch.log_softmax(nsp, -1).numpy(), ref["nsp_log_probs"],
                               atol=2e-5, rtol=1e-5)  # fmt: skip


def test_continue_from_a_google_checkpoint(google_checkpoint, train_data, tmp_path):
    d, _, _ = google_checkpoint
    out = tmp_path / "cont"
    assert main(["train", "--data", str(train_data), "--output", str(out), "--init_checkpoint",
                 str(d / "bert_model.ckpt"), "--train-batch-size", "8", "--num-train-steps", "2",
                 "--learning-rate", "2e-5", "--no-progress"]) == 0  # fmt: skip
    assert json.loads((out / "bert_config.json").read_text())["hidden_size"] == 64


def test_damaged_checkpoint_is_reported(google_checkpoint, tmp_path):
    d, _, _ = google_checkpoint
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in d.glob("bert_model.ckpt*"):
        (bad / f.name).write_bytes(f.read_bytes())
    data = next(bad.glob("*.data-*"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="fails its checksum"):
        read_checkpoint(bad / "bert_model.ckpt")
    index = bad / "bert_model.ckpt.index"  # TensorFlow's own block checksums are checked
    raw = bytearray(index.read_bytes())
    raw[20] ^= 0x01  # inside the first block (its keys)
    index.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"index is damaged \(a block fails its checksum\)"):
        read_checkpoint(bad / "bert_model.ckpt")
    with pytest.raises(UserError, match="not a TensorFlow checkpoint index"):
        (bad / "x.index").write_bytes(b"nonsense" * 10)
        read_checkpoint(bad / "x")


def test_export_a_google_checkpoint_for_transformers(google_checkpoint, tmp_path, capsys):
    """The seed's last step (convert_tf_checkpoint_to_pytorch), without TensorFlow."""
    transformers = pytest.importorskip("transformers")
    d, ref, x = google_checkpoint
    out = tmp_path / "hf"
    argv = ["export", "--checkpoint", str(d / "bert_model.ckpt"), "--output", str(out)]
    assert main(argv) == 2  # a bare vocab.txt: its casing must be said
    assert "--do-lower-case" in capsys.readouterr().err and not out.exists()
    assert main([*argv, "--do_lower_case=True"]) == 0
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.hidden_act == "gelu"  # kept as transformers reads Google's name
    config.hidden_act = "gelu_new"  # the formula Google's TF code computes
    model = transformers.BertForPreTraining.from_pretrained(out, config=config).eval()
    ids = torch.tensor(x["ids"])
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor(x["lengths"])[:, None]).long()
    with torch.no_grad():
        result = model(input_ids=ids, token_type_ids=torch.tensor(x["segments"]),
                       attention_mask=mask)  # fmt: skip
    positions = torch.tensor(x["positions"])
    mlm = torch.gather(result.prediction_logits, 1,
                       positions[..., None].expand(-1, -1, 1500))  # fmt: skip
    np.testing.assert_allclose(torch.log_softmax(mlm, -1).flatten(0, 1).numpy(),
                               ref["mlm_log_probs"], atol=2e-5, rtol=1e-5)  # fmt: skip
    np.testing.assert_allclose(torch.log_softmax(result.seq_relationship_logits, -1).numpy(),
                               ref["nsp_log_probs"], atol=2e-5, rtol=1e-5)  # fmt: skip
    assert json.loads((out / "tokenizer_config.json").read_text())["do_lower_case"] is True


def test_googles_code_restores_a_bertforge_export(google, google_checkpoint, trained_run, tmp_path):
    """`export --format google` writes a TF checkpoint (without TensorFlow) from which Google's
    own model code restores every variable of its pretraining graph, and then gives
    bertforge's log-probabilities."""
    _, _, x = google_checkpoint
    out = tmp_path / "google"
    assert main(["export", "--checkpoint", str(trained_run), "--output", str(out),
                 "--format", "google"]) == 0  # fmt: skip
    config = json.loads((out / "bert_config.json").read_text())
    mask = (np.arange(x["ids"].shape[1])[None] < x["lengths"][:, None]).astype(int)
    google.run([{"restore": {
        "checkpoint": str(out / "bert_model.ckpt"), "config": config,
        "input_ids": x["ids"].tolist(), "input_mask": mask.tolist(),
        "segment_ids": x["segments"].tolist(), "positions": x["positions"].tolist(),
        "output": str(tmp_path / "restored.npz"),
    }}], tmp_path)  # fmt: skip
    assert_googles_log_probs(
        read_init_checkpoint(str(trained_run)), x, np.load(tmp_path / "restored.npz")
    )


def test_a_google_run_is_continued_as_googles_optimizer_continues_it(google, tmp_path):
    """run_pretraining.py trains 3 steps on one batch (Google's loss, clipping, optimizer and
    schedule, in TensorFlow) and saves its checkpoint; bertforge reads the weights, Adam
    moments and step from it (--resume-google's reader) and takes the 4th step on the same
    batch: the weights TensorFlow's 4th step gives."""
    from bertforge.checkpoint import read_google_run
    from bertforge.config import TrainConfig
    from bertforge.model import to_hf
    from bertforge.optim import learning_rate, set_moments
    from bertforge.tfcheckpoint import google_tensors
    from bertforge.train import SUMS, Ledger, make_optimizer, update

    rng = np.random.default_rng(1)
    b, s, p = 4, 20, 4
    lengths = np.array([20, 15, 11, 6])
    mask = (np.arange(s)[None] < lengths[:, None]).astype(int)
    ids = rng.integers(5, 1500, (b, s)) * mask
    segments = ((np.arange(s)[None] >= lengths[:, None] // 2) * mask).astype(int)
    positions = np.stack([rng.permutation(np.arange(1, n - 1))[:p] for n in lengths])
    labels = rng.integers(5, 1500, (b, p))
    next_sentence = [0, 1, 1, 0]
    lr, total, warmup = 1e-2, 10, 2
    run = tmp_path / "run"
    run.mkdir()
    google.run([{"train": {
        "directory": str(run), "config": CONFIG, "input_ids": ids.tolist(),
        "input_mask": mask.tolist(), "segment_ids": segments.tolist(),
        "positions": positions.tolist(), "labels": labels.tolist(),
        "next_sentence": next_sentence, "steps": 3, "learning_rate": lr,
        "num_train_steps": total, "num_warmup_steps": warmup,
        "output": str(tmp_path / "after.npz"),
    }}], tmp_path)  # fmt: skip
    (tmp_path / "bert_config.json").write_text(json.dumps(CONFIG))

    init = read_init_checkpoint(str(run), "--resume-google", str(tmp_path / "bert_config.json"))
    google_run = read_google_run(init.path, init.config)
    assert init.path == run / "model.ckpt-3" and google_run.step == 3
    # Google's TF code computes "gelu" with the tanh formula; its graph here has no dropout.
    c = dataclasses.replace(init.config, hidden_act="gelu_new", hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)  # fmt: skip
    model = BertForPretraining(c)
    load_weights(model, init.weights, "google")
    cfg = TrainConfig(data="-", output="-", google_adam=True, learning_rate=lr,
                      num_train_steps=total, num_warmup_steps=warmup)  # fmt: skip
    optimizer = make_optimizer(cfg, model)
    set_moments(optimizer, model, google_run.moments, google_run.step)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(google_run.step, lr, warmup, total)
    mlm, nsp = model(torch.tensor(ids), torch.tensor(segments), torch.tensor(lengths),
                     torch.tensor(positions))  # fmt: skip
    mlm_loss = torch.nn.functional.cross_entropy(
        mlm.flatten(0, 1), torch.tensor(labels).flatten(), reduction="sum"
    ) / (labels.size + 1e-5)  # run_pretraining's masked-LM loss: weighted sum / (weights + 1e-5)
    nsp_loss = torch.nn.functional.cross_entropy(nsp, torch.tensor(next_sentence))
    (mlm_loss + nsp_loss).backward()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    update(model, optimizer, scaler, torch.zeros(len(SUMS)), 1.0, Ledger(False, 0))

    after = dict(np.load(tmp_path / "after.npz"))
    hf = {k: v.detach().numpy() for k, v in to_hf(dict(model.named_parameters()), c)}
    ours = google_tensors(hf)
    assert set(ours) == set(after)
    before = dict(google_tensors({k: v.numpy() for k, v in to_hf(init.weights, init.config)}))
    for name, want in after.items():
        if not name.endswith("/key/bias"):  # softmax ignores it: its gradient is 0
            assert np.abs(want - before[name]).max() > 1e-4, name  # the step moved the weight
        np.testing.assert_allclose(ours[name], want, rtol=1e-4, atol=2e-6, err_msg=name)
