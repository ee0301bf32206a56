"""The vLLM peer of bench_engine.py: run by a vLLM virtualenv's Python, never imported by Sluice.

    VENV/bin/python loadtest/vllm_peer.py WORKLOAD.json

WORKLOAD.json holds {"model", "dtype", "prompts": [[token ids]], "output_lens": [n],
"enable_prefix_caching"}, and for LoRA runs "lora": {"adapters": {name: PEFT folder},
"request_adapters": [name or null per prompt], "max_loras", "max_lora_rank"} (each request
passes its adapter's LoRARequest). Every prompt runs greedy with EOS ignored, as in Sluice's run. Prints
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

    lora = spec.get("lora")
    options = {}
    if lora:
        options = {
            "enable_lora": True,
            "max_loras": lora["max_loras"],
            "max_lora_rank": lora["max_lora_rank"],
        }
    llm = LLM(
        model=spec["model"],
        dtype=spec["dtype"],
        seed=0,
        enable_prefix_caching=spec["enable_prefix_caching"],
        **options,
    )
    startup = time.perf_counter() - started
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in spec["output_lens"]]
    warm_up = SamplingParams(temperature=0.0, max_tokens=2)
    llm.generate([TokensPrompt(prompt_token_ids=[1, 5, 6, 7])], warm_up, use_tqdm=False)
    requests = None
    if lora:
        from vllm.lora.request import LoRARequest

        by_name = {
            name: LoRARequest(name, index + 1, path)
            for index, (name, path) in enumerate(lora["adapters"].items())
        }
        requests = [by_name[name] if name else None for name in lora["request_adapters"]]
        # warm-up: every adapter loaded once, as Sluice's run warms its slots
        llm.generate(
            [TokensPrompt(prompt_token_ids=[1, 5, 6, 7])] * len(by_name),
            warm_up,
            use_tqdm=False,
            lora_request=list(by_name.values()),
        )
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=requests)
    seconds = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    result = {"seconds": seconds, "output_tokens": produced, "startup_seconds": startup}
    print(json.dumps(result | {"version": vllm.__version__}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
