#!/usr/bin/env python
"""Export a megatron checkpoint (saved at any TP/PP/VPP layout) to a Hugging Face model directory.

    python tools/convert_megatron_to_hf.py --ckpt C --out D [--hf-template D0] [--config cfg.yaml]
        [--tokenizer TOKDIR] [--dtype bf16|fp32] [--max-shard-size 2GB] [--verify]

Model config: --config (any YAML with a ``model:`` section, e.g. the training config) or
C/model.yaml. HF config, generation config and tokenizer: --hf-template, else C/hf_config
(written by convert_hf_to_megatron.py); --tokenizer or the training config's
``model.tokenizer.model`` directory supply tokenizer files; the tokenizer gives the stop token
ids (config.json, generation_config.json). Writes sharded safetensors with an index, vocab
padding removed, into a directory beside D that is renamed to D at the end. Streaming: one
layer at a time. Bad input: one line, exit status 2. See docs/convert.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"size {text!r}: use e.g. 500MB, 2GB or a byte count")
    if float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r}: must be more than 0")
    unit = {"": 1, "B": 1, "K": 1024, "KB": 1024, "M": 1024**2, "MB": 1024**2, "G": 1024**3, "GB": 1024**3}[match.group(2)]
    return int(float(match.group(1)) * unit)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True,
                        help="megatron torch_dist checkpoint directory, or a trainer's checkpoints/ dir (uses 'latest')")
    parser.add_argument("--out", required=True, help="output HF directory (created; must be empty)")
    parser.add_argument("--hf-template", default=None, help="HF directory with config.json / tokenizer to reuse")
    parser.add_argument("--config", default=None, help="YAML whose model: keys override the checkpoint's model.yaml (needed only for checkpoints without one)")
    parser.add_argument("--tokenizer", default=None, help="directory to copy tokenizer files from")
    parser.add_argument("--architecture", default=None,
                        help="LlamaForCausalLM | Qwen2ForCausalLM | Qwen3ForCausalLM | Qwen3MoeForCausalLM | "
                             "Qwen2MoeForCausalLM when there is no template")
    parser.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default=None,
                        help="output dtype (default: as stored in the checkpoint)")
    parser.add_argument("--max-shard-size", type=parse_size, default=parse_size("2GB"))
    parser.add_argument("--verify", action="store_true",
                        help="compare HF and megatron logits on CPU in fp32 afterwards (holds both models)")
    parser.add_argument("--json", default=None, help="also write the summary as JSON here")
    args = parser.parse_args(argv)

    from psft_megatron.convert import convert_megatron_to_hf
    from psft_megatron.errors import UserError

    try:
        summary = convert_megatron_to_hf(
            args.ckpt, args.out, hf_template=args.hf_template, config=args.config, tokenizer=args.tokenizer,
            architecture=args.architecture, dtype=args.dtype, max_shard_bytes=args.max_shard_size, verify=args.verify,
        )
    except UserError as err:  # bad input: one line, no traceback
        print(err.line(), file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
