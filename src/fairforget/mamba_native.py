"""Build and load the C kernels of the fast Mamba scan (``csrc/selective_scan.c``).

The source is compiled with the system C compiler (``CC``, default gcc) into the torch extensions cache, once
per source, compiler and CPU, and loaded through ctypes. A failed build warns and yields ``None``, so callers
fall back to the pure-PyTorch scan in :mod:`fairforget.mamba_scan`; ``FAIRFORGET_MAMBA_NATIVE=0`` disables it.
"""

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

from torch.utils.cpp_extension import get_default_build_root

NATIVE_SOURCE = Path(__file__).parent / "csrc" / "selective_scan.c"
# -fno-trapping-math lets gcc turn the kernels' clamps and selects into vector blends (2-2.5x faster scan
# on AVX-512); the kernels never read floating-point exception flags or errno.
COMPILE_FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared"]
MAX_NATIVE_STATE = 256  # MAX_STATE in the C source
MAX_NATIVE_KERNEL = 16  # MAX_KERNEL in the C source

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_NATIVE_SIGNATURES = {
    "scan_forward": (None, [_i64] * 4 + [_ptr, _i64, _i64] * 2 + [_int, _ptr] + [_ptr, _i64, _i64] * 2
                     + [_ptr] + [_ptr, _i64, _i64] + [_ptr] * 3 + [_int]),
    "scan_backward": (_int, [_i64] * 4 + [_ptr, _i64, _i64] * 2 + [_int, _ptr] + [_ptr, _i64, _i64] * 2
                      + [_ptr] + [_ptr, _i64, _i64] + [_ptr] + [_ptr, _i64, _i64] + [_ptr] * 8 + [_int]),
    "conv_silu_forward": (None, [_i64] * 4 + [_ptr, _i64, _i64] + [_ptr] * 3 + [_int]),
    "conv_silu_backward": (None, [_i64] * 4 + [_ptr, _i64, _i64] + [_ptr] * 2 + [_ptr, _i64, _i64]
                           + [_ptr] * 3 + [_int]),
}


def _cpu_signature() -> str:
    """Identifies the CPU model, since the library is built with -march=native."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build_native_library() -> Path:
    """Compile the C kernels into the torch extensions cache (once per source/compiler/CPU)."""
    compiler = os.environ.get("CC", "gcc")
    source = NATIVE_SOURCE.read_bytes()
    key = hashlib.sha256(
        source + " ".join([compiler, *COMPILE_FLAGS, platform.machine(), _cpu_signature()]).encode()
    ).hexdigest()[:16]
    build_dir = Path(get_default_build_root()) / "fairforget_selective_scan"
    library = build_dir / f"selective_scan_{key}.so"
    if library.exists():
        return library
    build_dir.mkdir(parents=True, exist_ok=True)
    # Build to a temporary name and rename, so concurrent processes never load a partial file.
    with tempfile.NamedTemporaryFile(dir=build_dir, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        subprocess.run(
            [compiler, *COMPILE_FLAGS, str(NATIVE_SOURCE), "-o", str(partial), "-lm"],
            check=True, capture_output=True, text=True,
        )
        os.replace(partial, library)
    finally:
        partial.unlink(missing_ok=True)
    return library


@functools.cache
def _load_native_library() -> ctypes.CDLL | None:
    try:
        library = ctypes.CDLL(str(_build_native_library()))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or error
        warnings.warn(
            f"fairforget: could not build the native Mamba scan ({detail}); "
            "falling back to the pure-PyTorch selective scan.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    for name, (restype, argtypes) in _NATIVE_SIGNATURES.items():
        function = getattr(library, name)
        function.restype, function.argtypes = restype, argtypes
    return library


def native_library() -> ctypes.CDLL | None:
    """The compiled kernels, or None when disabled (``FAIRFORGET_MAMBA_NATIVE=0``) or unbuildable."""
    if os.environ.get("FAIRFORGET_MAMBA_NATIVE", "1") == "0":
        return None
    return _load_native_library()
