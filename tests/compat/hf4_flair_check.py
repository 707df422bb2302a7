"""Run under transformers 4.x with flair (the .venv-hf4 environment), not under pytest.

    python hf4_flair_check.py MODEL_DIR EXPECTED.npz

EXPECTED.npz holds, from bertforge's own model: `texts`, `ids_N`, `mlm_N`, `nsp_N` (logits at
every position of text N), `flair_sentence` (space-separated words) and `flair_vectors` (its
last-layer first-piece word vectors, as `bertforge embed --level token`). Exits non-zero with a
message on the first disagreement.
"""

import sys

import numpy as np
import torch
import transformers

model_dir, expected_path = sys.argv[1], sys.argv[2]
expected = np.load(expected_path)
assert transformers.__version__.startswith("4."), transformers.__version__

tok = transformers.AutoTokenizer.from_pretrained(model_dir)
pretraining = transformers.BertForPreTraining.from_pretrained(model_dir).eval()
masked_lm = transformers.AutoModelForMaskedLM.from_pretrained(model_dir).eval()
transformers.AutoModel.from_pretrained(model_dir)
for n, text in enumerate(expected["texts"]):
    enc = tok(str(text), return_tensors="pt")
    assert enc["input_ids"][0].tolist() == expected[f"ids_{n}"].tolist(), f"token ids of {text!r}"
    with torch.no_grad():
        out = pretraining(**enc)
        mlm = masked_lm(**enc).logits[0].numpy()
    np.testing.assert_allclose(out.prediction_logits[0].numpy(), expected[f"mlm_{n}"], atol=1e-5)
    np.testing.assert_allclose(
        out.seq_relationship_logits[0].numpy(), expected[f"nsp_{n}"], atol=1e-5
    )
    np.testing.assert_allclose(mlm, expected[f"mlm_{n}"], atol=1e-5)
fill = transformers.pipeline("fill-mask", model=model_dir)
assert len(fill("And God said, Let there be [MASK].", top_k=3)) == 3

from flair.data import Sentence  # noqa: E402
from flair.embeddings import TransformerWordEmbeddings  # noqa: E402

embeddings = TransformerWordEmbeddings(
    model_dir, layers="-1", subtoken_pooling="first", fine_tune=False
)
sentence = Sentence(str(expected["flair_sentence"]), use_tokenizer=False)
embeddings.embed(sentence)
got = np.stack([t.embedding.cpu().numpy() for t in sentence])
assert got.shape == expected["flair_vectors"].shape, (got.shape, expected["flair_vectors"].shape)
np.testing.assert_allclose(got, expected["flair_vectors"], atol=1e-4)
print(f"ok: transformers {transformers.__version__}, flair embedded {len(sentence)} words")
