"""Memory each editing method needs on a model, computed from its shapes (not measured): weights, statistics, state.

Computed terms (exact for the tensors named, in bytes):
  * weights: parameters × bytes per parameter of the load dtype;
  * ROME: one layer's key second moment C (d_mlp × d_mlp), float64 while solving (float32 on disk);
  * MEMIT: C at each layer of its range; AlphaEdit: C and the null-space projection P at each layer;
  * FT / FT-L: the trained down-projections (one per layer) with a float32 copy, gradient and Adam's two moments;
  * LoRA (rank r): A and B per trained module with the same optimiser state;
  * the value optimisation's activations (ROME/MEMIT/AlphaEdit) are not computed: they are measured on the
    built-in models (`bench_dtype.py` peak RSS) and grow with prompts × tokens × width × depth.

Usage: .venv/bin/python benchmarks/memory_plan.py [--config path/to/config.json | --model gemma3-270m]
           [--dtype bfloat16] [--memit-layers 5] [--rank 4]
Default: the shapes of Llama-2-7B (config.json of meta-llama/Llama-2-7b-hf: hidden 4096, intermediate 11008,
32 layers, vocabulary 32000, 6.74B parameters), bfloat16.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit  # noqa: E402

LLAMA2_7B = {"name": "Llama-2-7B (shapes)", "hidden_size": 4096, "intermediate_size": 11008,
             "num_hidden_layers": 32, "vocab_size": 32000, "n_params": 6_738_415_616}
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 1024 ** 3


def shapes_of_builtin(name: str) -> dict:
    import lmedit

    lm = lmedit.load(name)
    cfg = lm.model.config
    text = getattr(cfg, "text_config", cfg)
    return {"name": name, "hidden_size": lm.arch.d_model(lm.model), "intermediate_size": lm.arch.d_mlp(lm.model),
            "num_hidden_layers": lm.n_layers, "vocab_size": text.vocab_size,
            "n_params": sum(p.numel() for p in lm.model.parameters())}


def plan(shapes: dict, dtype: str, memit_layers: int, rank: int) -> dict:
    d, m = shapes["hidden_size"], shapes["intermediate_size"]
    weights = shapes["n_params"] * BYTES[dtype]
    c64 = m * m * 8
    down_proj = d * m
    adam = 4 * 4  # float32 copy, gradient, two moments
    gib = {
        "weights": weights / GIB,
        "rome_statistics": c64 / GIB,
        "memit_statistics": memit_layers * c64 / GIB,
        "alphaedit_statistics_and_projection": memit_layers * 2 * c64 / GIB,
        "ft_one_layer_state": down_proj * adam / GIB,
        "lora_one_module_state": rank * (d + m) * adam / GIB,
        "statistics_on_disk_per_layer": m * m * 4 / GIB,
    }
    return {k: round(v, 3) for k, v in gib.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=None, help="a Hugging Face config.json (Llama-style names)")
    parser.add_argument("--model", default=None, help="a built-in model name (loads it to read its shapes)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(BYTES))
    parser.add_argument("--memit-layers", type=int, default=5)
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args()
    if args.model:
        shapes = shapes_of_builtin(args.model)
    elif args.config:
        cfg = json.loads(Path(args.config).read_text())
        cfg = cfg.get("text_config", cfg)
        d, m, n, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
        shapes = {"name": args.config, "hidden_size": d, "intermediate_size": m, "num_hidden_layers": n, "vocab_size": v,
                  "n_params": cfg.get("n_params") or (2 * v * d + n * (4 * d * d + 3 * d * m))}  # Llama-style count
    else:
        shapes = LLAMA2_7B
    emit({"benchmark": "memory_plan", "computed_not_measured": True, "model": shapes["name"], "dtype": args.dtype,
          "shapes": shapes, "memit_layers": args.memit_layers, "lora_rank": args.rank,
          "gib": plan(shapes, args.dtype, args.memit_layers, args.rank)})


if __name__ == "__main__":
    main()
