"""`python -m llamaherd.kernels [-v]`: build the C++ kernels now (setup does this) and say which
instruction set they were built for."""

import sys

from llamaherd.kernels import build, build_dir, load

build(verbose="-v" in sys.argv)
print(f"llamaherd kernels: {load().simd()} in {build_dir()}")
