"""
Decoding throughput of the built-in generator (evaluation/generate.py's generate_batch: one model.generate call, KV cache,
left padding) at several batch sizes: how long stage 1 and `eval.py bench` take before a serving engine
pays off (docs/stage1.md has the numbers and the switch-over advice).

    python experiments/generation_throughput.py                          # toy model (train.py's dims), CPU
    python experiments/generation_throughput.py --shape qwen3 --n-layers 4 --dtype bfloat16 --device cuda
    python experiments/generation_throughput.py --checkpoint out/toy/hf --batch-sizes 1,16,64

Random prompts of --prompt-len tokens, --new-tokens per row with no stop id (every row decodes the full
length), temperature 0.1 as in the paper's evaluation. Time = one generate call after a 2-token warm-up,
prefill included; tokens/s counts new tokens only. Weights are random unless --checkpoint is given.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from evaluation.generate import generate_batch  # noqa: E402
from model import MoEConfig, MoETransformer, qwen3_30b_a3b_config  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="default: a random-init model of --shape")
    p.add_argument("--shape", choices=("toy", "qwen3"), default="toy")
    p.add_argument("--n-layers", type=int, default=4, help="decoder layers for --shape qwen3")
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: float32, or the checkpoint's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.checkpoint:
        from checkpoint import load_model
        model = load_model(args.checkpoint, dtype, args.device)
    else:
        if args.shape == "toy":  # train.py's toy model_config
            cfg = MoEConfig(vocab_size=4096, hidden_size=128, n_layers=4, n_heads=4, n_kv_heads=2,
                            intermediate_size=256, n_experts=8, top_k=2, moe_intermediate_size=128, qk_norm=True,
                            norm_topk_prob=True, max_position_embeddings=512)
        else:  # Qwen3-30B-A3B's dimensions, fewer layers
            cfg = qwen3_30b_a3b_config(n_layers=args.n_layers)
        model = MoETransformer(cfg).to(device=args.device, dtype=dtype or torch.float32).eval()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"model {args.checkpoint or args.shape}: {model.config.n_layers} layers, {args.device}, "
          f"{next(model.parameters()).dtype}, {torch.get_num_threads()} threads; prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens per row, temperature {args.temperature}")
    print(f"{'batch':>6} {'seconds':>8} {'new tok/s':>10} {'ms/step':>8}")
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = torch.randint(0, model.config.vocab_size, (bs, args.prompt_len)).tolist()
        gen = torch.Generator(args.device).manual_seed(0)
        generate_batch(model, prompts, 2, args.temperature, 1.0, (), gen)  # warm-up
        sync()
        t0 = time.perf_counter()
        rows = generate_batch(model, prompts, args.new_tokens, args.temperature, 1.0, (), gen)
        sync()
        dt = time.perf_counter() - t0
        print(f"{bs:>6} {dt:>8.2f} {sum(map(len, rows)) / dt:>10.1f} {1000 * dt / args.new_tokens:>8.1f}")


if __name__ == "__main__":
    main()
