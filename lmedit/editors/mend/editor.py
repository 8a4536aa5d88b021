"""MEND, Model Editor Networks with Gradient Decomposition (Mitchell et al. 2021, arXiv:2110.11309).

Paper: "Fast Model Editing at Scale".

An edit is one forward and backward pass on the edit prompt followed by the trained editor network:
for each edited MLP down-projection W_l (default: the last three blocks, as in the paper) the
fine-tuning gradient of target_new's NLL is Σ_t δ_t u_tᵀ over the prompt's tokens, with u_t the layer's
input (`Site("mlp.key", l)`, ROME's key) and δ_t the gradient w.r.t. its output (`Site("mlp.out", l)`).
The network maps each (u_t, δ_t) to (ũ_t, δ̃_t) and the edit is ΔW_l = −α_l Σ_t δ̃_t ũ_tᵀ, returned as a
`WeightEdit` with low-rank factors (rank = number of tokens). Training: `lmedit train mend`
(`editors/mend/train.py`); the network: `editors/mend/network.py`.

This module also holds the two passes training shares with editing: `gradient_pieces` (u and δ at the
edited layers, by autograd on the captured outputs) and `edited_hidden` (a forward in which each batch
row sees its own edit, added as ΔW u on the layer's output: (W + ΔW) u = W u + ΔW u, so no weight is
copied or written).

Not handled: editing other weights than the MLP down-projections (MEND also edits the up-projections);
tokens that are special tokens (Gemma's <bos>) contribute no rank-one piece, since their activations do
not depend on the prompt and an edit there would reach every input.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmedit.config import to_dict
from lmedit.editors.base import Editor, ParamDelta, TrainEvent, WeightEdit, check_requests
from lmedit.editors.mend.config import MendConfig
from lmedit.editors.mend.network import MendNetwork, load_network, network_file
from lmedit.errors import EditFailedError, LMEditError
from lmedit.hooks import capture, patch, start_at
from lmedit.registry import editors
from lmedit.scoring import teacher_forced
from lmedit.tokens import Batch
from lmedit.types import EditRequest, Site

if TYPE_CHECKING:
    from lmedit.eval.records import EvalRecord
    from lmedit.models.load import LM

log = logging.getLogger(__name__)


# --- token rows -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scored:
    """Scored tokens of one kind of row: token k is `gold[k]`, predicted at (`rows[k]`, `positions[k]`).

    `seq[k]` numbers the scored sequence token k belongs to (0..n_seqs-1), so losses can average per
    sequence; `owner[k]` is the edit the row belongs to.
    """

    rows: torch.Tensor
    positions: torch.Tensor
    gold: torch.Tensor
    seq: torch.Tensor
    owner: torch.Tensor
    n_seqs: int

    def __len__(self) -> int:
        return int(self.gold.shape[0])


@dataclass(frozen=True)
class Rows:
    """Sequences run together (right-padded): `owner[r]` is the edit row r belongs to; tokens scored per kind.

    Kinds: "edit" (the edit prompt + target_new: its gradient makes the edit), "para" (paraphrases +
    target_new), "loc" (locality prompts + their answer: KL between base and edited), "true" (the edit
    prompt + target_true, for efficacy). `edit_tokens` are the (row, position) pairs of edit rows that
    contribute a rank-one piece: every real, non-special token.
    """

    batch: Batch
    owner: torch.Tensor
    scored: dict[str, Scored]
    edit_tokens: tuple[torch.Tensor, torch.Tensor]
    n_edits: int


@dataclass
class RowBuilder:
    """Collects rows: `add(kind, owner, prompt, answer)` appends the teacher-forced row prompt + answer[:-1] scoring
    every answer token; `build` tokenizes them all at once (`scoring.teacher_forced`)."""

    lm: LM
    kinds: list[str] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)

    def add(self, kind: str, owner: int, prompt: str, answer: str) -> None:
        self.kinds.append(kind)
        self.owners.append(owner)
        self.prompts.append(prompt)
        self.answers.append(answer)

    def build(self, n_edits: int) -> Rows:
        dev = self.lm.device
        tf = teacher_forced(self.lm, self.prompts, self.answers, feed_last=False)
        points: dict[str, list[tuple[int, int, int, int, int]]] = {}
        n_seqs: dict[str, int] = {}
        for kind, owner, (start, n) in zip(self.kinds, self.owners, tf.spans):
            seq = n_seqs.get(kind, 0)  # the row's number among the rows of its kind
            n_seqs[kind] = seq + 1
            points.setdefault(kind, []).extend((tf.rows[k], tf.positions[k], tf.gold[k], seq, owner)
                                               for k in range(start, start + n))
        scored = {kind: Scored(*(torch.tensor(c, device=dev) for c in zip(*pts)), n_seqs=n_seqs[kind])
                  for kind, pts in points.items()}
        special = set(self.lm.tokenizer.all_special_ids)
        tok_rows, tok_pos = [], []
        for row, kind in enumerate(self.kinds):
            if kind != "edit":
                continue
            for pos, token in enumerate(tf.ids[row]):
                if token not in special:
                    tok_rows.append(row)
                    tok_pos.append(pos)
        if not tok_rows:
            raise LMEditError("the edit prompt has no token besides special tokens")
        return Rows(batch=tf.padded(self.lm), owner=torch.tensor(self.owners, device=dev), scored=scored,
                    edit_tokens=(torch.tensor(tok_rows, device=dev), torch.tensor(tok_pos, device=dev)),
                    n_edits=n_edits)


def request_rows(lm: LM, requests: Sequence[EditRequest]) -> Rows:
    """One "edit" row per request: its filled prompt followed by target_new."""
    builder = RowBuilder(lm)
    for i, request in enumerate(requests):
        builder.add("edit", i, request.text, request.target_new)
    return builder.build(len(requests))


# --- forward passes -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tail:
    """Where a forward starts: block `layer`, with `resid` (batch, pos, d_model) the output of block `layer - 1`.

    Training runs the blocks before the first edited layer once per batch (they are frozen and the edit
    cannot reach them) and starts its several passes here.
    """

    layer: int
    resid: torch.Tensor


@torch.no_grad()
def tail_start(lm: LM, rows: Rows, layer: int) -> Tail | None:
    """Run `rows` up to block `layer - 1`; None when `layer` is 0 (nothing to skip)."""
    if layer == 0:
        return None
    site = Site("resid_out", layer - 1)
    with capture(lm, [site], stop_after=site) as acts:
        lm.model(**rows.batch.model_inputs(), use_cache=False)
    return Tail(layer, acts[site])


def run_hidden(lm: LM, rows: Rows, tail: Tail | None, fns: dict[Site, Any]) -> torch.Tensor:
    """The final-norm output (batch, pos, d_model) of a forward over `rows` with `fns` patched in (gradients flow)."""
    site = Site("final_norm")
    start = start_at(lm, tail.layer, tail.resid) if tail is not None else nullcontext()
    with start, patch(lm, fns), capture(lm, [site], stop_after=site, detach=False) as acts:
        lm.model(**rows.batch.model_inputs(), use_cache=False)
    return acts[site]


def log_probs(lm: LM, hidden: torch.Tensor, rows: Rows, kinds: Sequence[str]) -> dict[str, torch.Tensor]:
    """Log-softmax over the vocabulary at each kind's scored positions -> {kind: (n_scored, d_vocab)}, float32.

    One unembedding call for all kinds: with a large vocabulary (Gemma 3: 262k words) the call is bound by
    reading the unembedding matrix, not by the number of positions.
    """
    parts = [rows.scored[k] for k in kinds]
    h = torch.cat([hidden[p.rows, p.positions] for p in parts])
    logp = torch.log_softmax(lm.arch.logits_from_final(lm.model, h).float(), dim=-1)
    return dict(zip(kinds, logp.split([len(p) for p in parts])))


def sequence_nll(logp: torch.Tensor, scored: Scored) -> torch.Tensor:
    """Mean NLL of the gold tokens per scored sequence -> (n_seqs,)."""
    token_nll = -logp.gather(1, scored.gold[:, None])[:, 0]
    total = torch.zeros(scored.n_seqs, device=logp.device).index_add(0, scored.seq, token_nll)
    count = torch.zeros(scored.n_seqs, device=logp.device).index_add(0, scored.seq, torch.ones_like(token_nll))
    return total / count


@dataclass
class Pieces:
    """Per edited layer: u (n_tokens, d_in) and δ (n_tokens, d_out) at `Rows.edit_tokens`; `owner[t]` is token t's edit."""

    u: dict[int, torch.Tensor]
    delta: dict[int, torch.Tensor]
    owner: torch.Tensor
    edit_nll: torch.Tensor  # (n_edits,) pre-edit mean NLL of target_new per edit


def gradient_pieces(lm: LM, layers: Sequence[int], rows: Rows, tail: Tail | None = None,
                    keep: Sequence[str] = ()) -> tuple[Pieces, dict[str, torch.Tensor]]:
    """Inputs u and output gradients δ of each edited layer for the loss Σ_edits mean-token NLL(target_new).

    δ comes from `torch.autograd.grad` on the captured layer outputs; the first edited layer's output
    is made a leaf that requires grad (the frozen model computes no graph before it), later ones are
    already in the graph, so each δ is the full derivative through every later layer.

    Args:
        layers: edited blocks (ascending).
        rows: must contain "edit" rows; other rows ride along (their loss is not used).
        tail: start the forward there (see `tail_start`).
        keep: kinds of scored rows whose log-probs to return as well (detached), e.g. the base model's
            distribution on locality rows.

    Returns:
        (Pieces, {kind: log-probs (n_scored, d_vocab)} for `keep`).
    """
    keys: dict[int, torch.Tensor] = {}
    outs: dict[int, torch.Tensor] = {}

    def record_key(activation: torch.Tensor, site: Site) -> None:
        keys[site.layer] = activation.detach()  # type: ignore[index]

    def track_out(activation: torch.Tensor, site: Site) -> torch.Tensor | None:
        if activation.requires_grad:
            outs[site.layer] = activation  # type: ignore[index]
            return None
        leaf = activation.detach().requires_grad_(True)
        outs[site.layer] = leaf  # type: ignore[index]
        return leaf

    fns: dict[Site, Any] = {Site("mlp.key", l): record_key for l in layers}
    fns |= {Site("mlp.out", l): track_out for l in layers}
    with torch.enable_grad():
        hidden = run_hidden(lm, rows, tail, fns)
        logp = log_probs(lm, hidden, rows, ["edit", *keep])
        nll = sequence_nll(logp["edit"], rows.scored["edit"])
        grads = torch.autograd.grad(nll.sum(), [outs[l] for l in layers])
    tok_rows, tok_pos = rows.edit_tokens
    pieces = Pieces(u={l: keys[l][tok_rows, tok_pos] for l in layers},
                    delta={l: g[tok_rows, tok_pos].detach() for l, g in zip(layers, grads)},
                    owner=rows.owner[tok_rows], edit_nll=nll.detach())
    return pieces, {kind: logp[kind].detach() for kind in keep}


def per_edit_factors(network: MendNetwork, layers: Sequence[int], pieces: Pieces, n_edits: int, *,
                     update_stats: bool = False) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Each edit's factors, zero-padded to the largest token count.

    Returns:
        layer -> (left (n_edits, d_out, r), right (n_edits, d_in, r)).
    """
    out = {}
    for i, layer in enumerate(layers):
        left, right = network.factors(i, pieces.u[layer], pieces.delta[layer], update_stats=update_stats)
        counts = torch.bincount(pieces.owner, minlength=n_edits)
        width = int(counts.max())
        lefts, rights = [], []
        for e in range(n_edits):
            mine = pieces.owner == e
            pad = (0, width - int(counts[e]))
            lefts.append(torch.nn.functional.pad(left[:, mine], pad))
            rights.append(torch.nn.functional.pad(right[:, mine], pad))
        out[layer] = (torch.stack(lefts), torch.stack(rights))
    return out


def edited_hidden(lm: LM, rows: Rows, tail: Tail | None,
                  factors: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Final-norm output of a forward in which row r's edited layers compute (W + ΔW_{owner[r]}) u.

    ΔW u is added to the layer's output from the factors, batched over rows; gradients flow into the
    factors (and so into the editor network), never into the model.
    """
    keys: dict[int, torch.Tensor] = {}

    def record_key(activation: torch.Tensor, site: Site) -> None:
        keys[site.layer] = activation  # type: ignore[index]

    def add_edit(activation: torch.Tensor, site: Site) -> torch.Tensor:
        left, right = factors[site.layer]  # type: ignore[index]
        u = keys[site.layer]  # type: ignore[index]  # (batch, pos, d_in)
        coeff = torch.einsum("bpi,bir->bpr", u, right[rows.owner])  # (batch, pos, rank)
        return activation + torch.einsum("bpr,bor->bpo", coeff, left[rows.owner]).to(activation.dtype)

    fns: dict[Site, Any] = {Site("mlp.key", l): record_key for l in factors}
    fns |= {Site("mlp.out", l): add_edit for l in factors}
    return run_hidden(lm, rows, tail, fns)


# --- the editor -----------------------------------------------------------------------------------------

def identity_network(lm: LM, config: MendConfig) -> MendNetwork:
    """An untrained network (identity map, no statistics): its edit is one gradient step of size `edit_lr` per layer."""
    layers = config.resolve_layers(lm.n_layers)
    shapes = [tuple(lm.arch.weight(lm.model, l, "mlp_out").shape) for l in layers]
    torch.manual_seed(config.seed)
    network = MendNetwork(layers, shapes, rank=config.rank, n_hidden=config.n_hidden, edit_lr=config.edit_lr)
    return network.to(lm.device).eval()


@editors.register("mend")
class MendEditor(Editor[MendConfig]):
    """MEND (arXiv:2110.11309): a trained network turns the edit's gradient pieces into a low-rank weight edit."""

    config_class = MendConfig

    def __init__(self, config: MendConfig | None = None) -> None:
        super().__init__(config)
        self._loaded: tuple[tuple[str, float, str, str], MendNetwork, dict[str, Any]] | None = None

    def network(self, lm: LM) -> tuple[MendNetwork, dict[str, Any]]:
        """The editor network for `lm`: the checkpoint's (loaded once), or the identity if allowed.

        Raises:
            LMEditError: no checkpoint and `allow_untrained` is off; the checkpoint was trained on other weights.
            MissingFileError: (a FileNotFoundError) the checkpoint path holds no network.
        """
        if self.config.checkpoint is None:
            if not self.config.allow_untrained:
                raise LMEditError(
                    "MEND needs a trained editor network: train one with `lmedit train mend --model MODEL "
                    "--dataset counterfact --data TRAIN.json --out DIR` and pass `--set checkpoint=DIR` "
                    "(or set allow_untrained=true for the untrained network: one gradient step of size edit_lr)")
            return identity_network(lm, self.config), {"checkpoint": None, "step": 0}
        file = network_file(self.config.checkpoint)
        key = (str(file.resolve()), file.stat().st_mtime, lm.fingerprint, str(lm.device))
        if self._loaded is None or self._loaded[0] != key:
            network, meta = load_network(file, fingerprint=(lm.fingerprint, lm.weights_hash), model_name=lm.name,
                                         device=lm.device)
            if list(network.layers) and max(network.layers) >= lm.n_layers:
                raise LMEditError(f"the MEND network edits layer {max(network.layers)}, but {lm.name!r} has "
                                  f"{lm.n_layers} layers")
            log.info("MEND network from %s (trained %d steps on %s)", file, meta["step"], meta["base_model"])
            self._loaded = (key, network, {"checkpoint": str(file), "step": meta["step"]})
        return self._loaded[1], self._loaded[2]

    def edit(self, lm: LM, requests: Sequence[EditRequest]) -> WeightEdit:
        """Compute the MEND edit for `requests` (their rank-one pieces summed: rank = total number of tokens).

        The model's weights are not touched: u and δ come from one forward/backward pass with hooks.
        """
        requests = check_requests(requests)
        network, source = self.network(lm)
        layers = list(network.layers)
        for layer, shape in zip(layers, network.shapes):
            actual = tuple(lm.arch.weight(lm.model, layer, "mlp_out").shape)
            if actual != shape:
                raise LMEditError(f"the MEND network expects layer {layer}'s down-projection to be {shape}, "
                                  f"{lm.name!r} has {actual}")
        pieces, _ = gradient_pieces(lm, layers, request_rows(lm, requests))
        deltas: dict[str, ParamDelta] = {}
        norms = {}
        with torch.no_grad():
            for i, layer in enumerate(layers):
                left, right = network.factors(i, pieces.u[layer], pieces.delta[layer])
                if not (torch.isfinite(left).all() and torch.isfinite(right).all()):
                    raise EditFailedError(f"MEND produced a non-finite update at layer {layer}; the model is unchanged")
                p_left, p_right = lm.arch.factors_to_param_layout(left.float().contiguous(), right.float().contiguous())
                deltas[lm.arch.param_name(lm.model, layer, "mlp_out")] = ParamDelta(left=p_left, right=p_right)
                norms[layer] = float((left.double() @ right.double().T).norm())
        info = {"layers": layers, "n_tokens": int(pieces.owner.shape[0]), "pre_edit_nll": pieces.edit_nll.tolist(),
                "edit_lrs": network.edit_lrs.detach().tolist(), "update_norms": norms, **source}
        log.info("MEND edit of %d request(s) at layers %s: %d tokens, ‖ΔW‖ %s", len(requests), layers,
                 info["n_tokens"], ", ".join(f"{v:.3g}" for v in norms.values()))
        return WeightEdit(deltas=deltas, requests=requests, method="mend", config=to_dict(self.config),
                          base_fingerprint=lm.fingerprint, info=info)

    def fit(self, lm: LM, train: Sequence[EvalRecord], *, held_out: Sequence[EvalRecord] = (),
            out_dir: str | Path | None = None, exclude: Sequence[EvalRecord] = (), resume: bool = False,
            progress: Callable[[TrainEvent], None] | None = None) -> dict[str, Any]:
        """Meta-train the editor network on edit records (`editors/mend/train.py`); afterwards this editor uses it.

        Args:
            train: edit records (CounterFact/zsRE train splits).
            held_out: validation records; default: `val_size` records held out of `train`.
            out_dir: where checkpoints, the trained network and the validation curve go (required).
            exclude: records whose subjects must not be trained on (the evaluation set).
            resume: continue the run in `out_dir`.
            progress: called after every step.

        Returns:
            The training summary (initial/final/best validation metrics, seconds per step, paths).
        """
        from lmedit.editors.mend.train import train_mend

        if out_dir is None:
            raise LMEditError("MEND training writes checkpoints: give out_dir (--out DIR)")
        summary = train_mend(lm, self.config, train, out_dir=Path(out_dir), held_out=held_out, exclude=exclude,
                             resume=resume, progress=progress)
        self.config = dataclasses.replace(self.config, checkpoint=str(out_dir))
        self._loaded = None
        return summary
