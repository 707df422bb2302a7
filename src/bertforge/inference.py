"""Using a trained model: load it from anything bertforge reads, tokenize text exactly as the
data stage did, and answer fill-mask queries (`bertforge fill-mask`). embed.py builds on it.

The model is bertforge's own (model.py), so an export, a training directory mid-run and a
Hugging Face BERT directory all work the same way, without a round trip through transformers.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

import torch
from tokenizers import AddedToken, Tokenizer

from bertforge.checkpoint import InitWeights, read_init_checkpoint
from bertforge.config import FillMaskConfig
from bertforge.errors import UserError
from bertforge.model import MLM_HEAD, BertForPretraining, missing_heads, model_with_weights
from bertforge.tokenization import MASK, SPECIALS, Vocab, load_vocab
from bertforge.workers import cap_torch_threads

UNUSED = re.compile(r"^\[unused\d+\]$")


@dataclass
class Loaded:
    model: BertForPretraining
    vocab: Vocab
    tokenizer: Tokenizer  # [CLS] ... [SEP] added; "[MASK]" in a text is the mask token
    device: torch.device
    source: InitWeights

    @property
    def max_length(self) -> int:
        """Pieces the model reads at most: as far as its positions were trained, where known."""
        return self.source.readable_length


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu.")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        cap_torch_threads()
    return torch.device(name)


def load_model(
    path: str, device: str = "auto", flag: str = "--model", do_lower_case: bool | None = None
) -> Loaded:
    """The model at `path` with its vocabulary. `do_lower_case`: the casing of a bare vocab.txt
    (a Google checkpoint's); a recorded casing it contradicts is an error."""
    source = read_init_checkpoint(path, flag)
    if source.vocab_file is None:
        raise UserError(
            f"{flag}: no vocab.txt or tokenizer.json beside {source.path}; export the model first "
            "(bertforge export --checkpoint ... --vocab ...)."
        )
    vocab = load_vocab(source.vocab_file, do_lower_case, flag)
    if vocab.casing_doubt:
        print(vocab.casing_doubt, file=sys.stderr)
    if vocab.size != source.config.vocab_size:
        raise UserError(
            f"{flag}: {vocab.path} has {vocab.size} tokens, the model {source.config.vocab_size}."
        )
    model = model_with_weights(source.config, source.weights, str(source.path))
    dev = pick_device(device)
    model.to(dev).eval()
    tokenizer = vocab.tokenizer()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return Loaded(model, vocab, tokenizer, dev, source)


@dataclass
class Guess:
    token: str
    probability: float


@torch.no_grad()
def fill_mask(loaded: Loaded, text: str, top_k: int) -> list[list[Guess]]:
    """The top_k guesses for each [MASK] in text, in order (special tokens never guessed)."""
    mask_id = loaded.vocab.id(MASK)
    ids = loaded.tokenizer.encode(text).ids
    if len(ids) > loaded.max_length:
        raise UserError(f"text has {len(ids)} pieces; the model reads at most {loaded.max_length}.")
    positions = [i for i, t in enumerate(ids) if t == mask_id]
    if not positions:
        how = f" ({MASK}, in capitals)" if MASK.lower() in text.lower() else ""
        raise UserError(f"no {MASK} in {text!r}; put {MASK} where a word should be guessed{how}.")
    dev = loaded.device
    input_ids = torch.tensor([ids], device=dev)
    logits, _ = loaded.model(
        input_ids,
        torch.zeros_like(input_ids),
        torch.tensor([len(ids)], device=dev),
        torch.tensor([positions], device=dev),
    )
    logits = logits[0].float()
    banned = [i for i, t in enumerate(loaded.vocab.tokens) if t in SPECIALS or UNUSED.match(t)]
    logits[:, banned] = float("-inf")
    probs = logits.softmax(-1)
    top = probs.topk(min(top_k, probs.shape[-1] - len(banned)), dim=-1)
    return [
        [Guess(loaded.vocab.tokens[i], p) for p, i in zip(ps.tolist(), ix.tolist(), strict=True)]
        for ps, ix in zip(top.values, top.indices, strict=True)
    ]


def filled(text: str, guesses: list[list[Guess]]) -> str:
    """text with each [MASK] replaced by its best guess, in brackets."""
    parts = text.split(MASK)
    out = parts[0]
    for part, g in zip(parts[1:], guesses, strict=False):
        out += f"[{g[0].token}]" + part
    return out


def run_fill_mask(cfg: FillMaskConfig) -> list[list[list[Guess]]]:
    loaded = load_model(cfg.model, cfg.device, do_lower_case=cfg.do_lower_case)
    if MLM_HEAD in missing_heads(loaded.source.weights):
        path = loaded.source.path
        raise UserError(
            f"--model {path} has no masked-LM head (cls.predictions.*: a bare encoder, as "
            "transformers' BertModel saves one), so its guesses would be random; use a model "
            "saved with it (BertForPreTraining, BertForMaskedLM, a bertforge export), or "
            f"train one from it: bertforge train --init-checkpoint {path} ..."
        )
    results = []
    for text in cfg.text:
        guesses = fill_mask(loaded, text, cfg.top_k)
        results.append(guesses)
        print(filled(text, guesses))
        for n, g in enumerate(guesses, 1):
            shown = ", ".join(f"{x.token} {x.probability:.3f}" for x in g)
            print(f"  {MASK} {n}: {shown}")
    return results
