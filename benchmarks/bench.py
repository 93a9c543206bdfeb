"""Block-diffusion decoding vs the AR parent's compiled `generate`: tok/s, TPF, NFE, ms per step, weight-read floor.

Qwen3-0.6B/1.7B/4B/8B and SmolLM2-135M shapes with random weights, batch 1/8/32, block 32, prompt 256, 256 new
tokens; JSON + PNG under --out, the table printed last. The logic is `efficient_dlm.evaluation.benchmark` (also
`efficient-dlm bench`); see its docstring for the definitions.

    python benchmarks/bench.py --out DIR [--models qwen3-0.6b,...] [--batches 1,8,32] [--time-budget-s 480]
        [--gguf SmolLM2-135M-Instruct.Q4_1.gguf] [--variants off:auto,on:none]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from efficient_dlm.evaluation.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
