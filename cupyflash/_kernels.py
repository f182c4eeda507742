"""Kernel building: CUDA sources in ``cuda/`` -> NVRTC -> cubin -> CuPy functions.

Every kernel is a C++ template in a ``.cuh`` file, instantiated by a *name
expression* such as ``flash_fwd_mma<__half, 128, 64, true>``. One variant is one
(source file, name expression, architecture); it is compiled on its own, so a cold
compile costs one variant, and cached three ways: in memory per device, and on disk
(``$CUPYFLASH_CACHE_DIR``, default ``~/.cache/cupyflash``) keyed by a hash of every
source file, the options and the NVRTC version.

The same :func:`compile_variant` runs in CI on machines with no GPU (NVRTC needs
none), where :func:`resource_report` parses ptxas's register and spill report.
"""

import functools
import hashlib
import os
import pathlib
import re
import tempfile

CUDA_DIR = pathlib.Path(__file__).with_name("cuda")


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel; the message holds the compiler log."""


def cuda_include_dirs():
    """Directories that hold ``cuda_fp16.h`` and ``cuda_bf16.h`` for NVRTC.

    Searched in order: the pip CUDA headers (``nvidia/cu13/include``,
    ``nvidia/cuda_runtime/include`` for CUDA 12), ``$CUDA_PATH/include``,
    ``/usr/local/cuda/include``.
    """
    candidates = []
    try:
        import nvidia
        for root in nvidia.__path__:
            candidates += [pathlib.Path(root) / "cu13" / "include",
                           pathlib.Path(root) / "cuda_runtime" / "include"]
    except ImportError:
        pass
    for env in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(env):
            candidates.append(pathlib.Path(os.environ[env]) / "include")
    candidates.append(pathlib.Path("/usr/local/cuda/include"))
    found = [str(c) for c in candidates if (c / "cuda_fp16.h").is_file()]
    if not found:
        raise KernelCompileError(
            "cupyflash: no CUDA headers (cuda_fp16.h) found; install the pip CUDA headers "
            "with `pip install cupyflash[cuda13]` or set CUDA_PATH")
    return found[:1]


def arch_for(compute_capability):
    """The NVRTC target for a device: ``sm_90a`` on Hopper (wgmma), else ``sm_XY``."""
    cc = int(compute_capability)
    if cc < 80:
        raise RuntimeError(f"cupyflash: GPU kernels need compute capability 8.0 or newer "
                           f"(A100, L4/L40, RTX 30/40, H100); this device has "
                           f"{cc // 10}.{cc % 10}")
    return "sm_90a" if cc == 90 else f"sm_{cc}"


def nvrtc_options(arch, verbose=False):
    opts = ["-std=c++17", f"-arch={arch}", f"-I{CUDA_DIR}", "-DNDEBUG",
            "--device-as-default-execution-space"]
    opts += [f"-I{d}" for d in cuda_include_dirs()]
    if verbose:
        opts += ["-Xptxas=-v", "-Xptxas=--warn-on-spills"]
    return opts


@functools.lru_cache(maxsize=None)
def _sources_digest():
    h = hashlib.sha256()
    for path in sorted(CUDA_DIR.glob("*.cuh")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _cache_dir():
    return pathlib.Path(os.environ.get("CUPYFLASH_CACHE_DIR",
                                       pathlib.Path.home() / ".cache" / "cupyflash"))


class CompiledVariant:
    """A cubin, the mangled name of its kernel, and ptxas's log."""

    __slots__ = ("cubin", "lowered_name", "log")

    def __init__(self, cubin, lowered_name, log):
        self.cubin, self.lowered_name, self.log = cubin, lowered_name, log


def _whole_elf(cubin):
    """``cubin`` with the length its ELF header declares.

    CuPy 14's ``nvrtc.getCUBIN`` returns the image one byte short (it drops a final byte
    as if it were a string terminator): the last byte of the program-header table, which
    is the high byte of a 64-bit alignment field and so zero. The driver loads the short
    image, but tools such as cuobjdump reject it, so the declared length is restored.
    """
    import struct
    if len(cubin) < 64 or cubin[:4] != b"\x7fELF":
        return cubin
    phoff, shoff = struct.unpack_from("<QQ", cubin, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", cubin, 0x36)
    declared = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
    return cubin + b"\0" * (declared - len(cubin)) if declared > len(cubin) else cubin


def compile_variant(source, name_expression, arch, *, verbose=False, use_disk_cache=True):
    """Compile one template instantiation of ``cuda/<source>`` for ``arch``.

    ``verbose=True`` asks ptxas for its resource report (registers, spills) in the
    log; the result then bypasses the disk cache.
    """
    from cupy.cuda import nvrtc

    options = nvrtc_options(arch, verbose)
    code = f'#include "{source}"\n'
    key = hashlib.sha256("\0".join(
        [_sources_digest(), source, name_expression, *options,
         str(nvrtc.getVersion())]).encode()).hexdigest()[:32]
    cache_file = _cache_dir() / f"{key}.cubin"
    if use_disk_cache and not verbose and cache_file.is_file():
        data = cache_file.read_bytes()
        name_len = int.from_bytes(data[:4], "little")
        return CompiledVariant(data[4 + name_len:], data[4:4 + name_len].decode(), "")

    prog = nvrtc.createProgram(code, f"cupyflash_{source}", [], [])
    try:
        nvrtc.addNameExpression(prog, name_expression)
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError:
            raise KernelCompileError(f"cupyflash: NVRTC failed to compile {name_expression} "
                                     f"from {source} for {arch}:\n"
                                     f"{nvrtc.getProgramLog(prog)}") from None
        result = CompiledVariant(_whole_elf(nvrtc.getCUBIN(prog)),
                                 nvrtc.getLoweredName(prog, name_expression),
                                 nvrtc.getProgramLog(prog))
    finally:
        nvrtc.destroyProgram(prog)

    if use_disk_cache and not verbose:
        try:  # best effort: a read-only home only costs the next process a compile
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            name = result.lowered_name.encode()
            with tempfile.NamedTemporaryFile(dir=cache_file.parent, delete=False) as f:
                f.write(len(name).to_bytes(4, "little") + name + result.cubin)
            os.replace(f.name, cache_file)
        except OSError:
            pass
    return result


_REPORT = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<spill_stores>\d+) bytes spill stores, "
    r"(?P<spill_loads>\d+) bytes spill loads.*?Used (?P<registers>\d+) registers"
    r"(?:, used \d+ barriers)?(?:, (?P<smem>\d+) bytes smem)?", re.S)


def resource_report(log):
    """Parse ptxas ``-v`` output: registers, static shared memory, stack and spills."""
    m = _REPORT.search(log)
    if m is None:
        raise ValueError(f"no ptxas resource report in the log:\n{log}")
    return {k: int(v or 0) for k, v in m.groupdict().items()}


@functools.lru_cache(maxsize=None)
def _load(device_id, source, name_expression, arch, dynamic_smem_bytes):
    import cupy
    from cupy.cuda import driver, function

    compiled = compile_variant(source, name_expression, arch)
    with cupy.cuda.Device(device_id):
        module = function.Module()
        module.load(compiled.cubin)
        kernel = module.get_function(compiled.lowered_name)
        if dynamic_smem_bytes > 0:  # above 48 KiB (static included) a kernel must opt in
            driver.funcSetAttribute(kernel.ptr,
                                    driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                    dynamic_smem_bytes)
        return module, kernel  # the module stays alive with the function


def get_function(device_id, source, name_expression, arch, dynamic_smem_bytes=0):
    """Load one compiled variant on one device (cached per device) and return it, allowed
    to launch with ``dynamic_smem_bytes`` of dynamic shared memory."""
    return _load(device_id, source, name_expression, arch, dynamic_smem_bytes)[1]
