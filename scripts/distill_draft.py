"""DESIGN.md's name for scripts/train_draft.py (the same script, the same flags): train an
EAGLE-3-style draft head for a target on the target's own outputs.

    python scripts/distill_draft.py --output WORK_DIR [--head HEAD_DIR] [--model M] ...
"""

import os
import runpy

if __name__ == "__main__":
    runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_draft.py"),
                   run_name="__main__")
