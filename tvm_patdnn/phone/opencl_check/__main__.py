"""``python -m tvm_patdnn.phone.opencl_check MODEL``: the same as ``patdnn opencl-check MODEL``."""

import sys

from ...cli import main

sys.exit(main(["opencl-check", *sys.argv[1:]]))
