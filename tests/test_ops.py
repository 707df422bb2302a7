"""bertforge's own ops: dropout from 15 random bits (eager on a CPU and under torch.compile),
attention with it, the chunked masked-LM loss."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from bertforge import ops
from bertforge.batches import IGNORE

KEPT_SCALE = 32768 / (32768 - 3277)  # p = 0.1 rounds to 3277 / 32768


def dropout_of(compiled: bool):
    """ops.dropout as the eager model calls it, or traced whole by torch.compile with the
    15-bit draws (inductor, one graph: the draw must not break it; on CUDA the model asks for
    them with Dropout.bits)."""
    if not compiled:
        return ops.dropout
    return torch.compile(functools.partial(ops.dropout, bits=True), fullgraph=True)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# eager on a CPU, and under torch.compile on a CPU and on CUDA (where eager is F.dropout)
WHERE = pytest.mark.parametrize(
    "device, compiled",
    [("cpu", False), ("cpu", True), pytest.param("cuda", True, marks=[CUDA, pytest.mark.gpu])],
    ids=["eager", "compiled", "cuda-compiled"],
)


@WHERE
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_drops_p_and_scales_what_it_keeps(dtype, device, compiled):
    torch.manual_seed(0)
    n = 1_000_000
    drop = dropout_of(compiled)
    out = drop(torch.ones(n, dtype=dtype, device=device), 0.1, True)
    dropped = (out == 0).double().mean().item()
    assert abs(dropped - 3277 / 32768) < 5 * math.sqrt(0.09 / n)  # five standard deviations
    kept = out[out != 0]
    assert torch.equal(kept, torch.full_like(kept, KEPT_SCALE))
    # the four 16-bit values of one random word decide independently: no pattern with period 4
    shares = (out.view(-1, 4) == 0).double().mean(0)
    assert (shares - 0.1).abs().max().item() < 5 * math.sqrt(0.09 / (n / 4))
    for p in (0.5,) if compiled else (0.5, 0.9):
        dropped = (drop(torch.ones(n, device=device), p, True) == 0).double().mean().item()
        assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)


@WHERE
def test_dropout_backward_uses_the_forward_mask(device, compiled):
    torch.manual_seed(1)
    x = torch.ones(5001, device=device, requires_grad=True)  # a partial last word
    out = dropout_of(compiled)(x, 0.25, True)
    g = torch.randn(5001, device=device)
    out.backward(g)
    assert torch.equal(x.grad == 0, out == 0)
    torch.testing.assert_close(x.grad, torch.where(out != 0, g * 32768 / (32768 - 8192), 0))


@pytest.mark.skipif(
    not hasattr(torch.compiler, "nested_compile_region"), reason="torch without compile regions"
)
def test_compiled_layers_draw_masks_of_their_own():
    """The model compiles one layer as a nested region and runs it for every layer: each run
    (and each step) must draw its own mask, and the backward must take each run's."""
    region = torch.compiler.nested_compile_region(lambda x: ops.dropout(x * 2, 0.5, True))
    run = torch.compile(lambda x: (region(x), region(x)), fullgraph=True)
    x = torch.ones(4096, requires_grad=True)
    torch.manual_seed(0)
    a, b = run(x)
    again, _ = run(x)
    assert not torch.equal(a == 0, b == 0)
    assert not torch.equal(a == 0, again == 0)
    for out in (a, b):
        assert abs((out == 0).double().mean().item() - 0.5) < 5 * math.sqrt(0.25 / 4096)
    (a.sum() + 2 * b.sum()).backward()
    assert torch.equal(x.grad, torch.where(a != 0, 4.0, 0) + torch.where(b != 0, 8.0, 0))


def test_compiled_dropout_draws_one_64_bit_word_per_four_elements():
    """What inductor is handed: one randint over a quarter of the elements, no random number
    per element (F.dropout's); `bits=False` keeps F.dropout."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert ops.compiled_draws(cpu, None) and not ops.compiled_draws(cuda, None)
    assert ops.compiled_draws(cuda, True) and not ops.compiled_draws(cpu, False)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def draws(bits: bool | None) -> list[str]:
        graphs.clear()
        torch._dynamo.reset()
        run = torch.compile(ops.dropout, backend=record, fullgraph=True)
        run(torch.ones(10, 100), 0.1, True, bits)
        (gm,) = graphs
        calls = [n for n in gm.graph.nodes if n.op == "call_function"]
        return [
            f"{n.target.__name__}{list(n.args[2]) if n.target is torch.randint else ''}"
            for n in calls
            if "rand" in n.target.__name__ or "dropout" in n.target.__name__
        ]

    assert draws(None) == draws(True) == ["randint[250]"]  # on a CPU by default
    assert draws(False) == ["dropout"]


def test_dropout_follows_torch_seed_and_falls_back_where_it_does_not_apply():
    x = torch.randn(7, 33)
    torch.manual_seed(5)
    a = ops.dropout(x, 0.1, True)
    b = ops.dropout(x, 0.1, True)
    torch.manual_seed(5)
    assert torch.equal(ops.dropout(x, 0.1, True), a)  # odd element count: a partial word
    assert not torch.equal(a, b)
    assert torch.equal(ops.dropout(x, 0.1, False), x)
    assert torch.equal(ops.dropout(x, 0.0, True), x)
    assert torch.equal(ops.dropout(x, 1.0, True), torch.zeros_like(x))
    # p below half a 15-bit step has no 15-bit form: torch's dropout draws it
    torch.manual_seed(2)
    tiny = ops.dropout(x, 1e-6, True)
    torch.manual_seed(2)
    assert torch.equal(tiny, F.dropout(x, 1e-6, True))


def scores_masked(q, k, mask):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~mask, float("-inf"))


@pytest.mark.parametrize("rows", [9, 4], ids=["every-query", "fewer-queries"])
def test_attention_is_sdpa_and_drops_the_probabilities(rows):
    """ops.attention against SDPA, with and without a key mask, eager and compiled, and with
    dropout the probabilities dropped as keep_mask draws them; for every query of the 9 keys,
    and for 4 queries (the pruned last layer's rows, `Layer.rows_qkv`)."""
    g = torch.Generator().manual_seed(0)
    b, nh, s, hs = 3, 2, 9, 8
    q = torch.randn(b, nh, rows, hs, generator=g)
    k, v = (torch.randn(b, nh, s, hs, generator=g) for _ in range(2))
    mask = (torch.arange(s)[None, :] < torch.tensor([9, 4, 1])[:, None]).view(b, 1, 1, s)
    without = ops.attention(q, k, v, mask, 0.0)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(without, sdpa, atol=1e-6, rtol=1e-5)
    torch.manual_seed(3)
    out = ops.attention(q, k, v, mask, 0.2)
    torch.manual_seed(3)
    keep = ops.keep_mask((b, nh, rows, s), 0.2, torch.device("cpu"))
    probs = torch.softmax(scores_masked(q, k, mask), -1) * keep * (32768 / (32768 - 6554))
    torch.testing.assert_close(out, probs @ v, atol=1e-6, rtol=1e-5)
    # no mask: every key attended to
    torch.testing.assert_close(
        ops.attention(q, k, v, None, 0.0), F.scaled_dot_product_attention(q, k, v)
    )
    # compiled (as a CPU model with dropout runs it under torch.compile)
    compiled = torch.compile(ops.attention, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, mask, 0.0), sdpa, atol=1e-6, rtol=1e-5)


def reference_loss(logits, labels, vocab):
    x = logits[:, :vocab]
    loss = F.cross_entropy(x.float(), labels, ignore_index=IGNORE, reduction="sum")
    correct = ((x.max(-1).indices == labels) & (labels != IGNORE)).sum()
    return loss, correct


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_lm_loss_is_cross_entropy_over_the_vocabulary(monkeypatch, dtype):
    monkeypatch.setattr(ops, "CHUNK_BYTES", 5 * 4 * 190)  # 5 rows a chunk: 37 = 7 x 5 + 2
    g = torch.Generator().manual_seed(0)
    n, padded, vocab = 37, 192, 190
    base = (torch.randn(n, padded, generator=g) * 4).to(dtype)
    base[:, vocab:] = 100.0  # padding columns: never predicted, never in the loss
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::6] = IGNORE
    labels[1] = base[1, :vocab].float().argmax()  # at least one correct prediction
    base[2, 5] = base[2, 7] = base[2, :vocab].max() + 1  # a tie: the first maximum counts
    labels[2] = 5
    weight = torch.randn((), generator=g)

    def run(fn):
        x = base.clone().requires_grad_(True)
        loss, correct = fn(x)
        (loss * weight).backward()
        return loss, correct, x.grad

    ours = run(lambda x: ops.masked_lm_loss(x, labels, vocab, IGNORE))
    ref = run(lambda x: reference_loss(x, labels, vocab))
    assert ours[0].dtype == torch.float32
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-6, atol=1e-4)
    assert ours[1].item() == ref[1].item() >= 2
    assert ours[2].dtype == dtype
    assert torch.equal(ours[2][:, vocab:], torch.zeros(n, padded - vocab, dtype=dtype))
    assert torch.equal(ours[2][::6], torch.zeros(7, padded, dtype=dtype))  # ignored rows
    tolerance = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(ours[2], ref[2], **tolerance)


def test_masked_lm_loss_of_an_overflowed_logit_is_infinite():
    """A diverged step's +inf logit makes the loss +inf, as torch.logsumexp's arithmetic gives
    it (F.cross_entropy gives NaN; either way the step is flagged bad); rows without one keep
    their finite terms."""
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    logits[0, 9] = float("inf")
    labels = torch.tensor([4, 5, IGNORE])
    ours = ops.masked_lm_loss(logits, labels, 64, IGNORE)[0]
    assert ours.item() == float("inf")
    assert not torch.isfinite(reference_loss(logits, labels, 64)[0])
    finite = ops.masked_lm_loss(logits[1:], labels[1:], 64, IGNORE)[0]
    torch.testing.assert_close(finite, reference_loss(logits[1:], labels[1:], 64)[0])


def test_attention_is_taken_where_it_measured_faster_than_sdpa(monkeypatch):
    def q(dtype, grad):
        return torch.zeros(1, 1, 4, 8, dtype=dtype, requires_grad=grad)

    assert ops.attention_faster(q(torch.float32, False), 0.1)  # dropout
    assert ops.attention_faster(q(torch.bfloat16, True), 0.0)  # a bf16 backward
    assert not ops.attention_faster(q(torch.float32, True), 0.0)
    assert not ops.attention_faster(q(torch.bfloat16, False), 0.0)
    with torch.no_grad():
        assert not ops.attention_faster(q(torch.bfloat16, True), 0.0)
    # under torch.compile: with dropout only (a Philox call per probability in SDPA's math path)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert ops.attention_faster(q(torch.float32, True), 0.1)
    assert not ops.attention_faster(q(torch.bfloat16, True), 0.0)


def test_a_cpu_training_step_takes_the_cpu_ops_and_evaluation_does_not(monkeypatch):
    from bertforge.model import BertConfig, BertForPretraining
    from bertforge.train import Objective

    calls = {"dropout": 0, "attention": 0, "masked_lm_loss": 0}
    for name in calls:
        real = getattr(ops, name)

        def counted(*a, real=real, name=name, **kw):
            calls[name] += 1
            return real(*a, **kw)

        monkeypatch.setattr(ops, name, counted)
    c = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    objective = Objective(BertForPretraining(c))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 99, (3, 16), generator=g)
    labels = torch.randint(0, 99, (3, 4), generator=g)
    args = (ids, torch.zeros_like(ids), torch.tensor([16, 9, 5]), torch.tensor([[1, 2, 3, 4]] * 3),
            labels, torch.tensor([0, 1, 0]), None)  # fmt: skip
    mlm, nsp, _ = objective(*args)
    (mlm + nsp).backward()
    # embeddings + 2 per layer (hidden) + 1 per layer (attention probabilities)
    assert calls == {"dropout": 1 + 2 * 2 + 2, "attention": 2, "masked_lm_loss": 1}
    objective.eval()
    with torch.no_grad():
        objective(*args)
    assert calls["attention"] == 2 and calls["masked_lm_loss"] == 2  # SDPA when evaluating
