"""python -m pipeline.export RUN_DIR [--tag best|latest|stepN] --out DIR [--dtype fp32|bf16|fp16]"""
import sys

from .hf import main

if __name__ == "__main__":
    sys.exit(main())
