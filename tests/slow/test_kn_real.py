"""Knowledge neurons and the KN editor on the default model (Dai et al. 2021, arXiv:2104.08696). Slow: real weights."""


import pytest

import lmedit
from lmedit.editors import get_editor
from lmedit.neurons import find_knowledge_neurons
from lmedit.scoring import score_targets
from lmedit.stats import StatsCache
from lmedit.settings import CONFIG_ROOT

pytestmark = pytest.mark.slow
CONFIG = CONFIG_ROOT / "kn" / "gemma3-270m.yaml"

EIFFEL = lmedit.EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")


def test_gemma_eiffel_tower_neurons_and_edit(gemma, tmp_path):
    # Attribution: P(" Paris") is high, and neurons pass t = 0.2 in both prompts of the fact.
    prompts = [EIFFEL.text, "The Eiffel Tower stands in the city of"]
    found = find_knowledge_neurons(gemma, prompts, "Paris", threshold=0.2, share=0.7, max_neurons=5)
    assert all(a.prob > 0.3 for a in found.attributions), [a.prob for a in found.attributions]
    assert 1 <= len(found.neurons) <= 5
    assert all(count == 2 for count in (found.counts()[n] for n in found.neurons))
    assert all(float(found.scores[n]) > 0 for n in found.neurons)

    # The edit (the committed config, without the prefixes and contrast facts, to stay under a minute).
    editor = get_editor("kn", CONFIG, ["n_prefixes=0", "refine_facts=0"])
    editor.cache = StatsCache(tmp_path)
    before = score_targets(gemma, [EIFFEL.text] * 2, ["Rome", "Paris"])
    edit = editor.edit(gemma, [EIFFEL])
    assert len(edit.info["requests"][0]["neurons"]) == 3
    with edit.applied(gemma):
        after = score_targets(gemma, [EIFFEL.text] * 2, ["Rome", "Paris"])
    assert after[0].logprob > before[0].logprob + 1.0, "log P(Rome) should rise"
    assert after[1].logprob < before[1].logprob - 1.0, "log P(Paris) should fall"
