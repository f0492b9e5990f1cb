"""Prompt-length checks at the gateway, so that an over-long prompt is refused before it is queued.

Workers publish how their model counts tokens (``tokenizer`` in the ``models`` hash):

* ``sim``: words, exactly as the simulator counts them;
* a model folder path: that model's ``tokenizer.json`` (the ``tokenizers`` library), loaded in the
  background the first time the model is seen.  For chat it counts the message contents only, a
  lower bound of the templated prompt, so it never refuses a prompt the engine would take;
* anything else, or a tokenizer not loaded yet: no gateway check.

The worker always checks exactly (and answers 400), so this is a fast path, not the only guard.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from common.prompts import sim_prompt_tokens

log = logging.getLogger("mgpu.gateway.tokens")


class PromptCounter:
    def __init__(self) -> None:
        self._tokenizers: dict[str, Any] = {}
        self._loading: set[str] = set()
        self._lock = threading.Lock()

    def count(self, spec: str, prompt: str | None, messages: list[dict[str, str]] | None) -> int | None:
        if spec == "sim":
            return sim_prompt_tokens(prompt, messages)
        tok = self._tokenizers.get(spec)
        if tok is None:
            self._load_later(spec)
            return None
        if messages is not None:
            return sum(len(tok.encode(m.get("content", ""), add_special_tokens=False).ids) for m in messages)
        return len(tok.encode(prompt or "", add_special_tokens=False).ids)

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
