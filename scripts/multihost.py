"""Tensor/data parallelism over several processes (hosts): run the same command on each.

    python scripts/multihost.py "PROMPT" --coordinator HOST:PORT --num-processes N \
        --process-id I [--model M] [--draft D] [--tp T] [--dp D] [--max-new-tokens K]

Each process calls `jax.distributed.initialize` (on CPU with gloo collectives), so that
`jax.devices()` spans every process; the model is loaded with `tp`/`dp` over all of them (each
process restores only its own devices' shards) and decodes the same prompt; process 0 prints
the text. With --draft/--temperature as in `python -m jaxspec.generate`. tp × dp must equal
the total number of devices; the prompt batch (one prompt, repeated dp times) splits over dp.
"""

from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prompt")
    p.add_argument("--coordinator", required=True, metavar="HOST:PORT",
                   help="address of process 0 (the same on every process)")
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--draft", default="none")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print tokens and text as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
    import jaxspec
    from jaxspec import bench
    from jaxspec.errors import UserError

    try:
        target = jaxspec.load_model(args.model, tp=args.tp, dp=args.dp)
        decoder = jaxspec.SpeculativeDecoder(target, args.draft, num_speculative_tokens=3)
        ids = bench.prompt_ids(target, args.prompt)
        out = decoder.generate([ids] * args.dp, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, seed=args.seed)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        tokens = out.tokens[0]
        text = target.tokenizer.decode(tokens) if target.tokenizer is not None else None
        print(json.dumps({"tokens": out.tokens, "text": text}) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
