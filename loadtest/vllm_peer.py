"""The vLLM peer of bench_engine.py: run by a vLLM virtualenv's Python, never imported by Sluice.

    VENV/bin/python loadtest/vllm_peer.py WORKLOAD.json

WORKLOAD.json holds {"model", "dtype", "prompts": [[token ids]], "output_lens": [n],
"enable_prefix_caching"}. Every prompt runs greedy with EOS ignored, as in Sluice's run. Prints
one JSON line: {"seconds", "output_tokens", "startup_seconds", "version"}. Only the standard
library and vLLM are imported, so the script runs in a venv that has nothing of Sluice's.
"""

from __future__ import annotations

import json
import sys
import time


def main(path: str) -> None:
    with open(path) as f:
        spec = json.load(f)
    started = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=spec["model"],
        dtype=spec["dtype"],
        seed=0,
        enable_prefix_caching=spec["enable_prefix_caching"],
    )
    startup = time.perf_counter() - started
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in spec["output_lens"]]
    warm_up = SamplingParams(temperature=0.0, max_tokens=2)
    llm.generate([TokensPrompt(prompt_token_ids=[1, 5, 6, 7])], warm_up, use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    result = {"seconds": seconds, "output_tokens": produced, "startup_seconds": startup}
    print(json.dumps(result | {"version": vllm.__version__}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
