"""Time to first token with a long shared system prompt on the CPU: KV-cache reuse on vs off, same run.

    python benchmarks/cpu_prefix_reuse.py [--rules 16] [--out benchmarks/results/cpu_prefix_reuse.json]

SmolLM2-135M-Instruct (float32, the built-in GGUF). Every request is one long system prompt
followed by a short question, and generates one token, so its latency is its time to first token
(the engine's arrival -> first token, from return_perf_metrics). Both engines first serve the
same questions under warm-up system prompts of the same length, so every shape they need is
compiled before timing (`compiled_while_timing` in the JSON checks it).

  sequential: the questions one after another under a new system prompt, alternating between
      the two engines. The first request finds nothing cached (cold); with reuse on, the next
      ones compute only their question (and the system prompt's last, partial page).
  burst: the questions all at once under another new system prompt. The first step prefills
      the first prompt (and a chunk of the next); requests admitted in later steps find its pages.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from common import cpu_machine, default_out, write_json

QUESTIONS = [
    "How do I reset my password?",
    "Can I change the delivery address of an order that has shipped?",
    "What is your refund policy for opened items?",
    "Do you ship to Canada?",
    "My package arrived damaged. What should I do?",
    "How long does a bank transfer refund take?",
    "Can I combine two discount codes?",
    "Where can I find my invoice?",
]
WARMUP_QUESTIONS = ["Hello!", "What are your opening hours?", "Is there a student discount?"]


# System prompts differ only in their tenant number (same token count, so warm-up and timed requests
# share shape buckets); each tenant's prompt is new to the cache.
WARMUP_TENANTS, SEQUENTIAL_TENANT, BURST_TENANT = (1001, 1002), 2001, 2002


def system_prompt(tenant: int, rules: int, company: str = "Acme") -> str:
    lines = [f"Tenant {tenant}. You are the customer support assistant of {company}. Answer politely and briefly, "
             "and follow these rules in order of priority:"]  # fmt: skip
    topics = ["orders", "refunds", "shipping", "accounts", "invoices", "discounts", "warranties", "returns"]
    for i in range(rules):
        topic = topics[i % len(topics)]
        lines.append(f"Rule {i + 1}: for questions about {topic}, first check the customer's {topic} history, "
                     f"quote the relevant {company} policy section {i + 1}, and never promise what policy {i + 1} "
                     "does not allow.")  # fmt: skip
    return "\n".join(lines) + "\n\nCustomer question: "


def ttft(out) -> float:
    timing = out.outputs[0].request_perf_metrics["timing_metrics"]
    return timing["first_token_time"] - timing["arrival_time"]


def measure(path: Path, rules: int) -> list[dict]:
    """Both engines live side by side; sequential requests alternate between them, so a change in
    the machine's load affects both alike."""
    from jaxllm import KvCacheConfig, LLM, SamplingParams

    one = SamplingParams(max_tokens=1, return_perf_metrics=True)
    engines = {reuse: LLM(model=str(path), dtype="float32", max_batch_size=8, max_num_tokens=1024,
                          kv_cache_config=KvCacheConfig(enable_block_reuse=reuse)) for reuse in (False, True)}  # fmt: skip
    try:
        lengths = {len(engines[True].tokenizer.encode(system_prompt(t, rules)))
                   for t in (*WARMUP_TENANTS, SEQUENTIAL_TENANT, BURST_TENANT)}  # fmt: skip
        if len(lengths) != 1:
            raise RuntimeError(f"the tenants' system prompts tokenize to different lengths {sorted(lengths)}")
        for llm in engines.values():  # compiles the full-prompt, question-only and burst shapes
            for question in QUESTIONS:
                llm.generate(system_prompt(WARMUP_TENANTS[0], rules) + question, one, use_tqdm=False)
            llm.generate([system_prompt(WARMUP_TENANTS[1], rules) + q for q in QUESTIONS], one, use_tqdm=False)
        compiled = {reuse: llm._engine.runner.num_compilations for reuse, llm in engines.items()}
        sequential = {reuse: [] for reuse in engines}
        for question in QUESTIONS:
            for reuse, llm in engines.items():
                prompt = system_prompt(SEQUENTIAL_TENANT, rules) + question
                sequential[reuse].append(ttft(llm.generate(prompt, one, use_tqdm=False)))
        rows = []
        for reuse, llm in engines.items():
            started = time.perf_counter()
            prompts = [system_prompt(BURST_TENANT, rules) + q for q in QUESTIONS]
            burst = [ttft(o) for o in llm.generate(prompts, one, use_tqdm=False)]
            burst_wall = time.perf_counter() - started
            bm, runner = llm._engine.block_manager, llm._engine.runner
            rows.append({
                "enable_block_reuse": reuse,
                "system_prompt_tokens": next(iter(lengths)),
                "sequential_first_ttft_s": sequential[reuse][0],
                "sequential_rest_median_ttft_s": statistics.median(sequential[reuse][1:]),
                "sequential_ttft_s": sequential[reuse],
                "burst_mean_ttft_s": statistics.mean(burst),
                "burst_wall_s": burst_wall,
                "reused_blocks": bm.num_reused,
                "missed_blocks": bm.num_missed,
                "cache_hit_rate": bm.hit_rate,
                "compilations": runner.num_compilations,
                "compiled_while_timing": runner.num_compilations - compiled[reuse],
            })  # fmt: skip
        return rows
    finally:
        for llm in engines.values():
            llm.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=16, help="system prompt length: rules of ~35 tokens each")
    parser.add_argument("--out", default=os.path.join(default_out(), "cpu_prefix_reuse.json"))
    args = parser.parse_args()
    from jaxllm.checkpoints.builtin import fetch

    path = fetch("smollm2")
    load_before = os.getloadavg()[0]
    rows = measure(path, args.rules)
    result = {
        "machine": cpu_machine(),
        "load_average_1min": [load_before, os.getloadavg()[0]],  # before and after: other work on the machine
        "date": time.strftime("%Y-%m-%d"),
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF, float32, page size 32",
        "questions": len(QUESTIONS),
        "rows": rows,
    }
    write_json(args.out, result)
    off, on = rows
    print(f"\nSmolLM2-135M float32, {off['system_prompt_tokens']}-token shared system prompt, {len(QUESTIONS)} "
          f"questions, on {result['machine']}; time to first token (s)")  # fmt: skip
    print(f"{'':>28} | {'reuse off':>9} | {'reuse on':>9} | {'speedup':>7}")
    for label, key in (("sequential: first (cold)", "sequential_first_ttft_s"),
                       ("sequential: rest (median)", "sequential_rest_median_ttft_s"),
                       ("burst of 8: mean", "burst_mean_ttft_s"), ("burst of 8: wall", "burst_wall_s")):  # fmt: skip
        print(f"{label:>28} | {off[key]:>9.3f} | {on[key]:>9.3f} | {off[key] / on[key]:>6.2f}x")
    print(f"reuse on: {on['reused_blocks']} pages reused, {on['missed_blocks']} missed, hit rate {on['cache_hit_rate']:.2f}; "
          f"1-minute load average {result['load_average_1min'][0]:.1f} before, {result['load_average_1min'][1]:.1f} after")


if __name__ == "__main__":
    main()
