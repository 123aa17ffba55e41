#!/usr/bin/env python3
"""Copy a llama-architecture GGUF, keeping only its first N transformer blocks.

Why this exists: the GPU machine used for GPU-vs-CPU training comparisons
cannot download anything, and everything sent to it must fit in a 64 MiB
transfer. The full SmolLM2-135M-Instruct Q4_1 GGUF is ~94 MiB, so it does not
fit. Slicing it to the token embedding plus the first few blocks (e.g. 6 of 30,
~45 MiB) lets those runs use the real SmolLM2 weights and the real tokenizer
instead of random weights and a toy vocabulary. Output quality of a 6-layer
slice is poor; that is expected and irrelevant for GPU-vs-CPU agreement.

What is copied:
  * every metadata key/value unchanged (tokenizer tokens, merges, token types,
    chat template, special-token ids, all llama.* hyper-parameters, alignment),
    except `<arch>.block_count`, which becomes N;
  * tensors token_embd.weight, output_norm.weight, output.weight (if present)
    and blk.{0..N-1}.*, byte for byte, with their original quantisation types
    (Q8_0, Q4_1, F32, ...), shapes and relative order.

Usage:
  /work/venv/bin/python tools/slice_gguf.py \\
      assets/SmolLM2-135M-Instruct.Q4_1.gguf \\
      assets/SmolLM2-135M-Instruct-6L.Q4_1.gguf --layers 6
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import gguf
from gguf import GGUFReader, GGUFValueType, GGUFWriter

TOP_LEVEL_TENSORS = ("token_embd.weight", "output_norm.weight", "output.weight")
BLOCK_RE = re.compile(r"^blk\.(\d+)\.")


def field_value(field: gguf.ReaderField):
    return field.contents()


def keep_tensor(name: str, n_layers: int) -> bool:
    if name in TOP_LEVEL_TENSORS:
        return True
    m = BLOCK_RE.match(name)
    return m is not None and int(m.group(1)) < n_layers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input", help="source GGUF (llama architecture)")
    ap.add_argument("output", help="destination GGUF")
    ap.add_argument("--layers", type=int, required=True, help="number of leading transformer blocks to keep")
    args = ap.parse_args()

    reader = GGUFReader(args.input, "r")

    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if arch_field is None:
        sys.exit("input has no general.architecture")
    arch = field_value(arch_field)
    block_key = gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)
    block_field = reader.get_field(block_key)
    if block_field is None:
        sys.exit(f"input has no {block_key}")
    old_blocks = int(field_value(block_field))
    if not 1 <= args.layers <= old_blocks:
        sys.exit(f"--layers must be in 1..{old_blocks}, got {args.layers}")

    if os.path.abspath(args.input) == os.path.abspath(args.output):
        sys.exit("output must differ from input")

    writer = GGUFWriter(args.output, arch)  # adds general.architecture itself

    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = int(field_value(alignment))

    # Metadata: copy every key in its original order with its original types.
    for field in reader.fields.values():
        name = field.name
        if name.startswith("GGUF.") or name == gguf.Keys.General.ARCHITECTURE:
            continue  # header pseudo-fields / already written by the writer
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        if name == block_key:
            writer.add_key_value(name, args.layers, vtype)
        else:
            writer.add_key_value(name, field_value(field), vtype, sub_type=sub_type)

    # Tensors: keep order, raw bytes and quantisation types.
    kept = [t for t in reader.tensors if keep_tensor(t.name, args.layers)]
    if not any(t.name == "token_embd.weight" for t in kept):
        sys.exit("input has no token_embd.weight")
    for t in kept:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.tensor_type)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data)
    writer.close()

    size = os.path.getsize(args.output)
    print(
        f"wrote {args.output}: {size} bytes ({size / 2**20:.2f} MiB), "
        f"{len(kept)} of {len(reader.tensors)} tensors, "
        f"{block_key} {old_blocks} -> {args.layers}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
