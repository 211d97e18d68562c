"""Train an EAGLE-3-style draft head for a target on the target's own greedy outputs.

    python scripts/train_draft.py --output WORK_DIR [--head HEAD_DIR] [--model M] [--text FILE]...

Records on-policy data with the target, trains (Orbax checkpoints in WORK_DIR; run the same
command again to resume), and writes the head to HEAD_DIR (default WORK_DIR/head), usable as
`--draft HEAD_DIR`. Everything is checked before training starts: the output directory must be
writable, text files readable, the target loadable.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from jaxspec.checkpoint.names import DEFAULT_MODEL, check_exists
from jaxspec.errors import UserError
from jaxspec.training.run import DataRecipe, check_text_files, check_work_dir
from jaxspec.training.trainer import TrainConfig


def build_parser() -> argparse.ArgumentParser:
    recipe, train = DataRecipe(), TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, metavar="DIR",
                   help="work directory: recorded data and training checkpoints (resumable)")
    p.add_argument("--head", metavar="DIR", help="where to write the head (default DIR/head)")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="PATH",
                   help=f"target model (default {DEFAULT_MODEL!r})")
    p.add_argument("--init", metavar="HEAD",
                   help="continue training this draft head (its layers, vocabulary and "
                   "params) on this run's data, instead of starting from the target")
    p.add_argument("--text", action="append", default=[], metavar="FILE",
                   help="a UTF-8 text file whose paragraphs become extra prompts (repeatable)")
    p.add_argument("--prompts", type=int, default=recipe.prompts, metavar="N",
                   help=f"generated one-line chat requests (default {recipe.prompts})")
    p.add_argument("--compound", type=int, default=recipe.compound, metavar="N",
                   help="generated multi-part chat requests, after those (default "
                   f"{recipe.compound})")
    p.add_argument("--self-written", type=int, default=recipe.self_written, metavar="N",
                   help="requests the target writes itself from its chat template, after "
                   f"those (default {recipe.self_written})")
    p.add_argument("--new-tokens", type=int, default=recipe.new_tokens, metavar="N",
                   help=f"tokens the target generates per prompt (default {recipe.new_tokens})")
    p.add_argument("--steps", type=int, default=train.steps, metavar="N",
                   help=f"optimizer steps (default {train.steps})")
    p.add_argument("--batch", type=int, default=train.batch, metavar="N",
                   help=f"rows per step (default {train.batch})")
    p.add_argument("--unroll", type=int, default=train.unroll, metavar="K",
                   help=f"draft steps trained per chain (default {train.unroll})")
    p.add_argument("--learning-rate", type=float, default=train.learning_rate, metavar="LR")
    p.add_argument("--draft-vocab", type=int, default=train.draft_vocab, metavar="N",
                   help=f"draft vocabulary size (default {train.draft_vocab})")
    p.add_argument("--checkpoint-every", type=int, default=train.checkpoint_every, metavar="N")
    p.add_argument("--seed", type=int, default=train.seed)
    p.add_argument("--gamma", type=int, default=4, metavar="N",
                   help="γ recorded in the head as its default (pick it by measurement)")
    p.add_argument("--threshold", type=float, default=0.0, metavar="T",
                   help="the head stops proposing below this top probability (recorded)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for name in ("prompts", "new_tokens", "steps", "batch", "unroll", "draft_vocab",
                     "checkpoint_every", "gamma"):
            if getattr(args, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("compound", "self_written"):
            if getattr(args, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be at least 0")
        check_work_dir(args.output)
        if args.head:
            check_work_dir(os.path.dirname(os.path.abspath(args.head)))
        check_text_files(args.text)
        check_exists(args.model, "--model")
        from jaxspec.checkpoint.load import load_model
        from jaxspec.training.run import raise_if_unusable, train_draft

        target = load_model(args.model)
        raise_if_unusable(target)
        if args.self_written:
            from jaxspec.training.self_written import user_turn_prefix

            user_turn_prefix(target)  # a chat template to write requests with
        recipe = DataRecipe(prompts=args.prompts, compound=args.compound,
                            self_written=args.self_written,
                            text_files=tuple(args.text), new_tokens=args.new_tokens)
        config = TrainConfig(steps=args.steps, batch=args.batch, unroll=args.unroll,
                             learning_rate=args.learning_rate, draft_vocab=args.draft_vocab,
                             checkpoint_every=args.checkpoint_every, seed=args.seed)
        command = shlex.join(["python", "scripts/train_draft.py", *(argv or sys.argv[1:])])
        metrics = train_draft(target, args.output, args.head or f"{args.output}/head",
                              recipe=recipe, config=config, gamma=args.gamma,
                              threshold=args.threshold, command=command, init=args.init)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(" ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
