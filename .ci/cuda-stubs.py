"""Writes link-time stand-ins for the CUDA libraries that candle's binding (cudarc) links against.

cudarc is built with `dynamic-linking`, so every executable that uses CUDA names libcuda.so.1 (the
driver's own library), libcublas, libcublasLt, libcurand and libnvrtc as dynamic dependencies.
None of these is needed to compile anything, only for the linker to see that each symbol exists;
a GPU machine loads the real libraries at run time by their sonames. This is what the CUDA
toolkit's own `lib/stubs/libcuda.so` is for; NVIDIA's PyPI wheels ship no stubs, so we make them
from the function names cudarc declares. A stub is never loaded: running a binary with one on the
library path fails at the first CUDA call, so stubs live apart, in CUDA_HOME/lib/stubs.

usage: cuda-stubs.py CUDARC_SRC_DIR OUT_DIR
"""

import pathlib
import re
import subprocess
import sys

# module folder in cudarc's src/ -> (library name, soname of the CUDA 13 release)
LIBRARIES = {
    "driver": ("cuda", "libcuda.so.1"),
    "cublas": ("cublas", "libcublas.so.13"),
    "cublaslt": ("cublasLt", "libcublasLt.so.13"),
    "curand": ("curand", "libcurand.so.10"),
    "nvrtc": ("nvrtc", "libnvrtc.so.13"),
}

DECLARATION = re.compile(r"^pub unsafe fn (\w+)\(", re.MULTILINE)


def main():
    src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for module, (name, soname) in LIBRARIES.items():
        text = (src / module / "sys" / "mod.rs").read_text()
        symbols = sorted(set(DECLARATION.findall(text)))
        if not symbols:
            sys.exit(f"no functions found in cudarc's {module} bindings")
        c_file = out / f"{name}.c"
        c_file.write_text("".join(f"void {s}(void) {{}}\n" for s in symbols))
        subprocess.run(
            ["cc", "-shared", "-fPIC", f"-Wl,-soname,{soname}", "-o", out / f"lib{name}.so", c_file],
            check=True,
        )
        print(f"lib{name}.so ({soname}): {len(symbols)} symbols", file=sys.stderr)


if __name__ == "__main__":
    main()
