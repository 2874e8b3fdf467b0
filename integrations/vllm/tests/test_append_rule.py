"""The cut conditions on their own (no tokenizer): where a cut is proven, where it is refused and why."""

from __future__ import annotations

import pytest

from convstate_vllm.append import AddedToken, Boundaries, NotAppendable

CHATML = Boundaries([AddedToken("<|im_start|>"), AddedToken("<|im_end|>")], has_normalizer=False)


def test_a_cut_before_an_added_token_is_proven() -> None:
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    CHATML.check(text, text.index("<|im_start|>assistant"))
    CHATML.check(text, len(text))  # nothing after the cut


@pytest.mark.parametrize("at", [1, 5, 17, 18])
def test_a_cut_in_plain_text_is_refused(at: int) -> None:
    with pytest.raises(NotAppendable, match="does not start with an added token"):
        CHATML.check("<|im_start|>user\nhello there\n", at)


def test_an_added_token_across_the_cut_is_refused() -> None:
    # "AB" starts before the cut and ends after it: the tokenizer matches it, not "BC".
    overlapping = Boundaries([AddedToken("AB"), AddedToken("BC")], has_normalizer=False)
    with pytest.raises(NotAppendable, match="spans"):
        overlapping.check("xABC", 2)
    overlapping.check("xAzBC", 3)


@pytest.mark.parametrize(
    ("token", "normalizer", "why"),
    [
        (AddedToken("<s>", lstrip=True), False, "absorb or test"),
        (AddedToken("<s>", single_word=True), False, "absorb or test"),
        (AddedToken("<s>", normalized=True), True, "after normalization"),
    ],
)
def test_tokenizers_whose_cuts_cannot_be_proven(token: AddedToken, normalizer: bool, why: str) -> None:
    boundaries = Boundaries([AddedToken("<|im_end|>"), token], has_normalizer=normalizer)
    assert boundaries.unproven is not None and why in boundaries.unproven
    with pytest.raises(NotAppendable):
        boundaries.check("a<|im_end|>", 1)
    assert boundaries.last_cut("a<|im_end|>", 0, 1) is None


def test_no_added_tokens_no_cuts() -> None:
    assert Boundaries([], has_normalizer=False).unproven is not None
    # A normalized added token is fine when there is no normalizer to apply first.
    assert Boundaries([AddedToken("<s>", normalized=True)], has_normalizer=False).unproven is None


def test_the_last_cut_is_the_start_of_the_last_added_token_in_range() -> None:
    text = "<|im_start|>user\nhi<|im_end|>\n" + "word " * 200 + "<|im_start|>assistant\n"
    last = text.rindex("<|im_start|>")
    assert CHATML.last_cut(text, 0, len(text)) == last
    assert CHATML.last_cut(text, 0, last - 1) == text.index("<|im_end|>")
    assert CHATML.last_cut(text, text.index("<|im_end|>") + 1, last - 1) is None
