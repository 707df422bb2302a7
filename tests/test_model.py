"""The model: weights map onto transformers' BertForPreTraining, packed == padded, configs."""

from __future__ import annotations

import json

import pytest
import torch

from bertforge.errors import UserError
from bertforge.model import BertConfig, BertForPretraining, from_hf, load_weights, to_hf

transformers = pytest.importorskip("transformers")


def tiny_config(**kw) -> BertConfig:
    base = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    return BertConfig(**(base | kw))


def batch(c: BertConfig, b: int = 3, s: int = 16, p: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, c.vocab_size, (b, s), generator=g)
    lengths = torch.tensor([s, s - 5, 7][:b])
    ids[torch.arange(s)[None, :] >= lengths[:, None]] = 0
    types = (torch.arange(s)[None, :] >= (lengths[:, None] // 2)).long()
    types[torch.arange(s)[None, :] >= lengths[:, None]] = 0
    positions = torch.stack([torch.randperm(int(n) - 1, generator=g)[:p] + 1 for n in lengths])
    return ids, types, lengths, positions


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
def test_logits_match_transformers(act):
    c = tiny_config(hidden_act=act)
    hf_cfg = transformers.BertConfig(**{k: v for k, v in c.to_dict().items()})
    hf = transformers.BertForPreTraining(hf_cfg).eval()
    ours = BertForPretraining(c).eval()
    load_weights(ours, from_hf(hf.state_dict(), c, "hf"), "hf")
    ids, types, lengths, positions = batch(c)
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    with torch.no_grad():
        out = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
        mlm, nsp = ours(ids, types, lengths, positions)
    want = torch.gather(out.prediction_logits, 1,
                        positions[..., None].expand(-1, -1, c.vocab_size))  # fmt: skip
    torch.testing.assert_close(mlm, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nsp, out.seq_relationship_logits, atol=1e-5, rtol=1e-5)


def test_round_trip_through_transformers_names():
    c = tiny_config()
    ours = BertForPretraining(c)
    hf_state = dict(to_hf(ours.state_dict(), c))
    hf = transformers.BertForPreTraining(transformers.BertConfig(**c.to_dict()))
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    back = from_hf(hf.state_dict(), c, "hf")
    for name, t in ours.state_dict().items():
        torch.testing.assert_close(back[name], t, rtol=0, atol=0)
    assert ours.word_embeddings.weight.shape[0] == 128  # padded to a multiple of 64
    assert hf_state["bert.embeddings.word_embeddings.weight"].shape[0] == 99


def test_packed_equals_padded():
    c = tiny_config()
    model = BertForPretraining(c).eval()
    ids, types, lengths, positions = batch(c)
    with torch.no_grad():
        a = model(ids, types, lengths, positions)
        b = model(ids, types, lengths, positions, packed=True)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_half_residual_stream_under_autocast():
    """Under autocast the norms keep bf16 (the residual stream is half, not fp32), the result
    stays close to fp32, and the gradients reach the fp32 weights in fp32."""
    c = tiny_config()
    model = BertForPretraining(c)
    ids, types, lengths, positions = batch(c)
    seen = []
    model.layers[0].attn_norm.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.no_grad():
        ref = model.eval()(ids, types, lengths, positions)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mlm, nsp = model(ids, types, lengths, positions)
    assert seen == [torch.float32, torch.bfloat16]
    torch.testing.assert_close(mlm.float(), ref[0], atol=0.05, rtol=0.05)
    torch.testing.assert_close(nsp.float(), ref[1], atol=0.05, rtol=0.05)
    mlm.float().sum().backward()
    grad = model.layers[0].attn_norm.weight.grad
    assert grad is not None and grad.dtype == torch.float32 and bool(grad.abs().sum() > 0)


def test_bert_config_json_and_errors(tmp_path):
    p = tmp_path / "bert_config.json"
    p.write_text(json.dumps({"vocab_size": 50, "hidden_size": 64, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "intermediate_size": 128,
                             "hidden_act": "gelu", "directionality": "bidi"}))  # fmt: skip
    c = BertConfig.from_json(p)
    assert (c.vocab_size, c.hidden_size, c.padded_vocab_size) == (50, 64, 64)
    assert BertConfig.preset("mini", 100).num_attention_heads == 4
    with pytest.raises(UserError, match="--model-size"):
        BertConfig.preset("huge", 100)
    with pytest.raises(UserError, match="hidden_act"):
        tiny_config(hidden_act="swish")
    with pytest.raises(UserError, match="rows but the vocabulary"):
        from_hf(dict(to_hf(BertForPretraining(c).state_dict(), c)), tiny_config(), "ckpt")
