"""Prompt-length checks at the gateway, so that an over-long prompt is refused before it is queued.

Workers publish how their model counts tokens (``tokenizer`` in the ``models`` hash):

* ``sim``: words, as the simulator counts them;
* a model folder path: that model's ``tokenizer.json`` (the ``tokenizers`` library), loaded in the
  background the first time the model is seen;
* anything else, or a tokenizer not loaded yet: no gateway check.

It counts the texts it is given (a chat's message contents, without the template, the tools or any
image): a lower bound of the prompt, so it never refuses a prompt the engine would take.

The worker always checks exactly (and answers 400), so this is a fast path, not the only guard.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

log = logging.getLogger("mgpu.gateway.tokens")


class PromptCounter:
    def __init__(self) -> None:
        self._tokenizers: dict[str, Any] = {}
        self._loading: set[str] = set()
        self._lock = threading.Lock()

    def count(self, spec: str, texts: list[str], *, chat: bool) -> int | None:
        """Tokens in ``texts`` (one prompt, or a chat's contents: summed), or None when it cannot count;
        for several completion prompts (``chat`` off), the longest."""
        if not texts:
            return None
        if spec == "sim":
            counts = [len(t.split()) for t in texts]
        else:
            tok = self._tokenizers.get(spec)
            if tok is None:
                self._load_later(spec)
                return None
            counts = [len(tok.encode(t, add_special_tokens=False).ids) for t in texts]
        return sum(counts) if chat else max(counts)

    def _load_later(self, spec: str) -> None:
        path = os.path.join(spec, "tokenizer.json")
        with self._lock:
            if spec in self._loading or not os.path.isfile(path):
                return
            self._loading.add(spec)
        threading.Thread(target=self._load, args=(spec, path), name="tokenizer-load", daemon=True).start()

    def _load(self, spec: str, path: str) -> None:
        try:
            from tokenizers import Tokenizer

            self._tokenizers[spec] = Tokenizer.from_file(path)
            log.info("prompt lengths checked at the gateway with %s", path)
        except Exception as exc:  # no tokenizers library, unreadable file: the worker checks
            log.info("no gateway-side prompt check for %s: %s", spec, exc)
