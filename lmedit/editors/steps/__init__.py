"""The editing steps the weight editors share, public so that editors, benchmarks and the CLI use one copy.

- `value`: context prefixes and the value optimisation (ROME's v*, MEMIT's and AlphaEdit's targets), with
  only the δ-dependent positions recomputed each step (`lmedit.split_forward`).
- `mass`: what MEMIT and AlphaEdit share — `MassEditor`, the edit flow both subclass (layer choice, keys at the
  subject, targets, spreading the residual over layers), and the keys of earlier edits to preserve.
- `finetune`: the training loop of FT and FT-L (`editors/ft.py`: teacher-forced batch, norm bound, deltas);
  LoRA (`editors/lora.py`) trains its adapter with the same batch and loop (`target_batch`, `train_on_targets`).
"""
