"""Convert a Hugging Face directory or a GGUF file into a jaxspec (Orbax) checkpoint.

    python scripts/convert_hf.py SRC DST [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import sys

from jaxspec.checkpoint.conversion import convert
from jaxspec.checkpoint.store import DTYPES
from jaxspec.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="Hugging Face directory (config.json + safetensors) or .gguf")
    parser.add_argument("dst", help="destination directory (must not exist)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="dtype of the stored params (default: float32)")
    args = parser.parse_args(argv)
    try:
        path = convert(args.src, args.dst, dtype=args.dtype)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
