"""The OpenAI servers a worker runs requests on, in its own process: vLLM's (:mod:`.vllm`) and the
simulator's (:mod:`.sim`), behind one Protocol (:mod:`.base`)."""
