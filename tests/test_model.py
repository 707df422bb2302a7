"""The model: weights map onto transformers' BertForPreTraining, packed == padded, configs."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import min_cut_rematerialization_partition

from bertforge.batches import IGNORE, Rows, filler_lengths
from bertforge.errors import UserError
from bertforge.model import (
    BertConfig,
    BertForPretraining,
    Packed,
    attend,
    flash_varlen,
    flash_varlen_available,
    from_hf,
    load_weights,
    to_hf,
)
from bertforge.train import Objective, compile_step, model_batch, objective_args

transformers = pytest.importorskip("transformers")


def tiny_config(**kw) -> BertConfig:
    base = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    return BertConfig(**(base | kw))


def batch(c: BertConfig, b: int = 3, s: int = 16, p: int = 4, seed: int = 0, cut: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, c.vocab_size, (b, s), generator=g)
    lengths = torch.tensor([s, s - 5 - cut, 7][:b])
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


def test_checkpoints_as_published_read_as_transformers_reads_them(tmp_path):
    """Pre-2020 uploads (bert-base-*, multilingual BERT) name LayerNorm's weights gamma and
    beta; the masked-LM bias may be stored under its tied name only; a bare BertModel has no
    `bert.` prefix and no heads. Read to the weights transformers reads."""
    from safetensors.torch import save_file

    from bertforge.checkpoint import read_init_checkpoint

    c = tiny_config()
    ours = BertForPretraining(c)
    with torch.no_grad():  # LayerNorms and the MLM bias away from their (1, 0) init
        for name, p in ours.named_parameters():
            if "norm" in name or name == "mlm_bias":
                p[: c.vocab_size].normal_()
    legacy = {}
    for k, v in to_hf(ours.state_dict(), c):
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma")
        legacy[k.replace("LayerNorm.bias", "LayerNorm.beta")] = v.clone()
    assert sum("gamma" in k for k in legacy) == 2 * c.num_hidden_layers + 2
    del legacy["cls.predictions.bias"]  # cls.predictions.decoder.bias holds it
    d = tmp_path / "mbert"
    d.mkdir()
    # As the Hub's files are: transformers 4.47 refuses one without a format key
    save_file(legacy, d / "model.safetensors", metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({**c.to_dict(), "model_type": "bert"}))
    init = read_init_checkpoint(str(d))
    hf = transformers.BertForPreTraining.from_pretrained(d)
    for name, want in ours.state_dict().items():
        torch.testing.assert_close(init.weights[name], want, rtol=0, atol=0)
    assert set(from_hf(hf.state_dict(), c, "hf")) == set(init.weights)
    for name, got in from_hf(hf.state_dict(), c, "hf").items():
        if name == "mlm_bias" and int(transformers.__version__.split(".")[0]) < 5:
            continue  # transformers 4 loses a bias stored under its tied name only (4.47 zeros it)
        torch.testing.assert_close(got, init.weights[name], rtol=0, atol=0)

    (d / "model.safetensors").unlink()  # a bare encoder, pickled
    torch.save({k.removeprefix("bert."): v for k, v in legacy.items() if "cls." not in k},
               d / "pytorch_model.bin")  # fmt: skip
    init = read_init_checkpoint(str(d))
    heads = {k for k in ours.state_dict() if k.startswith(("mlm_", "nsp."))}
    assert set(init.weights) == set(ours.state_dict()) - heads
    for name, got in init.weights.items():
        torch.testing.assert_close(got, ours.state_dict()[name], rtol=0, atol=0)


def test_a_model_built_for_its_weights_holds_them_and_inits_the_rest_only():
    """`model_with_weights` (embed's and fill-mask's loading) skips the random init the weights
    overwrite: with every weight given, the model equals one built and loaded the plain way;
    with a bare encoder's (no heads), the encoder is the weights' and each head is as a new
    model's: LayerNorm ones and zeros, biases zero, weights drawn within Google's two
    standard deviations, never the uninitialized memory the meta device leaves."""
    from bertforge.model import load_weights, model_with_weights

    c = tiny_config()
    source = BertForPretraining(c)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    weights = {k: v.clone() for k, v in source.state_dict().items()}
    plain = BertForPretraining(c)
    load_weights(plain, weights, "w")
    built = model_with_weights(c, weights, "w")
    for name, want in plain.state_dict().items():
        torch.testing.assert_close(built.state_dict()[name], want, rtol=0, atol=0)
    encoder = {k: v for k, v in weights.items() if not k.startswith(("mlm_", "nsp."))}
    torch.manual_seed(0)
    bare = model_with_weights(c, encoder, "w").state_dict()
    for name, want in encoder.items():
        torch.testing.assert_close(bare[name], want, rtol=0, atol=0)
    heads = sorted(set(weights) - set(encoder))
    assert heads == ["mlm_bias", "mlm_norm.bias", "mlm_norm.weight", "mlm_transform.bias",
                     "mlm_transform.weight", "nsp.bias", "nsp.weight"]  # fmt: skip
    for name in heads:
        t = bare[name]
        if name == "mlm_norm.weight":
            assert (t == 1).all()
        elif name.endswith("bias"):
            assert (t == 0).all(), name
        else:
            bound = 2 * c.initializer_range
            assert t.abs().max() <= bound and t.std() > bound / 4, name


def test_sharded_and_damaged_hugging_face_checkpoints(tmp_path):
    from bertforge.checkpoint import read_init_checkpoint

    c = tiny_config()
    hf = transformers.BertForPreTraining(transformers.BertConfig(**c.to_dict()))
    want = from_hf(hf.state_dict(), c, "hf")
    pickled = tmp_path / "sharded-bin"  # as transformers 4 wrote them
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({**c.to_dict(), "model_type": "bert"}))
    names, weight_map = sorted(hf.state_dict()), {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        f = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: hf.state_dict()[k].clone() for k in part}, pickled / f)
        weight_map |= dict.fromkeys(part, f)
    (pickled / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    safe = tmp_path / "sharded-safetensors"
    hf.save_pretrained(safe, max_shard_size="40KB")
    assert (safe / "model.safetensors.index.json").is_file()
    for d in (safe, pickled):
        assert len(list(d.glob("*-of-*"))) >= 2
        init = read_init_checkpoint(str(d))
        assert set(init.weights) == set(want)
        for k, v in want.items():
            torch.testing.assert_close(init.weights[k], v, rtol=0, atol=0)
    shard = sorted(d.glob("*-of-*"))[-1]
    shard.unlink()
    with pytest.raises(UserError, match=f"names {shard.name}, which is not in {d}"):
        read_init_checkpoint(str(d))
    whole = tmp_path / "whole"
    hf.save_pretrained(whole)
    data = (whole / "model.safetensors").read_bytes()
    (whole / "model.safetensors").write_bytes(data[: len(data) // 2])  # a download cut short
    with pytest.raises(UserError, match=r"model.safetensors: cannot read its weights .*again"):
        read_init_checkpoint(str(whole))


@pytest.mark.parametrize(
    "extra, says",
    [
        ({"model_type": "roberta"}, "a 'roberta' model; bertforge trains and reads BERT"),
        ({"position_embedding_type": "relative_key"}, "absolute positions only"),
    ],
)
def test_a_config_of_another_model_is_refused_naming_it(tmp_path, extra, says):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({**tiny_config().to_dict(), **extra}))
    with pytest.raises(UserError, match=f"{p}: .*{says}"):
        BertConfig.from_json(p)
    p.write_text("[1, 2]")
    with pytest.raises(UserError, match="a JSON object is expected"):
        BertConfig.from_json(p)
    # a model's directory given for its config: the file in it named ("Is a directory" before)
    with pytest.raises(UserError, match=rf"^{tmp_path}: a directory, not a bert_config.json; "
                       rf"give the file, {p}\.$"):  # fmt: skip
        BertConfig.from_json(tmp_path)


def rows_of(ids, types, lengths, positions, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(1, 99, positions.shape, generator=g)
    labels[:, -1] = IGNORE  # an unused slot
    nsp = torch.randint(0, 2, (len(lengths),), generator=g)
    return Rows(ids.numpy(), lengths.numpy(), None, types.numpy(), nsp.numpy(),
                positions.numpy(), labels.numpy())  # fmt: skip


def sums_and_grads(model, rows, packed, trim=True, forward=None, bucket=0):
    """The trainer's forward (loss sums; `forward` a compiled Objective) and the gradients of
    their total."""
    model.zero_grad()
    b, lengths, layout = model_batch(rows, torch.device("cpu"), packed, trim, bucket)
    forward = Objective(model) if forward is None else forward
    mlm, nsp, correct = forward(*objective_args(b, lengths, layout))
    (mlm + nsp).backward()
    return [mlm, nsp, correct], {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_equals_padded():
    """The loader's packed batch (no padding anywhere) gives the padded batch's logits, losses
    and gradients; the padded batch is tried trimmed and at full width."""
    c = tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForPretraining(c)
    ids, types, lengths, positions = batch(c)
    rows = rows_of(ids, types, lengths, positions)
    b, _, layout = model_batch(rows, torch.device("cpu"), True)
    assert b["input_ids"].shape == (int(lengths.sum()),)
    assert b["cu_seqlens"].tolist() == [0, 16, 27, 34]
    assert b["position_ids"][16:27].tolist() == list(range(11))
    with torch.no_grad():
        a = model(ids, types, lengths, positions)
        p = model(b["input_ids"], b["token_type_ids"], None, b["positions"], layout)
    for x, y in zip(a, p, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    want, want_grads = sums_and_grads(model, rows, packed=False, trim=False)
    for trim, packed in ((True, False), (True, True)):
        got, grads = sums_and_grads(model, rows, packed, trim)
        for x, y in zip(want, got, strict=True):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-5)
        for name, g in want_grads.items():
            torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_filler_rounds_a_packed_batch_up_and_changes_nothing():
    """A packed batch rounded up to a bucket by filler sequences (so that CUDA graphs see a
    few token counts only) gives the plain packed batch's losses and gradients."""
    c = tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForPretraining(c)
    rows = rows_of(*batch(c))  # 16 + 11 + 7 = 34 tokens of width 16
    b, _, layout = model_batch(rows, torch.device("cpu"), True, bucket=32)
    assert b["input_ids"].shape == (64,) and (b["input_ids"][34:] == 0).all()
    assert b["cu_seqlens"].tolist() == [0, 16, 27, 34, 44, 54, 64]  # 3 filler sequences
    assert b["position_ids"][34:44].tolist() == list(range(10))
    assert layout.max_len == 16 and layout.starts(3).tolist() == [0, 16, 27]
    want, want_grads = sums_and_grads(model, rows, packed=True)
    got, grads = sums_and_grads(model, rows, packed=True, bucket=32)
    for x, y in zip(want, got, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-5, msg=name)
    for tokens in range(1, 700):  # always 5 sequences of 1 to 16 tokens: one cu_seqlens shape
        f = filler_lengths(tokens, 64, 16)
        assert len(f) == 5 and (tokens + f.sum()) % 64 == 0 and 1 <= f.min() <= f.max() <= 16


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", devices())
def test_packed_attention_dropout_is_the_same_in_backward(device):
    """Packed attention with dropout (flash varlen on CUDA, the padded fallback elsewhere):
    with one token per sequence, each head's output is its value scaled by 1/(1-p) or zero,
    and the value's gradient must be zero exactly where the forward dropped it."""
    torch.manual_seed(0)
    t, heads, dim, p = 64, 4, 64, 0.5
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = (torch.randn(t, heads, dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))  # fmt: skip
    cu = torch.arange(t + 1, device=device, dtype=torch.int32)
    flash = flash_varlen_available(torch.device(device))
    layout = Packed(cu, torch.zeros(t, dtype=torch.long, device=device), 8, flash)
    out = attend(q, k, v, layout, p)
    kept = out.detach().abs().amax(-1) > 0
    assert 0.3 < kept.float().mean().item() < 0.7
    torch.testing.assert_close(out.detach()[kept], v.detach()[kept] / (1 - p))
    out.backward(torch.ones_like(out))
    assert torch.equal(v.grad.abs().amax(-1) > 0, kept)
    assert float(q.grad.abs().max()) == 0.0


def test_flash_varlen_call_and_backward_on_meta_tensors():
    """The CUDA kernel call (aten's flash attention with cu_seqlens and dropout) is checked
    for its signature and autograd on meta tensors; its numbers run in tests/test_cuda.py."""
    q, k, v = (torch.empty(20, 2, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))  # fmt: skip
    cu = torch.tensor([0, 7, 20], dtype=torch.int32, device="meta")
    out = flash_varlen(
        q, k, v, Packed(cu, torch.empty(20, dtype=torch.long, device="meta"), 16), 0.1
    )
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape and v.grad.dtype == torch.bfloat16


def test_packed_batches_compile_into_one_graph():
    """Packed batches differ in token count step to step; torch.compile must trace one
    dynamic graph without breaks, not one graph per count."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    c = tiny_config()
    model = BertForPretraining(c)
    counter = CompileCounterWithBackend("aot_eager")
    forward = torch.compile(Objective(model), backend=counter)
    for seed, cut in ((0, 0), (1, 3), (2, -2)):
        ids, types, lengths, positions = batch(c, seed=seed, cut=cut)
        rows = rows_of(ids, types, lengths, positions, seed)
        b, lengths_arg, layout = model_batch(rows, torch.device("cpu"), True, trim=False)
        forward(*objective_args(b, lengths_arg, layout))
    assert counter.frame_count == 1, counter.frame_count


# The second width recompiles the layer region for its new shapes, which torch notes.
@pytest.mark.filterwarnings("ignore:invoke_subgraph traced multiple backward graphs")
def test_a_compiled_step_forgets_the_shapes_of_earlier_runs():
    """After a packed run's step was compiled in this process, a padded run's step must get
    the static graph a process of its own compiles, not one with dynamic batch and sequence
    sizes (dynamo's automatic dynamic, from having seen other shapes)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    c = tiny_config()
    cpu = torch.device("cpu")
    packed = compile_step(Objective(BertForPretraining(c)), backend="aot_eager")
    packed(*objective_args(*model_batch(rows_of(*batch(c)), cpu, True, False)))
    counter = CompileCounterWithBackend("aot_eager")
    padded = compile_step(Objective(BertForPretraining(c)), backend=counter)
    for width in (16, 24):  # a static graph takes one width: the second compiles again
        padded(*objective_args(*model_batch(rows_of(*batch(c, s=width)), cpu, False, False)))
    assert counter.frame_count == 2


@pytest.mark.parametrize("packed", [False, True])
def test_layers_compile_as_one_nested_region(packed):
    """Under torch.compile the layers are one nested compile region: the step's graph calls
    one subgraph once per layer but the last, which computes the heads' rows only
    (`prune_last_layer`), and the losses and gradients are eager's (no dropout) and the whole
    graph's (with dropout, same seed). compile_regions False traces every layer into the
    graph."""
    c = tiny_config(num_hidden_layers=3)
    ids, types, lengths, positions = batch(c)
    rows = rows_of(ids, types, lengths, positions)
    torch.manual_seed(0)
    init = BertForPretraining(c).state_dict()
    aot_eager = torch._dynamo.lookup_backend("aot_eager")
    results = {}
    for regions, train in ((True, False), (True, True), (False, True)):
        torch._dynamo.reset()
        model = BertForPretraining(c).train(train)
        model.load_state_dict(init)
        model.compile_regions = regions
        graphs = []

        def backend(gm, inputs, graphs=graphs):
            graphs.append(gm)
            return aot_eager(gm, inputs)

        torch.manual_seed(1)
        forward = torch.compile(Objective(model), backend=backend)
        results[regions, train] = sums_and_grads(model, rows, packed, forward=forward)
        subgraphs = [n for n, _ in graphs[0].named_children() if n.startswith("subgraph")]
        calls = graphs[0].code.count("invoke_subgraph(")
        assert len(graphs) == 1
        # the pruned last layer (prune_last_layer) is traced into the step's graph
        assert (len(subgraphs), calls) == ((1, 2) if regions else (0, 0))
    model.eval()
    eager = sums_and_grads(model, rows, packed)
    for (sums, grads), (want_sums, want_grads) in (
        (results[True, False], eager),
        (results[True, True], results[False, True]),
    ):
        torch.testing.assert_close(sums, want_sums, atol=1e-5, rtol=1e-5)
        for name, g in want_grads.items():
            torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
    assert not torch.allclose(results[True, True][0][0], eager[0][0])  # dropout was on


@pytest.mark.parametrize("layout", ["padded", "padded-full-width", "packed", "packed-filler"])
def test_the_pruned_last_layer_gives_the_whole_layers_losses_and_gradients(layout):
    """prune_last_layer (the default): the last layer computes only the rows the heads read,
    each sequence's first token and masked positions (an unused slot's position 0 reads the
    first token twice), each query against all of its sequence's keys. Its rows are the whole
    layer's at those rows, and the losses and every gradient are the whole layer's, eager and
    compiled."""
    c = tiny_config(num_hidden_layers=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids, types, lengths, positions = batch(c)
    positions[1, -1] = 0  # as the data marks an unused slot
    rows = rows_of(ids, types, lengths, positions)
    packed, trim = layout.startswith("packed"), layout != "padded-full-width"
    bucket = 32 if layout == "packed-filler" else 0
    torch.manual_seed(0)
    model = BertForPretraining(c)
    assert model.prune_last_layer
    seen = []
    results = {}
    for prune in (False, True):
        model.prune_last_layer = prune
        # on the eager steps only: torch 2.8-2.9 cannot compile a hook's side effect in the
        # layers' nested region
        hook = model.layers[-1].ffn_in.register_forward_hook(
            lambda m, i, o: seen.append(i[0].shape)
        )
        results[prune, "eager"] = sums_and_grads(model, rows, packed, trim, bucket=bucket)
        hook.remove()
        torch._dynamo.reset()
        forward = torch.compile(Objective(model), backend="aot_eager")
        results[prune, "compiled"] = sums_and_grads(model, rows, packed, trim, forward, bucket)
    # the eager steps' feed-forward input in the last layer: every token's row, or 1 + 4 rows
    # of each of the 3 sequences
    tokens = int(lengths.sum()) + (30 if bucket else 0) if packed else ids.numel() // 3
    assert seen[0][:-1] == ((tokens,) if packed else (3, tokens))
    assert (3, 5) in [shape[:-1] for shape in seen[1:]]
    for way in ("eager", "compiled"):
        (want, want_grads), (got, grads) = results[False, way], results[True, way]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for name, g in want_grads.items():
            torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=(way, name))

    b, _, layout_arg = model_batch(rows, torch.device("cpu"), packed, trim, bucket)
    if packed:
        starts, mask = layout_arg.starts(3), layout_arg
    else:
        s = b["input_ids"].shape[1]
        starts = torch.arange(3) * s
        mask = (torch.arange(s)[None, :] < lengths[:, None]).view(3, 1, 1, s)
    read = starts[:, None] + F.pad(b["positions"], (1, 0))
    x = torch.randn(*b["input_ids"].shape, c.hidden_size)
    layer = model.layers[-1]
    with torch.no_grad():
        whole = layer(x, mask).reshape(-1, c.hidden_size)[read]
        torch.testing.assert_close(layer(x, mask, read), whole, atol=1e-5, rtol=1e-5)


def test_a_model_without_layers_has_no_last_layer_to_prune():
    c = tiny_config(num_hidden_layers=0)
    model = BertForPretraining(c).eval()
    ids, types, lengths, positions = batch(c)
    with torch.no_grad():
        pruned = model(ids, types, lengths, positions)
        model.prune_last_layer = False
        for x, y in zip(pruned, model(ids, types, lengths, positions), strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_layer_options_are_set_on_every_layer_and_unknown_ones_refused():
    model = BertForPretraining(BertConfig.preset("tiny", 64))
    model.set_layer_options(split_qkv=True, fused_attention=True)
    assert all(layer.split_qkv and layer.fused_attention for layer in model.layers)
    assert not any(layer.fused_norm or layer.fused_gelu for layer in model.layers)
    with pytest.raises(TypeError, match="fused_softmax is not a layer option"):
        model.set_layer_options(fused_softmax=True)


def traced(fw_compiler: Any, bw_compiler: Any) -> Any:
    """A torch.compile backend that hands the forward and backward graphs to these compilers,
    split as inductor (the trainer's) splits them (min-cut: the default partition, torch 2.8-2.9
    once a size is dynamic, saves a size among the backward's tensors and fails)."""
    return aot_autograd(fw_compiler=fw_compiler, bw_compiler=bw_compiler,
                        partition_fn=min_cut_rematerialization_partition)  # fmt: skip


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_split_qkv_gives_the_same_losses_and_gradients(packed):
    """q, k and v as three matmuls on the qkv weight's blocks (--split-qkv): the losses and
    every gradient of the one matmul, eager and compiled (the layers one nested region),
    with dropout on (same seed); compiled, the q/k/v gradients are not concatenated."""
    c = tiny_config(num_hidden_layers=2)
    rows = rows_of(*batch(c))
    torch.manual_seed(0)
    model = BertForPretraining(c)
    results = {}
    for split in (False, True):
        model.set_layer_options(split_qkv=split)
        torch.manual_seed(1)
        results[split, "eager"] = sums_and_grads(model, rows, packed)
        torch._dynamo.reset()
        backward = []

        def keep(gm, inputs, backward=backward):
            backward.append(gm)
            return make_boxed_func(gm.forward)

        torch.manual_seed(1)
        aot = traced(lambda gm, _: make_boxed_func(gm.forward), keep)
        forward = torch.compile(Objective(model), backend=aot)
        results[split, "compiled"] = sums_and_grads(model, rows, packed, forward=forward)
        (gm,) = backward
        joins = [  # concatenations in the backward as large as the q/k/v activations
            n for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
            for n in m.graph.nodes
            if n.target in (torch.ops.aten.cat.default, torch.ops.aten.stack.default)
            and n.meta["val"].numel() >= int(rows.lengths.sum()) * 3 * c.hidden_size
        ]  # fmt: skip
        assert len(joins) == (0 if split else 1), (split, joins)
    for way in ("eager", "compiled"):
        (want, want_grads), (got, grads) = results[False, way], results[True, way]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for name, g in want_grads.items():
            torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=(way, name))


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


def test_training_flops_per_token_counts_the_steps_matmuls():
    """MFU's FLOPs per token (training_flops_per_token) against torch's FLOP counter over a
    real forward and backward of the whole model (--no-prune-last-layer): what it leaves out
    or counts as parameters that do no matmul (biases, LayerNorm, pooler, NSP) is all it
    differs by, under 1% here, and each term is needed (without the attention term or the
    masked-LM head it would miss by 10% or more). With the last layer pruned (the default)
    the step does less by pruned_flops_per_token, within the same 1%."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    c = tiny_config(vocab_size=4096, hidden_size=128, intermediate_size=512,
                    max_position_embeddings=128)  # fmt: skip
    b, s, p = 2, 128, 20
    model = BertForPretraining(c)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, c.vocab_size, (b, s), generator=g)
    positions = torch.stack([torch.randperm(s, generator=g)[:p] for _ in range(b)])
    labels = torch.randint(0, c.vocab_size, (b, p), generator=g)
    counted = {}
    for prune in (False, True):
        model.prune_last_layer = prune
        # The math backend runs attention as matmuls the counter sees on any device.
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            mlm, nsp = model(ids, torch.zeros_like(ids), None, positions)
            loss = F.cross_entropy(mlm.flatten(0, 1), labels.flatten()) + nsp.sum()
            loss.backward()
        counted[prune] = counter.get_total_flops()
    estimate = c.training_flops_per_token(s, p / s) * b * s
    assert 0 < (estimate - counted[False]) / counted[False] < 0.01, (estimate, counted)
    h, layers = c.hidden_size, c.num_hidden_layers
    for term in (12 * layers * h * s * b * s, 6 * (h * h + h * c.vocab_size) * b * p):
        assert (counted[False] - (estimate - term)) / counted[False] > 0.1
    skipped = c.pruned_flops_per_token(s, (1 + p) / s) * b * s
    assert skipped > 0.1 * counted[False]  # 2 layers: a third of the step
    assert 0 < (estimate - skipped - counted[True]) / counted[True] < 0.01, (skipped, counted)


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
    # a hand-edited config: one error naming the file, the key and what it must be
    good = json.loads(p.read_text())
    for edit, says in [
        ({"vocab_size": None}, "it has no vocab_size"),
        ({"hidden_size": "big"}, "hidden_size must be a positive integer, got 'big'"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer, got 0"),
        ({"num_attention_heads": True}, "num_attention_heads must be a positive integer, got True"),
        ({"hidden_dropout_prob": 1.5}, "hidden_dropout_prob must be a number, 0 or more and below "
                                       "1, got 1.5"),
        ({"layer_norm_eps": -1}, "layer_norm_eps must be a number, 0 or more, got -1"),
        ({"hidden_act": 3}, "hidden_act must be a string, got 3"),
    ]:  # fmt: skip
        config = {k: v for k, v in {**good, **edit}.items() if v is not None}
        p.write_text(json.dumps(config))
        with pytest.raises(UserError) as e:
            BertConfig.from_json(p)
        assert str(e.value) == f"{p}: not a BERT config: {says}."
    p.write_text(json.dumps({**good, "num_attention_heads": 3}))  # __post_init__'s, with the file
    with pytest.raises(UserError, match=rf"^{p}: hidden_size 64 is not a multiple of num_att"):
        BertConfig.from_json(p)
    p.write_text(json.dumps({**good, "hidden_size": 64.0}))  # a whole number written as a float
    assert (
        BertConfig.from_json(p).hidden_size == 64
        and type(BertConfig.from_json(p).hidden_size) is int
    )


ALLOCATIONS = ("full.default", "zeros.default", "new_zeros.default", "empty.memory_format")


def test_packed_padding_allocates_no_size_computed_in_the_graph():
    """With a dynamic batch size (filler after the instances, micro-batches of different
    sizes), the packed step's forward graphs, the layers' nested region among them, allocate
    no tensor of a size computed in the graph: torch 2.11's inductor (the GPU machine's) fails
    to lower one once the region sees that size too ("cannot sympify ShapeAsConstantBuffer"),
    which `Packed.zeros` and the CPU attention's mask avoid by taking shapes from tensors."""
    c = tiny_config()
    model = BertForPretraining(c)
    targets, computed, graphs = set(), [], []

    def forward_graph(gm, inputs):
        graphs.append(gm)
        for module in gm.modules():
            for node in module.graph.nodes:
                targets.add(str(node.target))
                if node.op == "call_function" and str(node.target).endswith(ALLOCATIONS):
                    shape = node.args[1] if "new_" in str(node.target) else node.args[0]
                    if not all(isinstance(d, int) for d in shape):
                        computed.append((str(node.target), shape))
        return run(gm, inputs)

    def run(gm, inputs):
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    backend = traced(forward_graph, run)
    forward = torch.compile(Objective(model), backend=backend)
    for b in (3, 2):  # the second batch size compiles a graph with a dynamic one
        ids, types, lengths, positions = batch(c, b=b)
        sums_and_grads(model, rows_of(ids, types, lengths, positions), True, False, forward, 32)
    assert len(graphs) == 2
    assert not computed, computed
    assert {"aten.zeros_like.default", "aten.index_put.default"} <= targets  # padding traced
