"""
Export a model to the Hugging Face layout (config.json, safetensors, tokenizer files), so that
transformers, sample.py, eval.py and train.py --init_from read it from the directory alone:

    python export.py out/toy/base.pt out/toy/base_hf --tokenizer data/udhr/bpe.tiktoken

SRC is train.py's toy base.pt (stage 0) or a checkpoint directory. A .pt file carries no tokenizer,
only the fingerprint of the one it was trained with (train.py records it): --tokenizer names the
file, and one with another fingerprint is an error. (train.py's own out_dir/hf export happens at
the end of every run; this is for base.pt, or for re-exporting.)
"""
import argparse
import sys
from pathlib import Path

from checkpoint import CheckpointError, load_base, load_model_and_tokenizer, save_hf
from tokenizer import load_tokenizer, save_hf_tokenizer


def export(src, dst, tokenizer=""):
    """SRC (.pt or checkpoint dir) -> DST, an HF directory with the weights and the tokenizer. -> DST."""
    src = Path(src)
    model, tok = load_model_and_tokenizer(src, tokenizer)  # (a .pt needs `tokenizer`; vocab sizes checked)
    if src.suffix == ".pt":
        trained_with = load_base(src)[1].get("fingerprint", {}).get("tokenizer")
        if trained_with and trained_with != tok.fingerprint():
            raise CheckpointError(f"{src} was trained with tokenizer {trained_with}; {tokenizer} is "
                                  f"{tok.fingerprint()}: pass the one it was trained with")
    save_hf(model, dst, copy_from=src if src.is_dir() else None)
    save_hf_tokenizer(tok, dst, model_max_length=model.config.max_position_embeddings)
    return Path(dst)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="base.pt, or a checkpoint directory")
    p.add_argument("dst", help="the Hugging Face directory to write (replaced if it exists)")
    p.add_argument("--tokenizer", default="", help="the tokenizer (required for a .pt; default: SRC's own)")
    args = p.parse_args(argv)
    try:
        out = export(args.src, args.dst, args.tokenizer)
    except (CheckpointError, OSError, ValueError) as err:
        raise SystemExit(f"export: {err}") from None
    print(f"exported {args.src} to {out} (Hugging Face layout; tokenizer {load_tokenizer(out).fingerprint()})")


if __name__ == "__main__":
    main(sys.argv[1:])
