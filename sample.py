"""
Chat with a Hugging Face checkpoint directory (Qwen3-MoE, Phi-3.5-MoE, or one we saved) from the
command line: one user turn in the model's chat format, the assistant's reply printed.

    python sample.py --checkpoint DIR --prompt "Why is the sky blue?"
    python sample.py --checkpoint DIR --prompt "..." --system "Be brief." --temperature 0.7 --top_p 0.9

The directory needs config.json, the safetensors weights and tokenizer.json (a save_pretrained
directory has them if it was written with copy_from=<the original checkpoint>). --checkpoint may
also be one of train.py's .pt files ({'model': state_dict, 'config': dict}), with --tokenizer.
--temperature 0 is greedy decoding. --dtype defaults to the checkpoint's own (bf16 for the releases).
"""
import argparse
import sys
import time

import torch

from checkpoint import load_model
from model import MoEConfig, MoETransformer
from tokenizer import load_tokenizer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint directory, or a .pt")
    p.add_argument("--tokenizer", default=None, help="default: the checkpoint directory's tokenizer.json")
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", default=None, help="optional system message")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: the checkpoint's dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    t0 = time.time()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.checkpoint.endswith(".pt"):  # train.py's own: {'model': state_dict, 'config': dict}
        if args.tokenizer is None:
            raise SystemExit(f"{args.checkpoint} is a .pt file: pass --tokenizer (e.g. data/udhr/bpe.tiktoken)")
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        model = MoETransformer(MoEConfig.from_dict(ckpt["config"]))
        model.load_state_dict(ckpt["model"])
        model = model.to(device=args.device, dtype=dtype).eval()
    else:
        model = load_model(args.checkpoint, dtype=dtype, device=args.device)
    tok = load_tokenizer(args.tokenizer or args.checkpoint)
    prompt_ids, _ = tok.encode_chat(args.prompt, None, system=args.system)
    t1 = time.time()

    generator = torch.Generator(args.device).manual_seed(args.seed)
    ids = torch.tensor([prompt_ids], device=args.device)
    new_ids = model.generate(ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             stop_ids=tok.stop_ids, generator=generator)[0]
    t2 = time.time()
    if new_ids and new_ids[-1] in tok.stop_ids:
        new_ids = new_ids[:-1]  # the end-of-turn token is not part of the reply
    print(tok.decode(new_ids))
    print(f"[load {t1 - t0:.1f}s, {len(new_ids)} tokens in {t2 - t1:.1f}s]", file=sys.stderr)
    return new_ids


if __name__ == "__main__":
    main()
