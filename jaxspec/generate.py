"""Command line: `python -m jaxspec.generate "prompt"` streams a model's answer to stdout.

Flags follow vLLM (`--model`, `--draft`, `--num-speculative-tokens`, `--temperature`, `--top-p`,
`--top-k`, `--seed`, `--max-new-tokens`). Text streams chunk by chunk (chunked loop mode: at
most a few iterations per compiled call; static mode on Trainium); statistics go to stderr.
`--json` prints one JSON object with `text`, `tokens` and `stats` instead. `--device` picks the
backend (default auto: neuron, then gpu, then cpu); `--verbose` also prints the device, the
memory plan and where start-up time went to stderr. Bad
input (a missing device and a run that does not fit in memory included) prints one line
`error: ...` and exits 2.

Heavy imports (jax, the checkpoint loaders) happen inside `run`, so `--help` and argument
errors answer quickly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from jaxspec import devices, validation
from jaxspec.checkpoint.names import DEFAULT_MODEL, check_exists
from jaxspec.drafts import registry
from jaxspec.errors import UserError

# Loop iterations per compiled call while streaming, by loop mode (devices.streaming_mode): at
# most 8 in chunked mode (a call stops once every row is done); exactly 4 in static mode
# (Trainium: idle iterations after the last row is done, and a longer program to compile).
STREAM_ITERATIONS = {"chunked": 8, "static": 4}


def streaming(device) -> dict:
    """The SpeculativeDecoder arguments the CLI streams with on `device` (mode, iterations)."""
    mode = devices.streaming_mode(devices.platform(device))
    return {"mode": mode, "static_iterations": STREAM_ITERATIONS[mode]}
REPLACEMENT = "\ufffd"  # what decode gives for an incomplete UTF-8 sequence


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line `error: ...` (exit status 2 as usual)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def _gamma(text: str) -> int | str:
    """--num-speculative-tokens: an integer or "auto" (range checked in validate)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m jaxspec.generate",
                description="Generate text with exact speculative decoding (jaxspec).")
    p.add_argument("prompt", help="the prompt text (a user message for chat models); '-' reads "
                                  "it from stdin (trailing newlines dropped, as \"$(cat FILE)\")")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="PATH",
                   help="target: jaxspec or Hugging Face directory, .gguf file, or "
                        f"{DEFAULT_MODEL!r} (default; downloaded and converted on first use)")
    p.add_argument("--draft", default="default", metavar="PATH",
                   help="draft: 'default' (the trained draft head shipped for the default "
                        "model, with prompt lookup first; none for other models), a draft head "
                        "checkpoint or a model sharing the target's tokenizer (path or model "
                        "name), 'ngram[:N]' (prompt lookup), 'layerskip:K' (the target's first "
                        "K layers), or 'none' (plain decoding); DRAFT+ngram[:N]: prompt lookup "
                        "first, DRAFT where the text does not repeat")
    p.add_argument("--num-speculative-tokens", type=_gamma, default=None, metavar="N",
                   help=f"draft tokens per step, 1..{validation.MAX_SPECULATIVE_TOKENS}, or "
                        "'auto' (chosen by measurement, cached; default: the γ the draft "
                        "head's checkpoint records, else 4)")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                   help="most new tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature, 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling, (0, 1] (default 1 = off)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="top-k sampling (default 0 = off)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="parameter dtype (default float32)")
    p.add_argument("--device", choices=devices.CHOICES, default="auto",
                   help="backend: auto (neuron, else gpu, else cpu; default), cpu, gpu or neuron")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallelism: split the models over N devices (default 1)")
    p.add_argument("--dp", type=int, default=1, metavar="M",
                   help="data parallelism over M more device groups (the CLI's one prompt "
                        "needs 1; default 1)")
    p.add_argument("--verbose", action="store_true",
                   help="also print the device, the memory plan and where start-up time went "
                        "to stderr")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (text, tokens, stats) instead of streaming")
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="a system message before the prompt (chat models; '' for none where "
                        "the template would add its default)")
    p.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                   help="encode the prompt as raw text even if the tokenizer has a chat template")
    return p


def utf8_text(text: str) -> tuple[str, int]:
    """(text, number of invalid byte sequences replaced): Python keeps an argument's bytes that
    are not UTF-8 as lone surrogates ("surrogateescape"); they become U+FFFD, as a decoder
    would show them."""
    raw = text.encode("utf-8", "surrogateescape")
    fixed = raw.decode("utf-8", "replace")
    return fixed, (0 if fixed == text else fixed.count(REPLACEMENT) - text.count(REPLACEMENT))


def validate(args: argparse.Namespace) -> None:
    """Checks that need no model (cheap, before jax is imported); raises UserError. A prompt
    that is not valid UTF-8 gets its invalid bytes replaced, with one line on stderr. A prompt
    of '-' is read from stdin first."""
    if args.prompt == "-":
        args.prompt = sys.stdin.buffer.read().decode("utf-8", "surrogateescape").rstrip("\n")
    args.prompt, replaced = utf8_text(args.prompt)
    if replaced:
        print(f"warning: the prompt is not valid UTF-8: replaced {replaced} invalid "
              f"byte sequence(s) with U+FFFD", file=sys.stderr)
    if not args.prompt.strip():
        raise UserError("the prompt is empty")
    if args.system is not None:
        args.system, _ = utf8_text(args.system)
        if not args.chat_template:
            raise UserError("--system needs the chat template (drop --no-chat-template)")
    validation.check_max_new_tokens(args.max_new_tokens, flags=True)
    validation.check_sampling(args.temperature, args.top_k, args.top_p, flags=True)
    validation.check_speculative_tokens(args.num_speculative_tokens, flags=True)
    validation.check_seed(args.seed, flags=True)
    validation.check_parallel(args.tp, args.dp, flags=True)
    if args.dp != 1:
        raise UserError(f"--dp must be 1 for the CLI's single prompt, got {args.dp}")
    check_exists(args.model, "--model")
    draft = registry.parse(args.draft)
    if draft.kind == registry.MODEL:
        check_exists(draft.source, "--draft")


class TextStream:
    """Writes the text of a growing token list incrementally (only what is new each time)."""

    def __init__(self, tokenizer, eos_ids, out):
        self.tokenizer, self.eos_ids, self.out = tokenizer, set(eos_ids), out
        self.printed = ""

    def text(self, tokens: list[int]) -> str:
        """Decoded text without special tokens (EOS never shows, special-marked or not).

        No clean-up of spaces before punctuation: it would make a streamed prefix change.
        """
        tokens = [t for t in tokens if t not in self.eos_ids]
        return self.tokenizer.decode(tokens, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)

    def update(self, tokens: list[int], final: bool = False) -> None:
        text = self.text(tokens)
        if not final:  # the rest of a multi-byte character may come with the next tokens
            text = text.rstrip(REPLACEMENT)
        if len(text) > len(self.printed):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text


def stats_lines(stats: dict, has_draft: bool) -> list[str]:
    """A few human-readable lines for stderr."""
    lines = [f"[jaxspec] {stats['new_tokens']} new tokens ({stats['prompt_tokens']} prompt) "
             f"in {stats['wall_seconds']:.2f} s: {stats['tokens_per_second']:.1f} tok/s; "
             f"compile {stats['compile_seconds']:.1f} s"]
    choice = stats.get("gamma_choice")
    if choice:
        speedup = choice["predicted_speedup"][str(choice["gamma"])]
        lines.append(f"[jaxspec] num_speculative_tokens auto: {choice['gamma']} ({choice['source']}"
                     f"; α {choice['alpha']:.2f}, c {choice['c']:.2f}, predicted speedup "
                     f"{speedup:.2f}x)")
        has_draft = has_draft and choice["gamma"] > 0
    if has_draft:
        lines.append(f"[jaxspec] acceptance rate {stats['acceptance_rate']:.1%}, mean accepted "
                     f"length {stats['mean_accepted_length']:.2f}, accepted per position "
                     f"{stats['accepted_per_position']}, target forward calls "
                     f"{stats['target_forward_calls']}")
    return lines


def plan_lines(decoder, prompt: list[int], args: argparse.Namespace) -> list[str]:
    """--verbose: the device, then the memory plan, one term per line (for stderr)."""
    from jaxspec import memory

    plan = decoder.memory_plan([prompt], args.max_new_tokens, temperature=args.temperature)
    device = devices.or_default(decoder.device)
    lines = [f"device {device} ({device.platform})", "memory plan:"]
    lines += ["  " + line for line in memory.lines(plan, decoder.memory_capacity())]
    return [f"[jaxspec] {line}" for line in lines]


def run(args: argparse.Namespace) -> int:
    """Load, encode, generate; stream or print JSON. Raises UserError on bad input."""
    from jaxspec.api import SpeculativeDecoder
    from jaxspec.checkpoint import mapped
    from jaxspec.checkpoint.load import load_model
    from jaxspec.checkpoint.tokenizer import encode_prompt

    started = time.perf_counter()
    device = devices.resolve(args.device)
    target = load_model(args.model, dtype=args.dtype, device=device, tp=args.tp,
                        tokenizer="light")  # no transformers import
    loaded = time.perf_counter()
    prompt = encode_prompt(target, args.prompt, args.chat_template, system=args.system)
    draft = None if args.draft == "none" else args.draft
    decoder = SpeculativeDecoder(target, draft, num_speculative_tokens=args.num_speculative_tokens,
                                 device=device, **streaming(device))
    seconds = {"model": loaded - started, "draft": time.perf_counter() - loaded}
    if args.verbose:
        for line in plan_lines(decoder, prompt, args):
            print(line, file=sys.stderr, flush=True)
    stream = TextStream(target.tokenizer, target.config.eos_token_ids, sys.stdout)
    on_update = None if args.json else (lambda rows: stream.update(rows[0]))
    out = decoder.generate([prompt], max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           seed=args.seed, on_update=on_update)
    tokens, stats = out.tokens[0], {k: v for k, v in out.stats.items() if k != "rows"}
    if args.json:
        print(json.dumps({"text": stream.text(tokens), "tokens": tokens, "stats": stats}))
    else:
        stream.update(tokens, final=True)
        print(flush=True)
    lines = stats_lines(stats, decoder.draft is not None)
    if args.verbose:
        lines.append(startup_line(seconds, stats["compile_seconds"]))
    for line in lines:
        print(line, file=sys.stderr)
    mapped.wait()  # the laid-out params of a first load, before exit_now skips the teardown
    return 0


def startup_line(seconds: dict, compile_seconds: float) -> str:
    """--verbose: where start-up went (loading the model; resolving the draft; the programs,
    traced and compiled or loaded from jaxspec.program_cache)."""
    from jaxspec import program_cache

    counts = program_cache.stats
    return (f"[jaxspec] start-up: model {seconds['model']:.2f} s, draft {seconds['draft']:.2f} s, "
            f"programs {compile_seconds:.2f} s ({counts['loaded']} loaded from the program "
            f"cache, {counts['saved']} traced and saved)")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    try:
        validate(args)
        return run(args)
    except UserError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def exit_now(status: int) -> None:
    """Flush stdout and stderr, then end the process without the interpreter's teardown
    (about 0.4 s of freeing JAX's buffers and modules on the CPU machine): the CLI has written
    everything and holds nothing that needs closing (no file or checkpoint is being written)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            status = status or 1
    os._exit(status)


if __name__ == "__main__":
    exit_now(main())
