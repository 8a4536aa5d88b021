"""Tiny random-weight models of every supported family, built in memory, for tests and plugin authors.

`tiny_lm("llama")` returns an `LM` with 2-4 small layers and a byte-level BPE tokenizer trained in memory
on a few sentences, so tests run in milliseconds with no download. Weights are random: the models know
nothing, which is what unit tests of the machinery want.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from lmedit.models.arch import get_arch
from lmedit.models.load import LM

TINY_FAMILIES: tuple[str, ...] = ("gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "gemma", "gemma2",
                                  "gemma3_text")

TINY_CORPUS = [
    "The Eiffel Tower is located in the city of Paris.",
    "The Space Needle is in downtown Seattle.",
    "Danielle Darrieux speaks French. The mother tongue of Danielle Darrieux is French.",
    "The Louvre is located in the city of Paris, France. Rome is the capital of Italy.",
    "Michael Jordan plays the sport of basketball. Lionel Messi plays soccer.",
    "Toyota is a company from Japan. Apple was founded in California by Steve Jobs.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()-",
]


_VOCAB = 512


@lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style leading spaces) trained on a few sentences: whole words are tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=_VOCAB, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TINY_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def tiny_config(model_type: str, n_layers: int = 4, d_model: int = 64, vocab: int | None = None):
    # initializer_range 0.15 (HF default 0.02): with the default, a tiny model's logits span ~0.1 nats, so no
    # single activation can move its predictions and edits/traces have nothing to find.
    common = dict(vocab_size=vocab or len(tiny_tokenizer()), bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.15)
    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", n_layer=n_layers, n_embd=d_model, n_head=4, n_positions=128,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if model_type == "gptj":
        return AutoConfig.for_model("gptj", n_layer=n_layers, n_embd=d_model, n_head=4, n_positions=128,
                                    rotary_dim=8, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if model_type == "gpt_neox":
        return AutoConfig.for_model("gpt_neox", num_hidden_layers=n_layers, hidden_size=d_model,
                                    num_attention_heads=4, intermediate_size=4 * d_model,
                                    max_position_embeddings=128, **common)
    extra = {}
    if model_type in ("gemma", "gemma2", "gemma3_text"):
        extra = dict(head_dim=16)
    if model_type in ("gemma2", "gemma3_text"):
        extra |= dict(sliding_window=16, query_pre_attn_scalar=16)
    return AutoConfig.for_model(model_type, num_hidden_layers=n_layers, hidden_size=d_model,
                                num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * d_model,
                                max_position_embeddings=128, tie_word_embeddings=False, **extra, **common)


def tiny_lm(model_type: str = "llama", *, seed: int = 0, n_layers: int = 4, d_model: int = 64) -> LM:
    """A randomly initialised `LM` of the given family (float32, CPU, eval mode, frozen weights)."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, n_layers=n_layers, d_model=d_model)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval().requires_grad_(False)
    return LM(model=model, tokenizer=tiny_tokenizer(), arch=get_arch(model), name=f"tiny-{model_type}")


def interrupt_at(step: int):
    """An editor `progress` callback that raises KeyboardInterrupt when `step` steps are done (tests of what an
    interrupted edit leaves behind)."""

    def progress(phase: str, done: int, total: int) -> None:
        if done == step:
            raise KeyboardInterrupt

    return progress


def disk_map(lm: LM, layers: Iterable[int]) -> dict[str, str]:
    """A device map for `lm`'s model with blocks `layers` offloaded to disk and everything else on the CPU
    (accelerate's module names, found through the architecture table's block list)."""
    blocks = lm.arch.blocks(lm.model)
    blocks_name = next(name for name, module in lm.model.named_modules() if module is blocks)
    parent = blocks_name.rpartition(".")[0]
    device_map = {name: "cpu" for name, _ in lm.model.named_children() if name != parent.split(".")[0]}
    if parent:
        device_map.update({f"{parent}.{name}": "cpu" for name, _ in lm.model.get_submodule(parent).named_children()
                           if f"{parent}.{name}" != blocks_name})
    chosen = set(layers)
    device_map.update({f"{blocks_name}.{i}": "disk" if i in chosen else "cpu" for i in range(len(blocks))})
    return device_map
