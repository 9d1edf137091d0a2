#!/usr/bin/env python
"""Convert a Hugging Face Llama-3.x / Qwen2 / Qwen2.5 / Qwen3 / Qwen3-MoE / Qwen2-MoE model into a megatron checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir D --out O [--dtype bf16|fp32] [--verify]

Writes the megatron torch_dist checkpoint into O (loads at any TP/PP/VPP/DP layout),
O/model.yaml (the ``model:`` config section) and O/hf_config/ (config.json, generation
config, tokenizer files, for the export), all written beside O and renamed to O at the end.
Streaming: one tensor at a time. Bad input: one line, exit status 2. See docs/convert.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="output directory (created; must be empty)")
    parser.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default=None,
                        help="stored dtype (default: the HF config's dtype)")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                        help="vocab padding multiple (times TP); default: the one recorded in the HF directory's "
                             "conversion.json by an export, else 128")
    parser.add_argument("--verify", action="store_true",
                        help="compare HF and megatron logits on CPU in fp32 afterwards (holds both models)")
    parser.add_argument("--json", default=None, help="also write the summary as JSON here")
    args = parser.parse_args(argv)

    from psft_megatron.convert import convert_hf_to_megatron
    from psft_megatron.errors import UserError

    try:
        summary = convert_hf_to_megatron(args.hf_dir, args.out, dtype=args.dtype, verify=args.verify,
                                         make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
    except UserError as err:  # bad input: one line, no traceback
        print(err.line(), file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
