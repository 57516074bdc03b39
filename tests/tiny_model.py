"""A tiny random-weight Llama with a BPE tokenizer and a chat template, for a real vLLM server.

No model can be downloaded where the tests run, so the real-vLLM tests serve one made here:
``python -m tests.tiny_model OUT`` (from the vLLM environment: torch, transformers, tokenizers)
writes a Hugging Face model folder vLLM loads. Random weights answer gibberish, but vLLM's own
behaviour (usage counts, guided decoding, errors, aborts) does not depend on the words.

The shape is the smallest vLLM's CPU attention kernels accept: head_dim 16 is refused, 64 is
served (hidden 128, 2 heads, 2 layers). Written atomically (a temp folder renamed), so a
folder that exists is complete.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
SERVED_NAME = "tiny-llama"  # the name vLLM serves it under
# Its context (vLLM's --max-model-len): long enough that an answer running to the end takes
# seconds, which the time-limit tests need.
CONTEXT = 16384
VOCAB_SIZE = 2048
SPECIAL = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
# Each message as <|role|>, its text, then </s>; the prompt ends ready for the answer.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def corpus() -> Iterator[str]:
    """Local text to train the tokenizer on: the repository's docs and Python sources."""
    for pattern in ("*.md", "docs/*.md", "cluster/*.py", "core/*.py", "bridge/*.py"):
        for path in sorted(ROOT.glob(pattern)):
            yield path.read_text(encoding="utf-8")


def build(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    # Byte-level BPE: every string encodes, which guided decoding needs to reach any JSON.
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    eos = tokenizer.convert_tokens_to_ids("</s>")

    torch.manual_seed(20)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=CONTEXT, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
        tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(config)
    # Random weights would end an answer at </s> about once in VOCAB_SIZE tokens, so a long
    # answer (the time-limit tests need one) would stop early now and then; and guided
    # decoding, which lets JSON hold any whitespace, would spend max_tokens on blank tokens
    # between keys. So every token's embedding gets a large constant first component, which
    # the tiny layers barely change, and the output rows of </s> and of the blank tokens
    # weigh that component strongly negative: they are never sampled, unless the grammar
    # allows nothing else (</s> once the JSON is complete).
    never = [eos] + [index for token, index in tokenizer.get_vocab().items()
                     if index not in tokenizer.all_special_ids
                     and not tokenizer.convert_tokens_to_string([token]).strip()]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[never, 0] = -10.0

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def build_with(python: str, out: Path) -> Path:
    """Build the model into ``out`` unless it is there, with ``python`` (an environment with
    torch, transformers and tokenizers: the vLLM one), from any environment; ``out`` back.

    Parameters:
      python: the interpreter that runs ``python -m tests.tiny_model``.
      out: the model folder to write (kept when it already holds a model).
    """
    subprocess.run([python, "-m", "tests.tiny_model", str(out)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, timeout=600)
    return out


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.tiny_model OUT_DIR")
    out = Path(sys.argv[1])
    if not (out / "config.json").is_file():
        build(out)
    print(out)


if __name__ == "__main__":
    main()
