"""bertforge's own training ops, where torch's are the slow part of a step.

Written here because they cost more than the matmuls around them (profiles and measurements
in bench/RESULTS.md, "bertforge's own CPU ops" and "dropout's random numbers under
torch.compile"; `bench/cpu_ops.py`). They are for a CPU, in eager mode and (dropout, and
attention with dropout) under torch.compile. On CUDA the model keeps torch's attention (flash
or cuDNN, dropout inside the kernel) and, by default, its dropout; inductor fuses the loss
itself.
- `dropout`: each element takes 15 random bits instead of a random number of its own. One
  64-bit draw of torch's generator (torch.random, so seeding, checkpointed RNG state and
  fork_rng all cover it) makes four decisions. The drop probability is p rounded to a
  multiple of 1/32768 (0.1 becomes 0.1000061) and the kept values are scaled by
  1 / (1 - that), so the output's expected value is still the input's. In eager mode on a
  CPU this replaces torch's Bernoulli sample per element (`bernoulli_`, 17% of a bf16
  BERT-mini step on a 2-core Xeon). Under torch.compile on a CPU (on CUDA when asked:
  `compiled_draws`) it replaces the Philox call per element that inductor's fused dropout
  makes (a Philox call gives 128 bits of which `rand` keeps 32): the draw is a kernel of its
  own, one call per four elements, whose 64-bit words the fused kernels read as four int16.
- `attention`: scaled_dot_product_attention with dropout on a CPU takes its math path, which
  casts bf16 q, k and v to fp32 and draws the Bernoulli mask above. Here the two products run
  in the input dtype (bf16 where the CPU multiplies it in hardware), softmax accumulates in
  fp32 as torch's kernel does, and the probabilities take `dropout`. Under torch.compile on a
  CPU too, when there is dropout: SDPA's math path would draw a Philox number per
  probability.
- `masked_lm_loss`: the MLM cross-entropy over the vocabulary, chunked over rows. The plain
  expression casts all [N, vocab] logits to fp32, writes a full fp32 log-softmax, and in the
  backward fills and copies full fp32 gradients several times over. Here each chunk of rows
  is cast, reduced and differentiated while it is in cache; the fp32 logits never exist in
  full, and the logits' vocabulary padding columns are skipped without a copy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BITS = 15
LEVELS = 1 << BITS
# fp32 bytes of logits per chunk of masked_lm_loss: 8 rows of a 30k vocabulary, which fits
# a core's L2 cache with room to spare (on a 2-core Xeon 1-4 MB chunks measured within noise,
# 8 MB and more slower)
CHUNK_BYTES = 1 << 20


def eager_on_cpu(x: torch.Tensor) -> bool:
    """Whether `x` is on a CPU, outside torch.compile (where inductor fuses the loss itself,
    and would unroll its chunk loop)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def drop_levels(p: float) -> int:
    """p as the number of the 32768 15-bit values that drop an element."""
    return round(p * LEVELS)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """A bool mask of `shape`, True where an element is kept, with probability 1 - p rounded
    to a multiple of 1/32768 (`drop_levels`).

    Eager: every 64-bit value from `random_`, four uniform int16, of which 2 x drop_levels(p)
    of the 65536 drop. Under torch.compile: `randint` (which inductor lowers to one Philox
    call per word, where `random_` would break the graph) over [0, 2**63 - 1), whose int16
    are uniform in their low 15 bits."""
    n = math.prod(shape)
    words = (n + 3) // 4
    if torch.compiler.is_compiling():
        drawn = torch.randint(0, 2**63 - 1, (words,), dtype=torch.int64, device=device)
        values = drawn.view(torch.int16)[:n].view(shape)
        return (values & (LEVELS - 1)) >= drop_levels(p)
    drawn = torch.empty(words, dtype=torch.int64, device=device).random_(-(2**63), None)
    values = drawn.view(torch.int16)[:n].view(shape)
    return values >= -LEVELS + 2 * drop_levels(p)


def keep_scale(p: float) -> float:
    """What a kept element is multiplied by: 1 / (1 - p as rounded by `drop_levels`)."""
    return LEVELS / (LEVELS - drop_levels(p))


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:  # type: ignore[override]
        keep = keep_mask(x.shape, p, x.device)
        ctx.scale = keep_scale(p)
        ctx.save_for_backward(keep)
        return torch.where(keep, x * ctx.scale, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad * ctx.scale, 0), None


def compiled_draws(device: torch.device, bits: bool | None) -> bool:
    """Whether `dropout` under torch.compile takes the 15-bit draws: `bits`, or by default on a
    CPU only. On CUDA inductor's own dropout stays the default until a GPU measures the draws
    faster: counted for sm_90 (`bench/dropout_sass.py`), its random numbers take 49.6 SASS
    instructions per element against the draws' 18.0, whose words add 4 bytes of memory
    traffic per element; under 2% of a BERT-base step either way (bench/RESULTS.md)."""
    return device.type == "cpu" if bits is None else bits


def dropout(x: torch.Tensor, p: float, training: bool, bits: bool | None = None) -> torch.Tensor:
    """F.dropout, from 15 random bits per element (see the module docstring) in eager mode
    on a CPU and under torch.compile where `compiled_draws` says so; F.dropout itself
    elsewhere (eager CUDA draws four elements per Philox call already) and where p rounds to
    0 or 1."""
    if not training or p == 0 or not 0 < drop_levels(p) < LEVELS:
        return F.dropout(x, p, training)
    if torch.compiler.is_compiling():
        if not compiled_draws(x.device, bits):
            return F.dropout(x, p, training)
        # plain ops: autograd keeps the mask for the backward, inductor fuses the where
        return torch.where(keep_mask(x.shape, p, x.device), x * keep_scale(p), 0)
    if x.device.type == "cpu":
        return _Dropout.apply(x, p)
    return F.dropout(x, p, training)


def attention_faster(q: torch.Tensor, p: float) -> bool:
    """Whether `attention` is faster than scaled_dot_product_attention here: on a CPU with
    dropout, eager or compiled (SDPA's math path draws a random number per probability: a
    Bernoulli sample in eager mode, a Philox call under inductor; the compiled BERT-mini bf16
    step measured 1.25x faster with `attention`), or in eager training in half precision (the CPU
    flash kernel's backward in bf16 measured 1.9-2.4x slower; without a backward, or in fp32
    without dropout, SDPA is the faster)."""
    if q.device.type != "cpu":
        return False
    if torch.compiler.is_compiling():
        return p > 0
    return p > 0 or (q.dtype != torch.float32 and torch.is_grad_enabled() and q.requires_grad)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, p: float
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs) with masked keys at -inf) with dropout p, times v.

    q: [B, nh, Q, hs]; k, v: [B, nh, S, hs] (Q = S but for the last layer's rows,
    `Layer.forward`'s queries); mask: None or a [B, 1, 1, S] bool, True for keys to attend to.
    Every query needs at least one key to attend to (a sequence is never empty). The mask
    and the scale enter the first product (baddbmm's bias and alpha) instead of taking passes
    of their own over the scores: 10-25% faster than masked_fill on this CPU."""
    b, nh, rows, hs = q.shape
    s = k.shape[2]
    q = q.reshape(b * nh, rows, hs)
    k, v = (t.reshape(b * nh, s, hs) for t in (k, v))
    if mask is None:
        bias = q.new_zeros(1, 1, 1)
    else:  # [B x nh, 1, S]: 0 for a key to attend to, -inf for padding
        bias = torch.zeros_like(mask, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
        bias = bias.expand(b, nh, 1, s).reshape(b * nh, 1, s)
    scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=1 / math.sqrt(hs))  # [B x nh, Q, S]
    probs = dropout(torch.softmax(scores, -1), p, True)
    return torch.bmm(probs, v).view(b, nh, rows, hs)


def chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab))


class _MaskedLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, logits: torch.Tensor, labels: torch.Tensor, vocab: int, ignore: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, rows = logits.shape[0], chunk_rows(vocab)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        best = torch.empty(n, dtype=torch.long, device=logits.device)
        for i in range(0, n, rows):
            # a copy (fp32 logits too), then torch.logsumexp's arithmetic (shifted by the
            # maximum, 0 where that is infinite) in place, the maximum's first index the
            # prediction
            part = logits[i : i + rows, :vocab].to(torch.float32, copy=True)
            top = part.max(-1)
            shift = top.values.masked_fill(top.values.isinf(), 0)
            lse[i : i + rows] = part.sub_(shift[:, None]).exp_().sum(-1).log_().add_(shift)
            best[i : i + rows] = top.indices
        used = labels != ignore
        target = labels.masked_fill(~used, 0)
        picked = logits.gather(1, target[:, None])[:, 0].float()
        loss = torch.where(used, lse - picked, 0).sum()
        correct = ((best == labels) & used).sum()
        ctx.vocab = vocab
        ctx.save_for_backward(logits, lse, target, used)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(  # type: ignore[override]
        ctx, grad: torch.Tensor, _: torch.Tensor
    ) -> tuple[torch.Tensor, None, None, None]:
        logits, lse, target, used = ctx.saved_tensors
        vocab = ctx.vocab
        n, rows = logits.shape[0], chunk_rows(vocab)
        weight = torch.where(used, grad, 0)[:, None]  # [N, 1] d loss / d row
        minus_one = torch.full_like(weight, -1.0)
        out = torch.empty_like(logits)
        out[:, vocab:] = 0
        for i in range(0, n, rows):
            r = slice(i, i + rows)
            part = logits[r, :vocab].to(torch.float32, copy=True)
            part.sub_(lse[r, None]).exp_()  # softmax, in place
            # minus 1 at the label (d -logit[label]), in fp32: softmax - 1 rounds once
            part.scatter_add_(1, target[r, None], minus_one[r])
            out[r, :vocab] = part.mul_(weight[r])
        return out, None, None, None


def masked_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, vocab: int, ignore: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed fp32 cross-entropy of logits [N, V] (V >= vocab: columns from `vocab` on are
    padding, never predicted) against labels [N] (rows labelled `ignore` count for nothing),
    and the number of rows whose first maximum over the vocabulary is the label.

    Equal to F.cross_entropy(logits[:, :vocab].float(), labels, ignore_index=ignore,
    reduction="sum") and its gradient, up to the order of fp32 sums."""
    return _MaskedLMLoss.apply(logits, labels, vocab, ignore)
