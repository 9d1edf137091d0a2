"""Run the SFT / PSFT / DFT / SFT-KL / ASFT / EAFT study on SmolLM2-135M-Instruct (CPU): ``python tools/run_study.py [--quick]``.

Resumable: rerun the same command after an interruption. Details: docs/experiments.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.psft_study.driver import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
