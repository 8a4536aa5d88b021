"""Meta-training of MEND's editor network (Mitchell et al. 2021, arXiv:2110.11309, §3.2), with checkpoints and resume.

Each step draws `batch_size` edits. For each edit the frozen base model gives the gradient pieces
(u, δ) of target_new's NLL on the edit prompt; the network turns them into ΔW; the edited model is run
*functionally* (ΔW u added to the layer outputs, per batch row, see `editor.edited_hidden`) on the
edit prompt and its paraphrases, and on a locality prompt. The loss is

    L = c_edit · NLL(target_new | edit prompt, paraphrases; W + ΔW) + c_loc · KL(p_base ‖ p_edited on locality tokens)

and only the editor network (and the per-layer step sizes α_l) learn. The blocks before the first edited
layer run once per batch (`Tail`): the edit cannot reach them.

Training data are `EvalRecord`s of any registered dataset: the edit request, its paraphrases, and its
first neighbourhood probe as the locality prompt (CounterFact: another subject with the same relation
and object, the hardest locality case; zsRE: an unrelated Natural Questions query); a record without one
borrows the next record's edit prompt and answer. `val_size` records are held out for validation
(or a separate validation dataset is used), and records whose subject occurs in an `exclude` dataset
(for example the evaluation set) are dropped.

Output directory:
  mend.safetensors   the network with the lowest validation loss so far (what editing loads)
  last.safetensors   the latest network, and train_state.pt its optimiser state (for --resume)
  curve.json         validation and training metrics per validation step, seconds per step
  curve.png          the validation curve

Not handled: several locality prompts per edit, MEND's training of the base model itself (train_base).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmedit.config import to_dict
from lmedit.editors.base import TrainEvent
from lmedit.editors.mend.config import MendConfig
from lmedit.editors.mend.editor import (RowBuilder, Rows, gradient_pieces, identity_network, edited_hidden,
                                        log_probs, per_edit_factors, tail_start)
from lmedit.editors.mend.network import WEIGHTS_FILE, MendNetwork, load_network, read_metadata, save_network
from lmedit.errors import LMEditError

if TYPE_CHECKING:
    from lmedit.eval.records import EvalRecord
    from lmedit.models.load import LM

log = logging.getLogger(__name__)

LAST_FILE = "last.safetensors"
STATE_FILE = "train_state.pt"
CURVE_FILE = "curve.json"
PLOT_FILE = "curve.png"
# Fields that fix the network's shape: a resumed run must keep them.
SHAPE_FIELDS = ("layers", "rank", "n_hidden")


@dataclass(frozen=True)
class MendExample:
    """One training edit: the filled edit prompt, its targets, paraphrases and a locality prompt with its answer."""

    case_id: str
    subject: str
    prompt: str
    target_new: str
    target_true: str | None
    paraphrases: tuple[str, ...]
    loc_prompt: str
    loc_answer: str


def examples_from(records: Sequence[EvalRecord]) -> list[MendExample]:
    """Training examples from evaluation records (first request of each; see the module docstring for locality)."""
    out = []
    for i, record in enumerate(records):
        request = record.requests[0]
        if record.neighborhood:
            loc = record.neighborhood[0]
            loc_prompt, loc_answer = loc.prompt, loc.target
        else:
            other = records[(i + 1) % len(records)].requests[0]
            loc_prompt, loc_answer = other.text, other.target_true or other.target_new
        out.append(MendExample(case_id=record.case_id, subject=request.subject, prompt=request.text,
                               target_new=request.target_new, target_true=request.target_true,
                               paraphrases=tuple(p.prompt for p in record.paraphrases),
                               loc_prompt=loc_prompt, loc_answer=loc_answer))
    return out


def example_rows(lm: LM, examples: Sequence[MendExample], *, with_true: bool = False) -> Rows:
    builder = RowBuilder(lm)
    for i, ex in enumerate(examples):
        builder.add("edit", i, ex.prompt, ex.target_new)
        for paraphrase in ex.paraphrases:
            builder.add("para", i, paraphrase, ex.target_new)
        builder.add("loc", i, ex.loc_prompt, ex.loc_answer)
        if with_true and ex.target_true:
            builder.add("true", i, ex.prompt, ex.target_true)
    return builder.build(len(examples))


def _per_seq(values: torch.Tensor, seq: torch.Tensor, n: int, mean: bool) -> torch.Tensor:
    total = torch.zeros(n, device=values.device, dtype=values.dtype).index_add(0, seq, values)
    if not mean:
        return total
    return total / torch.zeros(n, device=values.device, dtype=values.dtype).index_add(0, seq, torch.ones_like(values))


def edit_step(lm: LM, network: MendNetwork, rows: Rows, config: MendConfig, *, training: bool
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """Edit each example of `rows` with `network` and measure it: (loss, metrics). Backpropagates nothing itself."""
    layers = list(network.layers)
    tail = tail_start(lm, rows, layers[0])
    keep = ("loc", "true") if "true" in rows.scored else ("loc",)
    pieces, base = gradient_pieces(lm, layers, rows, tail, keep=keep)
    outer_kinds = [k for k in ("edit", "para") if k in rows.scored]
    with torch.set_grad_enabled(training):
        factors = per_edit_factors(network, layers, pieces, rows.n_edits, update_stats=training)
        hidden = edited_hidden(lm, rows, tail, factors)
        logp = log_probs(lm, hidden, rows, [*outer_kinds, *keep])
        outer_nll = []
        for kind in outer_kinds:
            s = rows.scored[kind]
            token_nll = -logp[kind].gather(1, s.gold[:, None])[:, 0]
            outer_nll.append(_per_seq(token_nll, s.seq, s.n_seqs, mean=True))
        edit_nll = torch.cat(outer_nll).mean()
        base_loc, post_loc = base["loc"], logp["loc"]
        loc_kl = (base_loc.exp() * (base_loc - post_loc)).sum(-1).mean()
        loss = config.edit_weight * edit_nll + config.loc_weight * loc_kl
    with torch.no_grad():
        metrics = {"loss": loss.item(), "edit_nll": outer_nll[0].mean().item(),
                   "pre_edit_nll": pieces.edit_nll.mean().item(), "loc_kl": loc_kl.item(),
                   "tokens_per_edit": pieces.owner.shape[0] / rows.n_edits}
        for kind in outer_kinds:
            s = rows.scored[kind]
            metrics[f"{kind}_acc"] = (logp[kind].argmax(-1) == s.gold).float().mean().item()
        if "para" in outer_kinds:
            metrics["para_nll"] = outer_nll[1].mean().item()
        loc = rows.scored["loc"]
        metrics["loc_acc_pre"] = (base_loc.argmax(-1) == loc.gold).float().mean().item()
        metrics["loc_acc_post"] = (post_loc.argmax(-1) == loc.gold).float().mean().item()
        if "true" in rows.scored:
            # Efficacy (ROME): P(target_new) > P(target_true) on the edit prompt, whole-target probabilities.
            edit, true = rows.scored["edit"], rows.scored["true"]
            lp_new = _per_seq(logp["edit"].gather(1, edit.gold[:, None])[:, 0], edit.seq, edit.n_seqs, mean=False)
            lp_true = _per_seq(logp["true"].gather(1, true.gold[:, None])[:, 0], true.seq, true.n_seqs, mean=False)
            owner = torch.zeros(true.n_seqs, dtype=torch.long, device=true.owner.device).index_copy(0, true.seq, true.owner)
            metrics["efficacy"] = (lp_new[owner] > lp_true).float().mean().item()
    return loss, metrics


def validate(lm: LM, network: MendNetwork, examples: Sequence[MendExample], config: MendConfig) -> dict[str, float]:
    """Mean metrics over `examples`, in batches of `batch_size`, without touching the running statistics."""
    network.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for start in range(0, len(examples), config.batch_size):
        chunk = examples[start:start + config.batch_size]
        _, metrics = edit_step(lm, network, example_rows(lm, chunk, with_true=True), config, training=False)
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value * len(chunk)
            counts[key] = counts.get(key, 0) + len(chunk)
    return {key: sums[key] / counts[key] for key in sums}


def _split(config: MendConfig, train: Sequence[EvalRecord], held_out: Sequence[EvalRecord],
           exclude: Sequence[EvalRecord]) -> tuple[list[MendExample], list[MendExample], int]:
    examples = examples_from(train)
    banned = {r.subject.strip().lower() for rec in exclude for r in rec.requests}
    kept = [e for e in examples if e.subject.strip().lower() not in banned]
    dropped = len(examples) - len(kept)
    if held_out:
        val = examples_from(held_out)[:config.val_size]
        train_examples = kept
    else:
        order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(config.seed)).tolist()
        if len(kept) <= config.val_size:
            raise LMEditError(f"{len(kept)} usable training records cannot spare val_size={config.val_size} for "
                              "validation: lower val_size or give a validation dataset")
        val = [kept[i] for i in order[:config.val_size]]
        train_examples = [kept[i] for i in order[config.val_size:]]
    if not train_examples or not val:
        raise LMEditError("MEND training needs at least one training and one validation record")
    return train_examples, val, dropped


def _batch(examples: Sequence[MendExample], step: int, batch_size: int, seed: int) -> list[MendExample]:
    """The examples of (0-based) `step`: epochs are seeded permutations, so any step can be recomputed on resume."""
    n = len(examples)
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, index = divmod(k, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(examples[int(order[index])])
    return out


def _plot(history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    val = [h["val"] for h in history]
    axes[0].plot(steps, [v["edit_nll"] for v in val], "o-", label="val: NLL of target_new after the edit")
    if "para_nll" in val[0]:
        axes[0].plot(steps, [v["para_nll"] for v in val], "o-", label="val: on paraphrases")
    axes[0].plot(steps, [v["pre_edit_nll"] for v in val], "--", color="grey", label="val: edit prompt, before the edit")
    trained = [h for h in history if h.get("train")]
    if trained:
        axes[0].plot([h["step"] for h in trained], [h["train"]["edit_nll"] for h in trained], "x:", label="train")
    axes[0].set_ylabel("nats")
    axes[0].set_title("edit loss")
    axes[1].plot(steps, [v["loc_kl"] for v in val], "o-", color="C3", label="val")
    if trained:
        axes[1].plot([h["step"] for h in trained], [h["train"]["loc_kl"] for h in trained], "x:", color="C3",
                     label="train")
    axes[1].set_title("locality KL(base ‖ edited)")
    for key, label in (("efficacy", "efficacy (P(new) > P(true))"), ("edit_acc", "edit token accuracy"),
                       ("para_acc", "paraphrase token accuracy"), ("loc_acc_post", "locality token accuracy")):
        if key in val[0]:
            axes[2].plot(steps, [v[key] for v in val], "o-", label=label)
    axes[2].set_ylim(-0.02, 1.02)
    axes[2].set_title("validation")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_mend(lm: LM, config: MendConfig, train: Sequence[EvalRecord], *, out_dir: Path,
               held_out: Sequence[EvalRecord] = (), exclude: Sequence[EvalRecord] = (), resume: bool = False,
               progress: Callable[[TrainEvent], None] | None = None) -> dict[str, Any]:
    """Meta-train a MEND network for `lm` on `train`, writing checkpoints to `out_dir`.

    Args:
        lm: the frozen base model (its weights are never changed).
        config: network and training settings (`steps` is the total, counting steps of a resumed run).
        train: edit records; `val_size` of them are held out for validation unless `held_out` is given.
        held_out: validation records (the first `val_size` are used).
        exclude: records whose subjects must not be trained on (e.g. the evaluation set).
        resume: continue the run in `out_dir` from its last checkpoint.
        progress: called after every step with a `TrainEvent`.

    Returns:
        A summary: final and best validation metrics, seconds per step, and the output paths.

    Raises:
        LMEditError: `out_dir` already holds a run (and not `resume`), nothing to resume, the checkpoint
            was trained on another model or with another network shape.
    """
    out_dir = Path(out_dir)
    state_file, last_file, best_file = out_dir / STATE_FILE, out_dir / LAST_FILE, out_dir / WEIGHTS_FILE
    if state_file.exists() and not resume:
        raise LMEditError(f"{out_dir} already holds a MEND training run; pass --resume (resume=True) to continue "
                          "it, or choose another output directory")
    if resume and not (state_file.exists() and last_file.exists()):
        raise LMEditError(f"nothing to resume in {out_dir}: no {STATE_FILE} and {LAST_FILE} there")
    train_examples, val_examples, dropped = _split(config, train, held_out, exclude)
    log.info("MEND training on %d edits (%d held out for validation, %d dropped by exclusion)",
             len(train_examples), len(val_examples), dropped)

    network = identity_network(lm, config)
    optimizer = torch.optim.Adam([
        {"params": [p for name, p in network.named_parameters() if name != "edit_lrs"], "lr": config.lr},
        {"params": [network.edit_lrs], "lr": config.lr_lr},
    ])
    step, history, best = 0, [], {"loss": math.inf, "step": -1}
    elapsed = cpu = 0.0  # training-step seconds (wall clock, and CPU time summed over threads), validation excluded
    if resume:
        meta = read_metadata(last_file)
        before, now = meta["config"], to_dict(config)
        changed = [k for k in SHAPE_FIELDS if before.get(k) != now[k]]
        if changed:
            raise LMEditError(f"cannot resume in {out_dir}: the network settings {changed} differ from the checkpoint's "
                              f"({[before.get(k) for k in changed]})")
        loaded, _ = load_network(last_file, fingerprint=(lm.fingerprint, lm.weights_hash), model_name=lm.name,
                                 device=lm.device)
        network.load_state_dict(loaded.state_dict())
        state = torch.load(state_file, map_location=lm.device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        step, best, elapsed, cpu = (int(state["step"]), dict(state["best"]), float(state["elapsed_s"]),
                                    float(state["cpu_s"]))
        history = json.loads((out_dir / CURVE_FILE).read_text())["history"]
        log.info("resuming %s at step %d of %d", out_dir, step, config.steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_common = {"config": to_dict(config), "base_fingerprint": lm.fingerprint, "base_model": lm.name}

    def write_curve() -> None:
        (out_dir / CURVE_FILE).write_text(json.dumps({
            "model": lm.name, "base_fingerprint": lm.fingerprint, "device": str(lm.device),
            "threads": torch.get_num_threads(), "config": to_dict(config), "step": step,
            "n_train": len(train_examples), "n_val": len(val_examples), "elapsed_s": elapsed, "cpu_s": cpu,
            "seconds_per_step": elapsed / step if step else None, "cpu_seconds_per_step": cpu / step if step else None,
            "best": best, "history": history}, indent=2))
        if history:
            _plot(history, out_dir / PLOT_FILE, f"MEND on {lm.name}: {len(train_examples)} training edits, "
                                                 f"{len(val_examples)} validation edits, layers {list(network.layers)}")

    def checkpoint() -> None:
        save_network(network, last_file, step=step, **meta_common)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "best": best, "elapsed_s": elapsed,
                    "cpu_s": cpu}, state_file)
        write_curve()

    def run_validation(train_metrics: dict[str, float] | None) -> dict[str, float]:
        val = validate(lm, network, val_examples, config)
        history.append({"step": step, "elapsed_s": round(elapsed, 2), "val": val, "train": train_metrics})
        if val["loss"] < best["loss"]:
            best.update(loss=val["loss"], step=step)
            save_network(network, best_file, step=step, extra={"val": val}, **meta_common)
        log.info("step %d: val loss %.4f, edit NLL %.3f (before %.3f), loc KL %.4f, efficacy %.2f", step,
                 val["loss"], val["edit_nll"], val["pre_edit_nll"], val["loc_kl"], val.get("efficacy", float("nan")))
        return val

    if not history:
        run_validation(None)
        checkpoint()
    last_val = history[-1]["val"]
    running: dict[str, float] = {}
    n_running = 0
    while step < config.steps:
        started, started_cpu = time.perf_counter(), time.process_time()
        network.train()
        rows = example_rows(lm, _batch(train_examples, step, config.batch_size, config.seed))
        loss, metrics = edit_step(lm, network, rows, config, training=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(list(network.parameters()), config.grad_clip)
        if not torch.isfinite(grad_norm):
            raise LMEditError(f"MEND training diverged at step {step + 1} (non-finite gradient); lower lr or edit_lr")
        optimizer.step()
        step += 1
        elapsed += time.perf_counter() - started
        cpu += time.process_time() - started_cpu
        metrics["grad_norm"] = float(grad_norm)
        for key, value in metrics.items():
            running[key] = running.get(key, 0.0) + value
        n_running += 1
        if step % config.val_every == 0 or step == config.steps:
            last_val = run_validation({k: v / n_running for k, v in running.items()})
            running, n_running = {}, 0
        if step % config.checkpoint_every == 0 or step % config.val_every == 0 or step == config.steps:
            checkpoint()  # also at validation steps, so the saved state and the best network agree
        if progress is not None:
            progress(TrainEvent(step=step, total=config.steps, metrics={
                "loss": metrics["loss"], "edit_nll": metrics["edit_nll"], "loc_kl": metrics["loc_kl"],
                **{f"val_{k}": last_val[k] for k in ("loss", "edit_nll", "loc_kl", "efficacy") if k in last_val}}))
    write_curve()
    return {"out_dir": str(out_dir), "network": str(best_file), "best": dict(best), "steps": step,
            "seconds_per_step": elapsed / step if step else None,
            "cpu_seconds_per_step": cpu / step if step else None, "final": history[-1]["val"],
            "initial": history[0]["val"], "n_train": len(train_examples), "n_val": len(val_examples),
            "curve": str(out_dir / PLOT_FILE), "edit_lrs": network.edit_lrs.detach().tolist()}
