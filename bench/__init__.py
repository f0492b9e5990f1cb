"""mgpu's benchmarks: the load generator, the serving-path benchmark, the chaos benchmark and the
balancing comparison, with the processes they start.  Not part of the runtime image (the Dockerfile
copies common, gateway, gpu_worker and ops only); ``mgpu bench`` and ``mgpu chaos`` say so there.

One job per module:

* :mod:`bench.workload`: what a run sends and when (config, token mix, arrival schedule)
* :mod:`bench.client`: the aiohttp client and how a reply (JSON or SSE) is read and classified
* :mod:`bench.rawhttp`: the hand-written HTTP/1.1 client (``--client raw``)
* :mod:`bench.loadgen`: the runner (open / closed loop, in-process, ``--procs`` shards)
* :mod:`bench.result`: samples and their summary; :mod:`bench.stats`: the one percentile
* :mod:`bench.report`: the load generator's tables
* :mod:`bench.cli` (``python -m bench``), :mod:`bench.dummy` (``--serve-dummy``)
* :mod:`bench.fleet`: the one launcher of local fleets (redis-server, workers, gateways; nginx over sim servers)
* :mod:`bench.core`, :mod:`bench.chaos`, :mod:`bench.compare`: the benchmark programs
* :mod:`bench.clientcost`: the raw client's CPU per request against aiohttp's (why :mod:`bench.rawhttp` exists)
* :mod:`bench.peers`: mgpu against vllm-router, sglang-router and a sim server called directly
* :mod:`bench.scale`: Redis and CPU cost as workers (1, 8, 32) and gateways (1 to 4) are added
* :mod:`bench.floors`: one Redis round trip and one bare ASGI request: the least a request can cost here
* :mod:`bench.gpu_probe` (run by ``bench/gpu_check.sh``): NVML and a decode-like step on a lent GPU machine
"""
