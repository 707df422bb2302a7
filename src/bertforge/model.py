"""BERT encoder with pretraining heads (masked LM, next sentence), written for training speed.

Written here because the model is the product: the layer math is BERT's (post-LayerNorm,
GELU, learned absolute positions), but the code is shaped for speed:
- q, k and v are one matmul (`qkv`), attention is torch's scaled_dot_product_attention;
- the masked-LM head runs only at the masked positions (Google's gather), never over the
  whole sequence, and in pretraining the last layer computes only the rows the heads read,
  each sequence's first token and masked positions (`prune_last_layer`, the default; their
  queries still attend to every key): the same logits for 30% of its work at seq 128;
- the word embedding matrix (tied to the MLM decoder) has its rows padded to a multiple of 64
  for aligned matmuls; the padding rows are never predicted and are cut off on export;
- a batch can be given "packed" (built by the loader on the host): every real token of the
  batch in one row, no padding at all, attention per sequence via `cu_seqlens` (flash varlen
  attention with dropout on CUDA; elsewhere a pad/attend/unpad fallback that computes the
  same thing);
- on request (`Layer.fused_norm`, the trainer's --fused-norm), each sublayer's output bias,
  dropout, residual add and LayerNorm are one Triton kernel each way (`kernels.fused_norm`);
  likewise the feed-forward's bias + GELU (`Layer.fused_gelu`, --fused-gelu); or (`Layer.fused_ffn`,
  --fused-ffn) the feed-forward's GELU in the epilogues of Triton matmuls (`kernels.feed_forward`);
- on request (`Layer.split_qkv`, --split-qkv), q, k and v are three matmuls on the blocks of
  the one qkv weight, so their gradients need not be concatenated for the backward;
- on request (`Layer.fused_attention`, --fused-attention), a packed batch's attention is
  bertforge's Triton kernel for sequences of up to 128 tokens (`kernels.attention`).

The weights map to `transformers.BertForPreTraining` through the explicit table in
`hf_key_table` (q/k/v are split, the vocab padding is cut), checked numerically in the tests.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bertforge import kernels, ops
from bertforge.errors import UserError

VOCAB_MULTIPLE = 64

# Google's sizes: (layers, hidden). Heads = hidden / 64, intermediate = 4 * hidden.
PRESETS: dict[str, tuple[int, int]] = {
    "tiny": (2, 128),
    "mini": (4, 256),
    "small": (4, 512),
    "medium": (8, 512),
    "base": (12, 768),
    "large": (24, 1024),
}

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,  # erf form, as transformers reads "gelu"
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # Google's TF code's gelu
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


CONFIG_FILES = ("bert_config.json", "config.json")  # a model's shape beside it, Google's first


def config_file_in(directory: Path) -> Path | None:
    """A model's shape beside it: Google's bert_config.json, else a Hugging Face config.json."""
    return next((directory / n for n in CONFIG_FILES if (directory / n).is_file()), None)


@dataclass(frozen=True)
class BertConfig:
    """The model's shape, in Google's bert_config.json names."""

    vocab_size: int
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"bert config: hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}."
            )
        if self.hidden_act not in ACTIVATIONS:
            raise UserError(
                f"bert config: hidden_act {self.hidden_act!r} is not supported; "
                f"use one of {', '.join(ACTIVATIONS)}."
            )

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @classmethod
    def preset(cls, name: str, vocab_size: int, **overrides: Any) -> BertConfig:
        if name not in PRESETS:
            raise UserError(
                f"--model-size: unknown size {name!r}; use one of {', '.join(PRESETS)} "
                "or --bert-config FILE."
            )
        layers, hidden = PRESETS[name]
        return cls(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            intermediate_size=4 * hidden,
            **overrides,
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str) -> BertConfig:
        if not isinstance(d, Mapping):
            raise UserError(f"{source}: not a BERT config (a JSON object is expected).")
        kind = d.get("model_type", "bert")
        if kind != "bert":
            raise UserError(
                f"{source}: a {kind!r} model; bertforge trains and reads BERT models "
                "(model_type 'bert')."
            )
        positions = d.get("position_embedding_type", "absolute")
        if positions != "absolute":
            raise UserError(
                f"{source}: position_embedding_type {positions!r}; bertforge's BERT has "
                "learned absolute positions only ('absolute')."
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in fields}
        missing = [k for k, f in fields.items() if f.default is f.default_factory is
                   dataclasses.MISSING and k not in values]  # fmt: skip
        if missing:
            raise UserError(f"{source}: not a BERT config: it has no {', '.join(missing)}.")
        for k, v in values.items():
            kind = fields[k].type  # the annotation, a string here: "int", "float" or "str"
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            if kind == "int" and not (number and float(v).is_integer() and v >= 1):
                raise UserError(f"{source}: not a BERT config: {k} must be a positive "
                                f"integer, got {v!r}.")  # fmt: skip
            top = 1 if k.endswith("_prob") else math.inf  # a dropout probability
            if kind == "float" and not (number and 0 <= v < top):
                below = " and below 1" if top == 1 else ""
                raise UserError(f"{source}: not a BERT config: {k} must be a number, 0 or "
                                f"more{below}, got {v!r}.")  # fmt: skip
            if kind == "str" and not isinstance(v, str):
                raise UserError(f"{source}: not a BERT config: {k} must be a string, got {v!r}.")
        try:
            return cls(**{k: int(v) if fields[k].type == "int" else v for k, v in values.items()})
        except UserError as e:  # __post_init__'s, told where the config came from
            raise UserError(f"{source}: {str(e).removeprefix('bert config: ')}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        if Path(path).is_dir():  # a model's directory given for its config
            found = config_file_in(Path(path))
            hint = f"give the file, {found}" if found else "give the bert_config.json file"
            raise UserError(f"{path}: a directory, not a bert_config.json; {hint}.")
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # JSON's errors and UnicodeDecodeError are ValueErrors
            raise UserError(f"{path}: cannot read a bert_config.json ({e}).") from None
        return cls.from_dict(d, str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def non_embedding_parameters(self) -> int:
        h, i, n = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        per_layer = 4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h
        return n * per_layer

    def training_flops_per_token(self, seq_len: int, masked_per_token: float) -> float:
        """Training FLOPs (forward + backward) per real token, as MFU counts them (PaLM's
        appendix B, BERT's heads added): 6 per non-embedding parameter, 12 x layers x hidden x
        seq_len for the attention scores and their weighted sum, and the masked-LM head
        (transform and decoder) at the masked tokens, masked_per_token of them per token.
        Matmul work only: LayerNorm, GELU, dropout, the pooler and NSP head are left out."""
        h = self.hidden_size
        head = 6 * (h * h + h * self.vocab_size) * masked_per_token
        attention = 12 * self.num_hidden_layers * h * seq_len
        return 6 * self.non_embedding_parameters() + attention + head

    def pruned_flops_per_token(self, seq_len: int, read_per_token: float) -> float:
        """The training FLOPs per real token that `BertForPretraining.prune_last_layer` skips,
        counted as `training_flops_per_token` counts them: the last layer's q, output and
        feed-forward matmuls and its attention at the rows no head reads, 1 - read_per_token
        of them (read_per_token: each sequence's first token and masked positions, per
        token)."""
        h, i = self.hidden_size, self.intermediate_size
        per_row = 6 * (2 * h * h + 2 * h * i) + 12 * h * seq_len
        return (1 - read_per_token) * per_row


# ----------------------------------------------------------------------------- layout


@dataclass
class Packed:
    """A batch without padding: the real tokens of all sequences back to back, [T, ...].

    The loader builds it on the host (`batches.to_tensors(packed=True)`), so the model reads
    no device value and finds no padding to remove. cu_seqlens [B+1] int32 holds where each
    sequence starts (and the total at the end), [B+1+C] when C filler sequences after the
    batch's round T up (`to_tensors(bucket=...)`); position_ids [T] each token's position in
    its sequence; max_len the padded width, a constant upper bound on the lengths for the
    attention kernel's grid; flash whether the device runs flash varlen attention (decided
    on the host: `flash_varlen_available`)."""

    cu_seqlens: torch.Tensor
    position_ids: torch.Tensor
    max_len: int
    flash: bool = False

    def starts(self, rows: int) -> torch.Tensor:
        """Where each of the batch's `rows` instances starts (filler sequences that round the
        token count up, `batches.to_tensors(bucket=...)`, come after them)."""
        return self.cu_seqlens[:rows].long()

    def padded_index(self) -> torch.Tensor:
        """[T] flat position b * max_len + i of every token in the padded [B, max_len] batch
        (no data-dependent shape: a binary search of each token in cu_seqlens)."""
        tokens = torch.arange(self.position_ids.shape[0], device=self.position_ids.device)
        sequence = torch.searchsorted(self.cu_seqlens[1:].long(), tokens, right=True)
        return sequence * self.max_len + self.position_ids

    def pad(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x [T, ...] as the padded batch [B, max_len, ...] (zeros in the padding); index:
        `padded_index()`."""
        out = self.zeros(x.dtype, x.shape[1:])
        out.flatten(0, 1)[index] = x
        return out

    def zeros(self, dtype: torch.dtype, rest: tuple[int, ...]) -> torch.Tensor:
        """Zeros [B, max_len, *rest], B = cu_seqlens' length - 1: its shape's, not a size
        computed from it (under torch.compile with a dynamic batch size, torch 2.11's inductor
        fails on zeros of a size computed in the step's graph once the layers' nested region
        sees that size too: "cannot sympify ShapeAsConstantBuffer")."""
        column = torch.zeros_like(self.cu_seqlens[1:], dtype=dtype)
        ones = (1,) * (1 + len(rest))
        return column.view(-1, *ones).expand(-1, self.max_len, *rest).contiguous()

    def key_mask(self, index: torch.Tensor) -> torch.Tensor:
        """The padded batch's [B, 1, 1, max_len] bool key mask, True at real tokens; index:
        `padded_index()`."""
        valid = self.zeros(torch.bool, ())
        valid.flatten()[index] = True
        return valid[:, None, None, :]


@functools.cache
def flash_varlen_available(device: torch.device) -> bool:
    """Whether `device` runs flash varlen attention (a CUDA GPU of compute capability 8.0 or
    newer, flash attention not switched off in torch.backends)."""
    return (
        device.type == "cuda"
        and torch.backends.cuda.flash_sdp_enabled()
        and torch.cuda.get_device_capability(device) >= (8, 0)
    )


def flash_varlen_fits(dtype: torch.dtype, head_size: int) -> bool:
    """Whether the flash varlen kernel takes q/k/v of this dtype and head size."""
    return dtype in (torch.float16, torch.bfloat16) and head_size % 8 == 0 and head_size <= 256


def flash_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Packed, dropout: float
) -> torch.Tensor:
    """Flash attention per sequence of a packed batch, q/k/v [T, nh, hs], with dropout.

    torch's public `varlen_attn` has no dropout (BERT pretraining drops 10% of the attention
    probabilities), so this calls the aten kernel it wraps, as torch's own jagged-tensor SDPA
    does; aten's autograd formula runs the flash backward with the forward's RNG state."""
    cu = layout.cu_seqlens
    n = layout.max_len
    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, n, n, dropout, False, False)[0]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor | Packed | None,
    dropout: float,
    fused: bool = False,
) -> torch.Tensor:
    """Attention of q, k, v given as [B, S, nh, hs] (padded) or [T, nh, hs] (packed).

    layout: None (no padding), a [B, 1, 1, S] bool key mask, or a Packed batch. fused: a
    packed batch's attention as `kernels.attention` where it runs and fits."""
    if isinstance(layout, Packed):
        if fused and kernels.usable(q) and kernels.attention_fits(q, layout.max_len):
            return kernels.attention(q, k, v, layout.cu_seqlens, layout.max_len, dropout)
        if layout.flash and flash_varlen_fits(q.dtype, q.shape[-1]):
            return flash_varlen(q, k, v, layout, dropout)
        # Elsewhere (CPU, fp32): scatter into a padded batch, attend with a key mask, gather.
        index = layout.padded_index()
        padded = (layout.pad(x, index) for x in (q, k, v))
        out = attend(*padded, layout.key_mask(index), dropout)
        return out.flatten(0, 1)[index]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, S, nh, hs) -> (B, nh, S, hs)
    if ops.attention_faster(q, dropout):
        out = ops.attention(q, k, v, layout, dropout)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout, dropout_p=dropout)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------- modules


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose output stays in the autocast dtype (bf16/fp16) under autocast.

    Autocast runs layer_norm in fp32 and returns fp32, which makes the whole residual stream
    fp32: every residual add, dropout and norm then moves twice the bytes (on an H100 the
    fused norm kernels were 15% of BERT-base's step). The statistics are still computed in
    fp32 (the kernels do that for half-precision input); only the stored output is half,
    as in NVIDIA's BERT and Megatron-LM. Without autocast this is nn.LayerNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        if not torch.is_autocast_enabled(kind):
            return super().forward(x)
        half = torch.get_autocast_dtype(kind)
        with torch.autocast(kind, enabled=False):
            w, b = self.weight.to(half), self.bias.to(half)  # CUDA kernels want one dtype
            return F.layer_norm(x.to(half), self.normalized_shape, w, b, self.eps)


class Dropout(nn.Dropout):
    """nn.Dropout drawn by `ops.dropout`: 15 random bits an element in eager mode on a CPU
    and under torch.compile on a CPU. `bits` True or False takes those draws or torch's own
    dropout under torch.compile on any device (the throughput bench's `--compiled-dropout`
    compares the two); None, the default, leaves it to `ops.compiled_draws`."""

    bits: bool | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.dropout(x, self.p, self.training, self.bits)


class Layer(nn.Module):
    """One post-LayerNorm encoder layer. `fused_norm` True: the output bias, dropout, residual
    add and LayerNorm of both sublayers run as `kernels.fused_norm` where it can run (CUDA with
    Triton); `fused_gelu` True: the feed-forward's bias and GELU (the erf form) as
    `kernels.bias_gelu`; `fused_ffn` True: the feed-forward as `kernels.feed_forward`, GELU
    in its matmuls' epilogues (before `fused_gelu`); `split_qkv` True: q, k, v from three
    matmuls on the qkv weight's blocks (`project_qkv`); `fused_attention` True: a packed
    batch's attention as `kernels.attention` (sequences up to 128 tokens); the plain modules
    otherwise. Same weights either way."""

    fused_norm: bool = False
    fused_gelu: bool = False
    fused_ffn: bool = False
    split_qkv: bool = False
    fused_attention: bool = False

    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        h = c.hidden_size
        self.num_heads = c.num_attention_heads
        self.attention_dropout = c.attention_probs_dropout_prob
        self.qkv = nn.Linear(h, 3 * h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = LayerNorm(h, eps=c.layer_norm_eps)
        self.ffn_in = nn.Linear(h, c.intermediate_size)
        self.ffn_out = nn.Linear(c.intermediate_size, h)
        self.ffn_norm = LayerNorm(h, eps=c.layer_norm_eps)
        self.dropout = Dropout(c.hidden_dropout_prob)
        self.act = ACTIVATIONS[c.hidden_act]

    def forward(
        self,
        x: torch.Tensor,
        layout: torch.Tensor | Packed | None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The layer's output (B, S, H) padded or (T, H) packed; with `rows` (B, Q) only the
        output at those token rows, (B, Q, H) (`rows_qkv`)."""
        # heads split the last dim into (nh, hs)
        p = self.attention_dropout if self.training else 0.0
        if rows is None:
            q, k, v = self.project_qkv(x)
            a = attend(q, k, v, layout, p, self.fused_attention)
        else:
            x, q, k, v, layout = self.rows_qkv(x, layout, rows)
            a = attend(q, k, v, layout, p)
        x = self.add_norm(self.attn_out, a.flatten(-2), x, self.attn_norm)
        if self.fuses_feed_forward(x):
            w_in, b_in, w_out = self.ffn_in.weight, self.ffn_in.bias, self.ffn_out.weight
            h = kernels.feed_forward(x, w_in, b_in, w_out)
            return self.add_norm(self.ffn_out, None, x, self.ffn_norm, h)
        return self.add_norm(self.ffn_out, self.feed_forward_in(x), x, self.ffn_norm)

    def rows_qkv(
        self, x: torch.Tensor, layout: torch.Tensor | Packed | None, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What the layer needs for its output at `rows` only: rows (B, Q) indexes the tokens
        of x as one list (b x S + position padded, T packed), Q of sequence b's tokens in
        row b. Returns those tokens' inputs (B, Q, H) and queries (B, Q, nh, hs), every
        token's keys and values (B, S, nh, hs) padded, and their key mask (B, 1, 1, S) or
        None. Each query still attends to all of its sequence's keys, so the rows come out as
        the whole layer computes them."""
        h = x.shape[-1]
        picked = take_rows(x, rows)
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(picked, w[:h], b[:h]).unflatten(-1, (self.num_heads, -1))
        kv = F.linear(x, w[h:], b[h:]).unflatten(-1, (2, self.num_heads, -1))
        if isinstance(layout, Packed):  # filler sequences (graphs' buckets) come after row B
            index = layout.padded_index()
            kv = layout.pad(kv, index)[: rows.shape[0]]
            layout = layout.key_mask(index)[: rows.shape[0]]
        k, v = kv.unbind(-3)
        return picked, q, k, v, layout

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v [..., nh, hs]: one matmul, or with `split_qkv` one per row block of the
        same weight, whose backward needs no concatenation of the three gradients."""
        if not self.split_qkv:
            return self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(-3)
        blocks = zip(self.qkv.weight.chunk(3), self.qkv.bias.chunk(3), strict=True)
        return tuple(F.linear(x, w, b).unflatten(-1, (self.num_heads, -1)) for w, b in blocks)

    def fuses_feed_forward(self, x: torch.Tensor) -> bool:
        """Whether the feed-forward runs as `kernels.feed_forward` (`fused_ffn`, where its
        kernels take x and the weights; the erf form of GELU, hidden_act "gelu")."""
        return (
            self.fused_ffn
            and self.act is ACTIVATIONS["gelu"]
            and kernels.feed_forward_fits(x, self.ffn_in.weight, self.ffn_out.weight)
        )

    def feed_forward_in(self, x: torch.Tensor) -> torch.Tensor:
        """act(ffn_in(x))."""
        # the kernels compute the erf form, hidden_act "gelu"'s F.gelu
        if self.fused_gelu and self.act is ACTIVATIONS["gelu"] and kernels.usable(x):
            return kernels.bias_gelu(F.linear(x, self.ffn_in.weight), self.ffn_in.bias)
        return self.act(self.ffn_in(x))

    def add_norm(
        self,
        out: nn.Linear,
        a: torch.Tensor | None,
        x: torch.Tensor,
        norm: LayerNorm,
        h: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """norm(x + dropout(out(a))): a sublayer's output projection and residual. h: a @
        out.weight^T where the caller has it (a is then not read)."""
        if self.fused_norm and kernels.usable(x):
            p = self.dropout.p if self.training else 0.0
            h = F.linear(a, out.weight) if h is None else h  # the bias is added in the kernel
            return kernels.fused_norm(h, out.bias, x, norm.weight, norm.bias, p, norm.eps)
        return norm(x + self.dropout(out(a) if h is None else h + out.bias))


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The token rows of x ((B, S, H) padded or (T, H) packed) at `rows` (B, Q), indices into
    its tokens as one list (b x S + position padded), as (B, Q, H)."""
    h = x.shape[-1]
    return x.reshape(-1, h)[rows.flatten()].view(*rows.shape, h)


def run_layer(layer: Layer, x: torch.Tensor, layout: torch.Tensor | Packed | None) -> torch.Tensor:
    return layer(x, layout)


# Under torch.compile the layers are one nested compile region: traced and compiled once,
# the code reused by every layer (about half the compile time for BERT-base; see
# bench/RESULTS.md). Outside torch.compile it is a plain call, as it is with a torch that
# lacks the feature.
_region = getattr(torch.compiler, "nested_compile_region", None)
layer_region = _region(run_layer) if _region is not None else run_layer


# Layer's speed options, each a flag of TrainConfig's of the same name: the same weights and
# model either way (`BertForPretraining.set_layer_options`)
LAYER_OPTIONS = ("fused_norm", "fused_gelu", "fused_ffn", "split_qkv", "fused_attention")


class BertForPretraining(nn.Module):
    """Encoder + pooler + MLM head (decoder tied to the word embeddings) + NSP head.

    compile_regions: under torch.compile, compile one layer and reuse it for all (the
    default; False traces every layer into the step's graph). prune_last_layer: where only
    some rows are read (`encode`'s rows; in `pretraining_logits` the heads' rows, each
    sequence's first token and masked positions) the last layer computes only those (the
    default; False computes every row and gathers those): the same logits, for 30% of the
    last layer's work at BERT-base's seq 128 (its keys and values are still every token's)."""

    prune_last_layer: bool = True

    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.config = c
        self.compile_regions = True
        h = c.hidden_size
        self.word_embeddings = nn.Embedding(c.padded_vocab_size, h)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, h)
        self.embed_norm = LayerNorm(h, eps=c.layer_norm_eps)
        self.dropout = Dropout(c.hidden_dropout_prob)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.pooler = nn.Linear(h, h)
        self.mlm_transform = nn.Linear(h, h)
        self.mlm_norm = LayerNorm(h, eps=c.layer_norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(c.padded_vocab_size))
        self.nsp = nn.Linear(h, 2)
        self.act = ACTIVATIONS[c.hidden_act]
        self.apply(self._init)
        with torch.no_grad():  # padding rows: never looked up, never predicted
            self.word_embeddings.weight[c.vocab_size :].zero_()

    def set_layer_options(self, **options: bool) -> None:
        """Set Layer's speed options (LAYER_OPTIONS) on every layer."""
        if unknown := sorted(set(options) - set(LAYER_OPTIONS)):
            raise TypeError(f"set_layer_options: {', '.join(unknown)} is not a layer option")
        for layer in self.layers:
            for name, on in options.items():
                setattr(layer, name, on)

    def _init(self, m: nn.Module) -> None:
        # Google's initializer: truncated normal (2 std) for weights, zeros for biases.
        std = self.config.initializer_range
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)

    def encode(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        lengths: torch.Tensor | None,
        packed: Packed | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, S, H), or (T, H) when packed; with `rows` (B, Q), the token rows
        that are read (`take_rows`), only those rows, (B, Q, H): with `prune_last_layer` the
        last layer computes no other (`Layer.rows_qkv`).

        Padded input (B, S): lengths None means no padding at all; given, padded keys are
        masked (the caller decides on the host whether a batch has padding, so this never
        reads device values: no sync, no torch.compile graph break). Packed input: ids and
        types are (T,) and `packed` says where the sequences are; lengths is not used."""
        if packed is not None:
            x = self.embed(input_ids, token_type_ids, packed.position_ids)
            layout: torch.Tensor | Packed | None = packed
        else:
            b, s = input_ids.shape
            positions = torch.arange(s, device=input_ids.device)
            x = self.embed(input_ids, token_type_ids, positions)
            layout = None
            if lengths is not None:
                layout = (positions[None, :] < lengths[:, None]).view(b, 1, 1, s)
        run = layer_region if self.compile_regions else run_layer
        prune = rows is not None and self.prune_last_layer and len(self.layers) > 0
        for layer in self.layers[:-1] if prune else self.layers:
            x = run(layer, x, layout)
        if prune:
            return self.layers[-1](x, layout, rows)
        return x if rows is None else take_rows(x, rows)

    def embed(
        self, ids: torch.Tensor, types: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        x = self.word_embeddings(ids) + self.position_embeddings(positions)
        return self.dropout(self.embed_norm(x + self.token_type_embeddings(types)))

    def hidden_states(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """The embedding output and every layer's output, (B, S, H) each, as transformers'
        hidden_states (single-segment inputs: feature extraction)."""
        b, s = input_ids.shape
        positions = torch.arange(s, device=input_ids.device)
        layout = (positions[None, :] < lengths[:, None]).view(b, 1, 1, s)
        x = self.embed(input_ids, torch.zeros_like(input_ids), positions)
        out = [x]
        for layer in self.layers:
            x = layer(x, layout)
            out.append(x)
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        lengths: torch.Tensor | None,
        masked_positions: torch.Tensor,
        packed: Packed | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MLM logits (B, P, vocab_size) at masked_positions (B, P), NSP logits (B, 2)."""
        logits, nsp = self.pretraining_logits(
            input_ids, token_type_ids, lengths, masked_positions, packed
        )
        v = self.config.vocab_size
        return logits[:, :v].view(masked_positions.shape[0], -1, v), nsp

    def pretraining_logits(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        lengths: torch.Tensor | None,
        masked_positions: torch.Tensor,
        packed: Packed | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`'s logits as the decoder writes them: MLM (B x P, padded_vocab_size), the
        columns from vocab_size on the vocabulary's padding (no token: a loss skips them,
        which saves a copy of the logits without them and its backward), NSP (B, 2)."""
        b = masked_positions.shape[0]
        if packed is not None:
            starts = packed.starts(b)
        else:
            starts = torch.arange(b, device=input_ids.device) * input_ids.shape[1]
        # the rows the heads read: each sequence's first token (NSP) and its masked positions
        read = starts[:, None] + F.pad(masked_positions, (1, 0))
        x = self.encode(input_ids, token_type_ids, lengths, packed, read)
        first, gathered = x[:, 0], x[:, 1:].flatten(0, 1)
        pooled = torch.tanh(self.pooler(first))
        t = self.mlm_norm(self.act(self.mlm_transform(gathered)))
        return F.linear(t, self.word_embeddings.weight, self.mlm_bias), self.nsp(pooled)


# ----------------------------------------------------------------------------- weights


def hf_key_table(num_layers: int) -> list[tuple[str, str]]:
    """(bertforge name, transformers BertForPreTraining name) for every weight.

    Our `layers.N.qkv` is transformers' query, key and value stacked; see to_hf/from_hf."""
    table = [
        ("word_embeddings.weight", "bert.embeddings.word_embeddings.weight"),
        ("position_embeddings.weight", "bert.embeddings.position_embeddings.weight"),
        ("token_type_embeddings.weight", "bert.embeddings.token_type_embeddings.weight"),
        ("embed_norm.weight", "bert.embeddings.LayerNorm.weight"),
        ("embed_norm.bias", "bert.embeddings.LayerNorm.bias"),
    ]
    for i in range(num_layers):
        ours, hf = f"layers.{i}.", f"bert.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            table += [
                (f"{ours}qkv.{kind}", f"{hf}attention.self.{{query,key,value}}.{kind}"),
                (f"{ours}attn_out.{kind}", f"{hf}attention.output.dense.{kind}"),
                (f"{ours}attn_norm.{kind}", f"{hf}attention.output.LayerNorm.{kind}"),
                (f"{ours}ffn_in.{kind}", f"{hf}intermediate.dense.{kind}"),
                (f"{ours}ffn_out.{kind}", f"{hf}output.dense.{kind}"),
                (f"{ours}ffn_norm.{kind}", f"{hf}output.LayerNorm.{kind}"),
            ]
    table += [
        ("pooler.weight", "bert.pooler.dense.weight"),
        ("pooler.bias", "bert.pooler.dense.bias"),
        ("mlm_transform.weight", "cls.predictions.transform.dense.weight"),
        ("mlm_transform.bias", "cls.predictions.transform.dense.bias"),
        ("mlm_norm.weight", "cls.predictions.transform.LayerNorm.weight"),
        ("mlm_norm.bias", "cls.predictions.transform.LayerNorm.bias"),
        ("mlm_bias", "cls.predictions.bias"),
        ("nsp.weight", "cls.seq_relationship.weight"),
        ("nsp.bias", "cls.seq_relationship.bias"),
    ]
    return table


def _qkv_names(hf: str) -> list[str]:
    head, rest = hf.split("{", 1)
    names, tail = rest.split("}", 1)
    return [head + n + tail for n in names.split(",")]


def _vocab_rows(name: str) -> bool:
    return name in ("word_embeddings.weight", "mlm_bias")


def to_hf(state: Mapping[str, torch.Tensor], c: BertConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Our state dict as transformers BertForPreTraining weights (vocab padding removed).

    The decoder weight (cls.predictions.decoder.weight) is tied to the word embeddings and the
    decoder bias to cls.predictions.bias; both are yielded so either transformers loads it."""
    for ours, hf in hf_key_table(c.num_hidden_layers):
        t = state[ours]
        if _vocab_rows(ours):
            t = t[: c.vocab_size]
        if "{" in hf:
            yield from zip(_qkv_names(hf), t.chunk(3), strict=True)
        else:
            yield hf, t
    yield "cls.predictions.decoder.weight", state["word_embeddings.weight"][: c.vocab_size]
    yield "cls.predictions.decoder.bias", state["mlm_bias"][: c.vocab_size]


LEGACY_NAMES = ((".LayerNorm.gamma", ".LayerNorm.weight"), (".LayerNorm.beta", ".LayerNorm.bias"))


def published_names(hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' names for weights as checkpoints are published, renamed as transformers
    renames them on load: a bare BertModel's names gain the `bert.` prefix; pre-2020 uploads
    (bert-base-*, multilingual BERT) name LayerNorm's weights gamma and beta; a checkpoint may
    hold the masked-LM bias only under its tied name, cls.predictions.decoder.bias."""
    out = dict(hf)
    if not any(k.startswith("bert.") for k in out):
        out = {f"bert.{k}": v for k, v in out.items()}
    for k in list(out):
        for old, new in LEGACY_NAMES:
            if k.endswith(old):
                out.setdefault(k[: -len(old)] + new, out.pop(k))
    if "cls.predictions.decoder.bias" in out:
        out.setdefault("cls.predictions.bias", out["cls.predictions.decoder.bias"])
    return out


# The parts beyond the encoder, by what a message calls them: a bare encoder (transformers'
# BertModel) has only the pooler, BertForMaskedLM only the masked-LM head.
MLM_HEAD = "the masked-LM head"
HEADS: dict[str, tuple[str, ...]] = {
    "the pooler": ("pooler.weight", "pooler.bias"),
    MLM_HEAD: (
        "mlm_transform.weight",
        "mlm_transform.bias",
        "mlm_norm.weight",
        "mlm_norm.bias",
        "mlm_bias",
    ),
    "the next-sentence head": ("nsp.weight", "nsp.bias"),
}


def missing_heads(weights: Mapping[str, torch.Tensor]) -> list[str]:
    """The HEADS that `weights` (in our names) lack, or hold only in part."""
    return [what for what, names in HEADS.items() if not all(n in weights for n in names)]


def from_hf(hf: Mapping[str, torch.Tensor], c: BertConfig, source: str) -> dict[str, torch.Tensor]:
    """transformers BertForPreTraining (or BertModel, prefix-less) weights in our names.

    Heads missing from `hf` (a bare encoder) are left out: the caller keeps its fresh ones."""
    hf = published_names(hf)
    out: dict[str, torch.Tensor] = {}
    for ours, name in hf_key_table(c.num_hidden_layers):
        names = _qkv_names(name) if "{" in name else [name]
        if not all(n in hf for n in names):
            if name.startswith("bert.embeddings") or name.startswith("bert.encoder"):
                raise UserError(
                    f"{source}: no weight {names[0]}; not a BERT checkpoint of this "
                    "size (check its config)."
                )
            continue
        t = torch.cat([hf[n] for n in names]) if len(names) > 1 else hf[name]
        if _vocab_rows(ours):
            if t.shape[0] != c.vocab_size:
                raise UserError(
                    f"{source}: {name} has {t.shape[0]} rows but the vocabulary "
                    f"has {c.vocab_size} tokens."
                )
            t = F.pad(t, (0, 0) * (t.dim() - 1) + (0, c.padded_vocab_size - c.vocab_size))
        out[ours] = t
    return out


def load_weights(
    model: BertForPretraining, weights: Mapping[str, torch.Tensor], source: str
) -> None:
    """Copy weights into the model, checking every shape; missing heads keep their init."""
    state = model.state_dict()
    for name, t in weights.items():
        if name not in state:
            raise UserError(f"{source}: unexpected weight {name}.")
        if tuple(t.shape) != tuple(state[name].shape):
            raise UserError(
                f"{source}: {name} has shape {tuple(t.shape)}, the model expects "
                f"{tuple(state[name].shape)} (is the model size the checkpoint's?)."
            )
    with torch.no_grad():
        for name, t in weights.items():
            state[name].copy_(t)


def model_with_weights(
    config: BertConfig, weights: Mapping[str, torch.Tensor], source: str
) -> BertForPretraining:
    """A model holding `weights` (checked as `load_weights` checks them), built without first
    initializing what they overwrite: on the meta device, then given memory. Only a module
    that the weights do not wholly cover is initialized, as a new model's is (a Hugging Face
    BertModel has no pretraining heads). For `embed` and `fill-mask`: BERT-base's random
    initialization took 3.1 s of its 3.5 s load on 2 CPU cores."""
    with torch.device("meta"):
        model = BertForPretraining(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for prefix, module in model.named_modules():
            names = [
                f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)
            ]
            if all(name in weights for name in names):
                continue
            if module is model:  # its own tensor: the masked-LM bias
                model.mlm_bias.zero_()
            else:
                module.reset_parameters()  # type: ignore[operator]
                model._init(module)
                if module is model.word_embeddings:  # padding rows, as in __init__
                    module.weight[config.vocab_size :].zero_()
    load_weights(model, weights, source)
    return model
