"""Quality of --torchao-config on the embedded SmolLM2-135M: quantized vs unquantized logits.

For each of 50 fixed prompts, one prefill with the logits of every position; reports top-1
next-token agreement (every position, and the last position of each prompt only) and the mean
KL(unquantized || quantized) over all positions. Runs on the CPU (int4 is emulated there with the
same numbers as the GPU kernels).

    PYTHONPATH=. .venv/bin/python benchmarks/quant_quality.py --config int4wo-128 \\
        --out benchmarks/results/quant_quality_int4wo-128.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "In 1969, the first humans to walk on the Moon were",
    "The quick brown fox jumps over the",
    "Photosynthesis is the process by which plants",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "The largest planet in our solar system is",
    "Once upon a time, in a small village by the sea, there lived",
    "To make a cup of tea, first you need to",
    "The three primary colors are red, blue and",
    "Albert Einstein is best known for his theory of",
    "The Great Wall of China was built to",
    "import numpy as np\n\narr = np.zeros((3, 4))\nprint(arr.",
    "The human heart has four chambers: two atria and two",
    "Shakespeare wrote many famous plays, including Hamlet, Macbeth and",
    "The speed of light in a vacuum is approximately",
    "A haiku is a short poem with three lines of five, seven and",
    "The main ingredients of bread are flour, water, yeast and",
    "Machine learning is a field of computer science that",
    "The French Revolution began in the year",
    "My favourite way to spend a rainy Sunday afternoon is",
    "The chemical symbol for gold is",
    "SELECT name, age FROM users WHERE",
    "The Amazon rainforest is home to",
    "Dear hiring manager, I am writing to apply for the position of",
    "The mitochondria is often called the powerhouse of the",
    "In mathematics, a prime number is a number that",
    "The Eiffel Tower is located in",
    "Climate change is caused mainly by",
    "The best advice I ever received was",
    "for i in range(10):\n    print(",
    "Mount Everest is the highest mountain in the world, with a height of",
    "The theory of evolution by natural selection was proposed by",
    "A balanced diet should include fruits, vegetables,",
    "The Pacific Ocean is the largest ocean on Earth and covers",
    "Question: What is 12 times 12?\nAnswer:",
    "The stock market crashed in 1929, leading to",
    "Bees are important for the environment because they",
    "The Mona Lisa was painted by",
    "In the morning, I like to drink a cup of coffee and",
    "The internet was originally developed as a project of",
    "Translate to French: 'Good morning, how are you?'\nFrench:",
    "The Roman Empire fell in the year",
    "A good night's sleep is important because",
    "The planet closest to the Sun is",
    "Python is a popular programming language because",
    "The first step in solving a quadratic equation is to",
    "Dogs are often called man's best friend because",
    "The Industrial Revolution started in Britain in the",
    "User: Can you recommend a good book to read?\nAssistant:",
]


def build_runner():
    from edgelm.model_config import ModelConfig
    from edgelm.model_executor.model_runner import ModelRunner
    from edgelm.model_loader.resolve import resolve_model
    from edgelm.server_args import ServerArgs

    args = ServerArgs(device="cpu", max_total_tokens=2048, max_running_requests=4)
    config = ModelConfig.load(resolve_model(None), args.dtype, "cpu", args.context_length)
    return ModelRunner(args, config, "cpu"), config


def tokenizer_for(config):
    from transformers import AutoTokenizer

    src = config.source
    return AutoTokenizer.from_pretrained(src.directory, gguf_file=src.gguf_file)


@torch.no_grad()
def all_logits(runner, token_lists: list[list[int]]) -> list[torch.Tensor]:
    """Logits [len(prompt), vocab] (float32) of each prompt, one prefill each."""
    from edgelm.model_executor.forward_batch import ForwardBatch

    out = []
    for ids in token_lists:
        runner.allocator.clear()
        runner.req_to_token_pool.clear()
        req = runner.req_to_token_pool.alloc()
        slots = runner.allocator.alloc(len(ids))
        runner.req_to_token_pool.write(req, 0, slots)
        batch = ForwardBatch.for_extend(ids, [req], [0], [len(ids)], slots, "cpu", return_all_logits=True)
        out.append(runner.forward(batch).float())
    return out


def compare(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict:
    agree = total = 0
    last_agree = 0
    kl_sum = 0.0
    for r, g in zip(ref, got):
        agree += int((r.argmax(-1) == g.argmax(-1)).sum())
        total += r.shape[0]
        last_agree += int(r[-1].argmax() == g[-1].argmax())
        lp_r, lp_g = torch.log_softmax(r, -1), torch.log_softmax(g, -1)
        kl_sum += float((lp_r.exp() * (lp_r - lp_g)).sum())
    return {"top1_agreement_all_positions": agree / total, "top1_agreement_last_position": last_agree / len(ref),
            "mean_kl_all_positions": kl_sum / total, "positions": total, "prompts": len(ref)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="int4wo-128", help="a --torchao-config value")
    parser.add_argument("--method", default="search", choices=("search", "minmax"),
                        help="int4 quantization method (int4wo-* only)")
    parser.add_argument("--out", help="write the result JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    runner, config = build_runner()
    tok = tokenizer_for(config)
    token_lists = [tok(p)["input_ids"] for p in PROMPTS]
    ref = all_logits(runner, token_lists)
    t0 = time.time()
    if args.config.startswith("int4wo-"):
        from edgelm.quantization.torchao_config import INT4_GROUP_SIZES, quantize_int4_model

        quantize_int4_model(runner.model, INT4_GROUP_SIZES[args.config], args.method)
    else:
        from edgelm.quantization.torchao_config import apply_torchao_config

        apply_torchao_config(runner.model, args.config, "cpu")
    quant_s = time.time() - t0
    got = all_logits(runner, token_lists)
    result = {"config": args.config, "method": args.method if args.config.startswith("int4wo-") else "torchao",
              "model": config.source.display_name, "device": "cpu", "quantize_seconds": round(quant_s, 1),
              **compare(ref, got), "command": "PYTHONPATH=. python " + " ".join(sys.argv),
              "torch": torch.__version__, "machine": platform.machine()}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return result


if __name__ == "__main__":
    main()
