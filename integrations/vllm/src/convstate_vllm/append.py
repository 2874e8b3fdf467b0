"""The append rule: where a rendered conversation may be cut so that the tokens of the whole are the
tokens of the part before the cut followed by the tokens of the part after it.

A Hugging Face fast tokenizer first splits its input at added tokens (`<|im_start|>`, `<|im_end|>`, ...)
and only then normalizes, pre-tokenizes and runs BPE on each piece between them. So for a cut at
position `at` of `text`:

    encode(text) == encode(text[:at]) + encode(text[at:])

holds when (1) `text[at:]` starts with an added token, so the piece before the cut ends at the cut in
both encodings, and (2) no added token occurs across the cut, so the splitting of `text[:at]` is the same
alone and inside `text`. Added tokens that look at their neighbours (`lstrip`, `single_word`) or that
are matched after normalization break the argument; a tokenizer with any of them is refused whole.

Everything here is pure: `Boundaries` is built once from the tokenizer's added tokens, and answers with
a reason (a `NotAppendable`) whenever it cannot prove a cut.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


class NotAppendable(Exception):
    """A cut that cannot be proven token-exact; the message says why (never user text)."""


@dataclass(frozen=True, slots=True)
class AddedToken:
    content: str
    lstrip: bool = False
    single_word: bool = False
    normalized: bool = False


class Boundaries:
    def __init__(self, added: Iterable[AddedToken], *, has_normalizer: bool) -> None:
        tokens = [token for token in added if token.content]
        self.unproven: str | None = None
        for token in tokens:
            if token.lstrip or token.single_word:
                self.unproven = "the tokenizer has added tokens that absorb or test their neighbours"
            elif token.normalized and has_normalizer:
                self.unproven = "the tokenizer matches added tokens after normalization"
        if not tokens:
            self.unproven = "the tokenizer has no added tokens to cut at"
        # Longest first: at one position the tokenizer takes the longest added token.
        self._contents = sorted({token.content for token in tokens}, key=len, reverse=True)
        self._longest = max((len(content) for content in self._contents), default=0)
        self._pattern = re.compile("|".join(re.escape(content) for content in self._contents) or "(?!)")

    def check(self, text: str, at: int) -> None:
        """Raise NotAppendable unless encode(text) == encode(text[:at]) + encode(text[at:])."""
        if self.unproven is not None:
            raise NotAppendable(self.unproven)
        if at == len(text):
            return
        if not any(text.startswith(content, at) for content in self._contents):
            raise NotAppendable("the new part of the render does not start with an added token")
        # Any added token occurring across the cut (starting before it, ending after it) could be the
        # one the tokenizer matches there.
        for content in self._contents:
            start = text.find(content, max(0, at - len(content) + 1), at + len(content) - 1)
            if start != -1 and start < at:
                raise NotAppendable("an added token spans the end of the cached prefix")

    def last_cut(self, text: str, lowest: int, highest: int) -> int | None:
        """The largest proven cut in [lowest, highest], or None: where an added token starts."""
        if self.unproven is not None:
            return None
        window = 256
        while True:
            start = max(lowest, highest - window)
            starts = [
                match.start()
                for match in self._pattern.finditer(text, start, highest + self._longest)
                if match.start() <= highest
            ]
            for candidate in reversed(starts):
                try:
                    self.check(text, candidate)
                except NotAppendable:
                    continue
                return candidate
            if start == lowest:
                return None
            window *= 4
