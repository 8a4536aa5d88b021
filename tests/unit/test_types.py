import pytest

from lmedit.errors import RequestError
from lmedit.testing import tiny_lm
from lmedit.tokens import find_subject, subject_span, target_ids
from lmedit.types import EditRequest


def test_valid_request_fills_prompt():
    r = EditRequest("{} is located in", "The Eiffel Tower", "Rome", "Paris")
    assert r.text == "The Eiffel Tower is located in"
    assert EditRequest.from_dict(r.to_dict()) == r


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt="is located in", subject="X", target_new="Rome"), "exactly one"),
    (dict(prompt="{} and {}", subject="X", target_new="Rome"), "exactly one"),
    (dict(prompt="{} is {x}", subject="X", target_new="Rome"), "stray brace"),
    (dict(prompt="{} is in", subject="  ", target_new="Rome"), "subject is empty"),
    (dict(prompt="{} is in", subject="X", target_new=""), "target_new is empty"),
    (dict(prompt="{} is in", subject="X", target_new="Rome", target_true="Rome"), "equals target_true"),
])
def test_invalid_requests(kwargs, message):
    with pytest.raises(RequestError, match=message):
        EditRequest(**kwargs)


def test_from_dict_layouts():
    rome = {"prompt": "{} plays", "subject": "Messi", "target_new": {"str": "tennis"}, "target_true": {"str": "soccer"}}
    assert EditRequest.from_dict(rome) == EditRequest("{} plays", "Messi", "tennis", "soccer")
    easy = {"prompt": "Messi plays", "subject": "Messi", "target_new": "tennis"}
    assert EditRequest.from_dict(easy).prompt == "{} plays"
    with pytest.raises(RequestError, match="missing field"):
        EditRequest.from_dict({"prompt": "{} x"})
    with pytest.raises(RequestError, match="unknown field"):
        EditRequest.from_dict({"prompt": "{} x", "subject": "a", "target_new": "b", "tagret_true": "c"})


def test_subject_span_tiny_tokenizer():
    lm = tiny_lm("gpt2")
    toks = lambda text: lm.tokenizer.convert_ids_to_tokens(lm.tokenizer(text)["input_ids"])  # noqa: E731
    span = subject_span(lm, "{} is located in the city of", "The Eiffel Tower")
    assert span.first == 0
    assert "".join(toks("The Eiffel Tower is")[span.first:span.last + 1]).replace("Ġ", " ") == "The Eiffel Tower"
    span = subject_span(lm, "The mother tongue of {} is", "Danielle Darrieux")
    pieces = toks("The mother tongue of Danielle Darrieux is")
    assert "".join(pieces[span.first:span.last + 1]).replace("Ġ", " ").strip() == "Danielle Darrieux"
    assert pieces[span.last + 1] == "Ġis"
    with pytest.raises(RequestError, match="does not occur"):
        find_subject(lm, "The Louvre is in", "Eiffel")
    assert target_ids(lm, "Paris") == lm.tokenizer(" Paris", add_special_tokens=False)["input_ids"]
