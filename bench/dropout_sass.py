"""What dropout's random numbers cost a GPU's fused kernels, counted without a GPU: static SASS
instructions per element for sm_90 (H100, H200), compiled by Triton as inductor would.

    python bench/dropout_sass.py   # needs triton (PyPI's CUDA build of torch brings it)

Three kernels, each a block of BLOCK bf16 elements on 4 warps:
- `per_element`: inductor's dropout: one `tl.rand` (a Philox4x32-10 call) per element, the
  kept values scaled, the output and the bool mask stored;
- `words`: the 15-bit draws' first kernel: inductor's randint64 over [0, 2**63 - 1), one
  Philox call (and a 64-bit modulo) per 64-bit word of four elements;
- `lanes`: the same fused work as `per_element` with each element's int16 lane of those words
  instead of a random number (it reads 2 bytes more per element; `words` wrote them).

Prints instructions per element of each and what the draws save; last, one JSON object. A
static count is not a timing: issue rates differ by instruction (IMAD.HI is half rate), and
the memory traffic the words add is not counted. bench/RESULTS.md turns it into an estimate.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import triton
import triton.language as tl
from common import sm90_sass

BLOCK = 1024
WARPS = 4


@triton.jit
def per_element(x_ptr, out_ptr, mask_ptr, seed, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    x = tl.load(x_ptr + i, mask=m).to(tl.float32)
    keep = tl.rand(seed, i) > 0.1
    tl.store(out_ptr + i, tl.where(keep, x * 1.1111111, 0.0).to(tl.bfloat16), mask=m)
    tl.store(mask_ptr + i, keep, mask=m)


@triton.jit
def words(w_ptr, seed, nw, BLOCK: tl.constexpr):
    # inductor's triton_helpers.randint64(seed, offset, 0, 2**63 - 1)
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    r0, r1, _r2, _r3 = tl.randint4x(seed, j)
    drawn = r0.to(tl.uint64) | (r1.to(tl.uint64) << 32)
    size = tl.full([1], 9223372036854775807, tl.int64) - tl.full([1], 0, tl.int64)
    drawn = drawn % size.to(tl.uint64)
    tl.store(w_ptr + j, drawn.to(tl.int64), mask=j < nw)


@triton.jit
def lanes(x_ptr, v_ptr, out_ptr, mask_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    x = tl.load(x_ptr + i, mask=m).to(tl.float32)
    keep = (tl.load(v_ptr + i, mask=m) & 32767) >= 3277
    tl.store(out_ptr + i, tl.where(keep, x * 1.1111111, 0.0).to(tl.bfloat16), mask=m)
    tl.store(mask_ptr + i, keep, mask=m)


SIGNATURES = {
    "per_element": (per_element, "x_ptr:*bf16 out_ptr:*bf16 mask_ptr:*i1 seed:i64 n:i32"),
    "words": (words, "w_ptr:*i64 seed:i64 nw:i32"),
    "lanes": (lanes, "x_ptr:*bf16 v_ptr:*i16 out_ptr:*bf16 mask_ptr:*i1 n:i32"),
}


def sass(fn: object, signature: str, workdir: Path) -> list[str]:
    """The kernel's SASS opcodes for sm_90, without NOPs, branches and the exit."""
    sig = dict(pair.split(":") for pair in signature.split())
    sig["BLOCK"] = "constexpr"
    return sm90_sass(fn, sig, {"BLOCK": BLOCK}, WARPS, workdir)


def main() -> None:
    per_thread = BLOCK / (WARPS * 32)  # elements (words in `words`) each thread handles
    with tempfile.TemporaryDirectory() as tmp:
        ops = {name: sass(fn, sig, Path(tmp)) for name, (fn, sig) in SIGNATURES.items()}
    each = {name: len(found) / per_thread for name, found in ops.items()}
    each["words"] /= 4  # four elements a word
    for name, found in ops.items():
        top = ", ".join(f"{op} {n}" for op, n in Counter(found).most_common(4))
        print(f"{name}: {each[name]:.1f} instructions an element ({top})")
    rng_per_element = each["per_element"] - each["lanes"]
    draws = each["words"] + each["lanes"]
    print(
        f"random numbers, per element: inductor's {rng_per_element:.1f} instructions; "
        f"the 15-bit draws {each['words']:.1f} (+2 bytes written and read); "
        f"fused dropout in all {each['per_element']:.1f} against {draws:.1f}"
    )
    print(json.dumps({
        "target": "sm_90", "block": BLOCK, "warps": WARPS, "triton": triton.__version__,
        "instructions_per_element": {k: round(v, 2) for k, v in each.items()},
        "rng_per_element": {"per_element": round(rng_per_element, 2),
                            "draws": round(each["words"], 2)},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
