"""Set SED's τ from the initial model: the (1 - r) quantile of the top-k mass on a calibration set.

    torchrun --nproc_per_node 2 tools/calibrate_tau.py --config examples/tiny_cpu.yaml --mask-ratio 0.7
    torchrun ... tools/calibrate_tau.py --config CFG.yaml --load CKPT --mask-ratio 0.7 --write-config CFG_tau.yaml

A shim: the command lives in sed_megatron/cli/calibrate_tau.py (also installed as `sed-calibrate-tau`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sed_megatron.cli.calibrate_tau import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
