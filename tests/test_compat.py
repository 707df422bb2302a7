"""transformers 4.x and flair load an export and agree with bertforge (in their own venv:
flair needs transformers < 5; `make test` builds .venv-hf4 and sets BERTFORGE_HF4_PYTHON)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from bertforge.config import EmbedConfig
from bertforge.embed import embed
from bertforge.inference import load_model

HF4_PYTHON = os.environ.get("BERTFORGE_HF4_PYTHON")
SCRIPT = Path(__file__).parent / "compat" / "hf4_flair_check.py"
TEXTS = ["In the beginning God created the heaven and the earth.", "Jesus wept , and [MASK] ."]
WORDS = "And God said , Let there be light : and there was light ."

pytestmark = pytest.mark.skipif(
    not HF4_PYTHON, reason="needs BERTFORGE_HF4_PYTHON (make test sets it up)"
)


def test_transformers_4_and_flair_agree_with_bertforge(tmp_path, exported_model):
    loaded = load_model(str(exported_model), "cpu")
    arrays: dict[str, np.ndarray] = {"texts": np.array(TEXTS)}
    for n, text in enumerate(TEXTS):
        ids = loaded.tokenizer.encode(text).ids
        x = torch.tensor([ids])
        with torch.no_grad():
            mlm, nsp = loaded.model(
                x, torch.zeros_like(x), torch.tensor([len(ids)]), torch.arange(len(ids))[None]
            )
        arrays |= {
            f"ids_{n}": np.array(ids),
            f"mlm_{n}": mlm[0].numpy(),
            f"nsp_{n}": nsp[0].numpy(),
        }
    (tmp_path / "words.txt").write_text(WORDS + "\n")
    embed(
        EmbedConfig(
            model=str(exported_model),
            input=str(tmp_path / "words.txt"),
            output=str(tmp_path / "words.npy"),
            level="token",
            progress=False,
        )
    )
    vectors = np.load(tmp_path / "words.npy")
    assert len(vectors) == len(WORDS.split())
    arrays |= {"flair_sentence": np.array(WORDS), "flair_vectors": vectors}
    np.savez(tmp_path / "expected.npz", **arrays)
    done = subprocess.run(
        [HF4_PYTHON, str(SCRIPT), str(exported_model), str(tmp_path / "expected.npz")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok: transformers 4." in done.stdout
