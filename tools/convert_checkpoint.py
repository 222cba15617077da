"""Checkpoint conversion without installing the package: same as `fapo-megatron convert ...`.

python tools/convert_checkpoint.py hf-to-megatron --hf HF_DIR --out MCORE_DIR --tp 2 --pp 1
python tools/convert_checkpoint.py megatron-to-hf --ckpt MCORE_DIR --out HF_DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fapo_megatron.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
