"""One request's text as its tokens arrive, a token at a time.

`Generator.generate` and `Generator.stream` run a whole generation per call; the worker feeds each
job the tokens the engine (palm.inference.engine) makes for it, step by step, so that jobs can join and leave
between two steps. `Row` is the per-job bookkeeping (end of sequence, stop strings, text safe to
show), with the generator's results: the tests compare the server's outputs with the generator's own.
"""

from __future__ import annotations

from ..inference.generate import Completion, Generator, cut_at_stop, printable, settled


class Row:
    """The tokens and text of one row; `finish` is None until eos, a stop string or `close()`."""

    def __init__(self, generator: Generator, stops: list[str], streamed: bool):
        self.tokenizer, self.eos_ids = generator.tokenizer, generator.eos_ids
        self.stops, self.streamed = stops, streamed
        self.ids: list[int] = []
        self.text = ""  # the decoded text, cut at the first stop string
        self.emitted = 0  # characters of it already handed out (streams only)
        self.finish: str | None = None

    def feed(self, token: int) -> str:
        """Take the next token; the new text a stream may show now ("" while it is held back)."""
        if token in self.eos_ids:
            self.finish = "stop"
            return ""
        self.ids.append(token)
        self.text, stopped = cut_at_stop(self.tokenizer.decode(self.ids), self.stops)
        if stopped:
            self.finish = "stop"
            return ""
        if not self.streamed:
            return ""
        # Not a trailing incomplete character, nor a tail that may yet grow into a stop string.
        return self._emit(min(printable(self.text, self.stops), settled(self.tokenizer, self.ids)))

    def close(self) -> str:
        """The end (the budget is spent, if no stop came first): the text a stream still holds back."""
        if self.finish is None:
            self.finish = "length"
        return self._emit(len(self.text)) if self.streamed else ""

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        piece, self.emitted = self.text[self.emitted : upto], upto
        return piece

    def completion(self, prompt_tokens: int) -> Completion:
        return Completion(self.text, self.ids, prompt_tokens, self.finish or "length")
