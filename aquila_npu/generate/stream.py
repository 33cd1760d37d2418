"""Streaming a reply to the terminal as its tokens arrive.

Tokens do not map to whole characters (a CJK character can take several byte-level tokens), and a stop string
can arrive split across tokens, so ``TextStream`` re-decodes the reply so far and releases only text that is final:
nothing that ends in an incomplete character, nothing that could still turn out to start a stop string.
"""

from __future__ import annotations

from typing import Callable, Sequence


class TextStream:
    """Feed token ids one at a time; ``write`` receives the new final text. ``close()`` flushes the rest."""

    def __init__(self, detokenize: Callable[[list[int]], str], write: Callable[[str], None],
                 stop: Sequence[str] = (), strip_leading_space: bool = False) -> None:
        self.detokenize, self.write, self.stop = detokenize, write, tuple(s for s in stop if s)
        self.strip_leading_space = strip_leading_space
        self.tokens: list[int] = []
        self.sent = 0  # characters of the (cleaned) text already written
        self.stopped = False

    def _clean(self, text: str) -> str:
        if self.strip_leading_space and text.startswith(" "):
            text = text[1:]
        for stop in self.stop:
            if stop in text:
                text, self.stopped = text[:text.index(stop)], True
        return text

    def feed(self, token: int) -> None:
        if self.stopped:
            return
        self.tokens.append(token)
        text = self._clean(self.detokenize(self.tokens))
        if self.stopped:
            self._emit(text)
            return
        final = len(text)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character
            final = len(text.rstrip("\ufffd"))
        final -= self._held_back(text[:final])
        self._emit(text[:final])

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _emit(self, text: str) -> None:
        if len(text) > self.sent:
            self.write(text[self.sent:])
            self.sent = len(text)

    def close(self) -> None:
        if not self.stopped:
            self._emit(self._clean(self.detokenize(self.tokens)))
