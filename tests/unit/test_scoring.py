"""lmedit.scoring: the one teacher-forced batch builder and the target scores computed on it."""

from __future__ import annotations

import pytest
import torch

from lmedit.errors import RequestError
from lmedit.scoring import score_targets, teacher_forced
from lmedit.tokens import prompt_ids, target_ids

PROMPTS = ["The Eiffel Tower is located in the city of", "Hello", "Steve Jobs founded"]
TARGETS = ["Rome", None, "Apple Computer"]


def test_teacher_forced_scores_each_target_token_at_the_position_before_it(tiny_llama):
    lm = tiny_llama
    tf = teacher_forced(lm, PROMPTS, TARGETS)
    p = [prompt_ids(lm, text) for text in PROMPTS]
    rome, apple = target_ids(lm, "Rome"), target_ids(lm, "Apple Computer")
    assert tf.ids == [p[0] + rome, p[1], p[2] + apple]
    assert tf.spans == [(0, len(rome)), (len(rome), 1), (len(rome) + 1, len(apple))]
    assert tf.rows == [0] * len(rome) + [1] + [2] * len(apple)
    assert tf.positions == ([len(p[0]) - 1 + j for j in range(len(rome))] + [len(p[1]) - 1]
                            + [len(p[2]) - 1 + j for j in range(len(apple))])
    assert tf.gold == rome + [-1] + apple  # a target-less row reads the next-token distribution, no gold
    for k, (row, pos, gold) in enumerate(zip(tf.rows, tf.positions, tf.gold)):
        if gold >= 0:
            assert tf.ids[row][pos + 1] == gold, k  # the logits at `pos` predict the token right after it

    dropped = teacher_forced(lm, PROMPTS, TARGETS, feed_last=False)
    assert dropped.ids == [p[0] + rome[:-1], p[1], p[2] + apple[:-1]]
    assert (dropped.rows, dropped.positions, dropped.gold) == (tf.rows, tf.positions, tf.gold)

    batch = tf.padded(lm)
    assert batch.input_ids.shape == (3, max(map(len, tf.ids)))
    assert batch.attention_mask.sum(1).tolist() == [len(s) for s in tf.ids]
    assert [row[:n].tolist() for row, n in zip(batch.input_ids, batch.lengths)] == tf.ids  # right-padded
    rows, positions, gold = tf.index(lm.device)
    assert gold.dtype == torch.long and rows.tolist() == tf.rows and positions.tolist() == tf.positions


def test_teacher_forced_refuses_unpaired_inputs(tiny_llama):
    with pytest.raises(RequestError, match="2 prompts but 1 targets"):
        teacher_forced(tiny_llama, PROMPTS[:2], TARGETS[:1])


def test_score_targets_equals_a_separate_full_forward_per_row(tiny_family_lm):
    # The batch is padded and its logits are taken at the scored positions only; each row alone, with every
    # position's logits, must give the same numbers (an off-by-one position or a padding leak would not).
    lm = tiny_family_lm
    prompts, targets = [PROMPTS[0], PROMPTS[2], "Hi"], ["Rome", "Apple Computer", "there you are"]
    scores = score_targets(lm, prompts, targets, batch_size=2)
    for prompt, target, score in zip(prompts, targets, scores):
        p, t = prompt_ids(lm, prompt), target_ids(lm, target)
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([p + t]), use_cache=False).logits[0].float()
        logp = torch.log_softmax(logits[len(p) - 1:len(p) - 1 + len(t)], dim=-1)
        gold = torch.tensor(t)
        assert score.n_tokens == len(t)
        assert score.logprob == pytest.approx(float(logp.gather(1, gold[:, None]).sum()), abs=1e-4)
        assert score.token_accuracy == pytest.approx(float((logp.argmax(-1) == gold).float().mean()))
