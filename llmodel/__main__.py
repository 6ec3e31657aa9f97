"""`python -m llmodel <command>`: a small argparse dispatcher; each command lives in its own function."""
from __future__ import annotations

import argparse
import os
import sys


def _generate(args) -> int:
    import torch

    from .checkpoint import load_lm
    from .generate import generate

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": None}[args.dtype]
    model = load_lm(args.model, dtype=dtype, device=args.device)
    tokenizer_path = os.path.join(args.model, "tokenizer.json")
    tokenizer = None
    if os.path.isfile(tokenizer_path):
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(tokenizer_path)
        prompt_ids = tokenizer.encode(args.prompt).ids
    else:  # no tokenizer: the prompt is token ids separated by spaces, and ids are printed back
        try:
            prompt_ids = [int(t) for t in args.prompt.split()]
        except ValueError:
            print(f"--prompt: {args.model} has no tokenizer.json, so the prompt must be token ids separated by "
                  f"spaces, got {args.prompt!r}", file=sys.stderr)
            return 2
    if not prompt_ids:
        print("--prompt: encodes to no tokens", file=sys.stderr)
        return 2

    new_ids, printed = [], ""

    def stream(token):
        nonlocal printed
        new_ids.append(int(token[0]))
        if tokenizer is None:
            print(new_ids[-1], end=" ", flush=True)
            return
        # Decode everything so far and print the new suffix: a token may complete a multi-byte character.
        text = tokenizer.decode(new_ids)
        print(text[len(printed):], end="", flush=True)
        printed = text

    ids = torch.tensor([prompt_ids], device=args.device)
    generate(model, input_ids=ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
             top_k=args.top_k, top_p=args.top_p, chunk_size=args.chunk_size, stream=stream, seed=args.seed)
    print()
    return 0


def _plan(argv) -> int:
    from .plan import main as plan_main

    return plan_main(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plan"]:
        return _plan(argv[1:])
    if argv[:1] == ["chat"]:
        from .chat import main as chat_main

        return chat_main(argv[1:])
    forwarded = {"train": ("train", "main"), "demo": ("demo", "main"), "eval": ("evaluate", "eval_main"),
                 "plot": ("evaluate", "plot_main")}
    if argv[:1] and argv[0] in forwarded:
        import importlib

        module, function = forwarded[argv[0]]
        return getattr(importlib.import_module(f"llmodel.{module}"), function)(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m llmodel")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="stream a completion from an HF-layout model directory")
    gen.add_argument("--model", required=True, help="directory with config.json + safetensors (+ tokenizer.json)")
    gen.add_argument("--prompt", required=True, help="text, or space-separated token ids without tokenizer.json")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--chunk-size", type=int, default=None, help="prefill chunk length (bounds activation memory)")
    gen.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(run=_generate)

    # These commands own their flags (in their modules): main() hands them the rest.
    commands.add_parser("chat", add_help=False, help="multimodal chat with images / video "
                                                     "(python -m llmodel chat --help)")
    commands.add_parser("plan", add_help=False, help="memory and FLOP plan for a config and a workload "
                                                     "(python -m llmodel plan --help)")
    commands.add_parser("train", add_help=False, help="one training stage: align | single | multi, FSDP2 under "
                                                      "torchrun (python -m llmodel train --help)")
    commands.add_parser("demo", add_help=False, help="train a tiny LongLLaVA from scratch on CPU through the three "
                                                     "stages and evaluate it")
    commands.add_parser("eval", add_help=False, help="held-out task accuracy or the V-NIAH heatmap")
    commands.add_parser("plot", add_help=False, help="loss curve of run directories to PNG")

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
