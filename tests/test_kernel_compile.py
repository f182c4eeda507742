"""Every kernel variant compiles through NVRTC, for sm_80 and sm_90a, without spills.

No GPU is needed (NVRTC and ptxas run on the CPU), so this runs in CI. Each
(variant, architecture) is one test: it compiles with ptxas's resource report
(``-Xptxas=-v``) and fails on any spill store, spill load or stack frame, which would
put a kernel's registers in local memory, and on ptxas's wgmma warnings (the C75xx
family: "wgmma.mma_async instructions are serialized due to ...", setmaxnreg ignored),
which mean a Hopper kernel lost its asynchronous pipeline. The Hopper kernel
(flash_fwd_wgmma) is compiled for sm_90a only, and must compile without any warning.
``pytest -s`` prints one line per variant; a table of all of them, with the total
compile time, is written when the module ends. Where ``cuobjdump`` is found (on the PATH
or in ``$CUOBJDUMP``), the Hopper kernels' machine code is checked too.

More tests compile small programs of ``static_assert``s that hold the Python side to
the kernels' own constants: the shared memory, block size and tile rows that
``_cupy_backend._simt_config``, ``_cupy_backward.backward_config`` and
``_cupy_decode.decode_config`` launch with, the layout of the decode kernels' argument
structs, and the limits ``softmax_family`` assumes.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

pytest.importorskip("cupy", reason="needs CuPy's NVRTC bindings")
from cupy.cuda import nvrtc  # noqa: E402

from cupyflash import _cupy_backend, _cupy_backward, _cupy_decode, _kernels  # noqa: E402

try:
    _kernels.cuda_include_dirs()
except _kernels.KernelCompileError as e:  # no cuda_fp16.h anywhere: nothing can compile
    pytest.skip(str(e), allow_module_level=True)

ARCHS = ("sm_80", "sm_90a")


def _variants():
    """(source, name_expression, arch) of every kernel, each once: the forward, softmax,
    SIMT backward and decode kernels for both architectures, and the tensor-core backward
    variants that a GPU of each architecture requests (their tiles depend on it)."""
    every_arch = list(dict.fromkeys(_cupy_backend.all_attention_variants()
                                    + _cupy_backend.simt_attention_variants()
                                    + _cupy_backend.all_softmax_variants()
                                    + _cupy_backend.simt_backward_variants()
                                    + _cupy_decode.decode_variants()))
    return [(source, name, arch) for arch in ARCHS
            for source, name in every_arch + _cupy_backward.mma_backward_variants(arch)
            ] + [(source, name, "sm_90a")
                 for source, name in _cupy_backend.wgmma_attention_variants()
                 + _cupy_backward.wgmma_backward_variants()
                 ] + _cupy_backend.varlen_attention_variants()


def _short(name):
    """A test id without spaces: ``flash_fwd_simt<float,64,true>``."""
    return name.replace("cupyflash::", "").replace(" ", "")


VARIANTS = _variants()

# Every "N bytes stack frame, N bytes spill stores, N bytes spill loads" line of the log
# (one per function ptxas compiled), so a called function's spills count too.
_FRAMES = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
# ptxas's wgmma and setmaxnreg diagnostics, the C75xx family: C7508 (setmaxnreg ignored),
# C7509-C7520 ("wgmma.mma_async instructions are serialized due to ...", "wgmma.wait_group
# is injected ... to allow use of registers defined by GMMA"). ptxas prints some of them
# as "info", not "warning", so they are matched by code. Any of them means a Hopper kernel
# lost its asynchronous pipeline (or its register split), so each fails the check.
# The NUM_CONSUMERS argument of a Hopper forward kernel's name.
_WGMMA_CONSUMERS = re.compile(
    r"flash_fwd_wgmma(?:_variants|_varlen|_local)?<[^,]+, \d+, \d+, (\d+),")
_WGMMA_WARNINGS = re.compile(r".*(?:\(C75\d\d\)|wgmma[^\n]*serializ|setmaxnreg).*", re.I)


@pytest.fixture(scope="module")
def resource_table(request):
    """Rows of the report, written as one table when the module's last test is done."""
    rows = []
    start = time.perf_counter()
    yield rows
    total = time.perf_counter() - start
    width = max((len(r[0]) for r in rows), default=10)
    lines = [f"{'variant':{width}s} {'arch':7s} {'regs':>5s} {'smem':>6s} {'stack':>6s} "
             f"{'spill st/ld':>12s} {'compile':>8s}"]
    for name, arch, rep, seconds in rows:
        lines.append(f"{name:{width}s} {arch:7s} {rep['registers']:5d} {rep['smem']:6d} "
                     f"{rep['stack']:6d} {rep['spill_stores']:5d}/{rep['spill_loads']:<6d} "
                     f"{seconds:7.2f}s")
    lines.append(f"{len(rows)} compiles in {total:.1f} s "
                 f"(NVRTC {'.'.join(map(str, nvrtc.getVersion()))})")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print("\n".join(lines))
        return
    with capture.global_and_fixture_disabled():  # past pytest's output capture
        reporter.ensure_newline()
        reporter.write_sep("-", "kernel resources (ptxas -v)")
        for line in lines:
            reporter.write_line(line)


@pytest.mark.parametrize("source, name, arch", VARIANTS,
                         ids=[f"{_short(n)}-{a}" for _, n, a in VARIANTS])
def test_compiles_without_spills(source, name, arch, resource_table):
    start = time.perf_counter()
    compiled = _kernels.compile_variant(source, name, arch, verbose=True)
    seconds = time.perf_counter() - start
    report = _kernels.resource_report(compiled.log)
    resource_table.append((_short(name), arch, report, seconds))
    print(f"{_short(name)} {arch}: {report['registers']} registers, {report['smem']} bytes "
          f"static smem, {report['stack']} bytes stack, {report['spill_stores']}/"
          f"{report['spill_loads']} bytes spilled (stores/loads), {seconds:.2f} s")
    frames = [tuple(map(int, m)) for m in _FRAMES.findall(compiled.log)]
    assert frames, f"no ptxas resource report for {name} on {arch}:\n{compiled.log}"
    assert all(f == (0, 0, 0) for f in frames), (
        f"{name} on {arch} uses local memory (stack, spill stores, spill loads per "
        f"function: {frames}):\n{compiled.log}")
    lost = _WGMMA_WARNINGS.findall(compiled.log)
    assert not lost, (f"{name} on {arch}: ptxas reports a lost wgmma pipeline or register "
                      f"split:\n{compiled.log}")
    if "flash_bwd_wgmma" in name:  # BwdWgmmaTraits: 384 threads, 168 registers at launch
        warnings = [line for line in compiled.log.splitlines() if "warning" in line.lower()]
        assert not warnings, f"{name}: ptxas warnings:\n{compiled.log}"
        assert report["registers"] == 168, (
            f"{name}: {report['registers']} registers at launch, the register split of "
            f"BwdWgmmaTraits assumes 168")
    if "flash_fwd_wgmma" in name:
        warnings = [line for line in compiled.log.splitlines() if "warning" in line.lower()]
        assert not warnings, f"{name}: ptxas warnings:\n{compiled.log}"
        # setmaxnreg moves registers inside the block's pool, which holds what the block
        # was launched with: 65536 / threads, rounded down to 8 (FwdWgmmaTraits). With
        # fewer, the consumers' setmaxnreg.inc would wait forever for registers.
        consumers = int(_WGMMA_CONSUMERS.search(
                              name).group(1))
        threads = 128 * (consumers + 1)
        assert report["registers"] == 65536 // threads // 8 * 8, (
            f"{name}: {report['registers']} registers at launch, the register split of "
            f"FwdWgmmaTraits assumes {65536 // threads // 8 * 8}")


def _compile_asserts(source, asserts):
    """Compile ``#include "<source>"`` followed by ``asserts``; fail with NVRTC's log."""
    code = f'#include "{source}"\n' + "\n".join(asserts) + "\n"
    prog = nvrtc.createProgram(code, "asserts.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, _kernels.nvrtc_options("sm_80"))
        except nvrtc.NVRTCError:
            pytest.fail(f"the kernel constants disagree with the Python side:\n"
                        f"{nvrtc.getProgramLog(prog)}")
    finally:
        nvrtc.destroyProgram(prog)


def test_simt_configs_match_the_kernel_traits():
    """_simt_config's block rows, threads, shared memory and alignment are SimtTraits'."""
    asserts = []
    for dtype, ctype in (("float32", "float"), ("float64", "double")):
        for head_dim in (32, 64, 128, 256):
            for causal in (False, True):
                cfg = _cupy_backend._simt_config(head_dim, head_dim, dtype, 90, causal)
                assert cfg.source == "flash_fwd_simt.cuh"
                assert cfg.name_expression == (f"cupyflash::flash_fwd_simt<{ctype}, {head_dim}, "
                                               f"{'true' if causal else 'false'}>")
                traits = f"cupyflash::SimtTraits<{ctype}, {head_dim}>"
                for what, value in (("BLOCK_M", cfg.block_m), ("NUM_THREADS", cfg.num_threads),
                                    ("SMEM_BYTES", cfg.smem_bytes), ("VEC", cfg.align_elems),
                                    ("VEC", cfg.pad_d_to)):
                    asserts.append(f'static_assert({traits}::{what} == {value}, '
                                   f'"{dtype} HEAD_DIM {head_dim}: {what} != {value}");')
    _compile_asserts("flash_fwd_simt.cuh", asserts)


def test_simt_config_pads_the_head_dim_and_rejects_what_no_kernel_has():
    assert _cupy_backend._simt_config(59, 40, "float32", 90, False).name_expression == (
        "cupyflash::flash_fwd_simt<float, 64, false>")
    assert _cupy_backend._simt_config(64, 65, "float64", 80, True).name_expression == (
        "cupyflash::flash_fwd_simt<double, 128, true>")
    with pytest.raises(ValueError, match="^attention: head dims up to 256"):
        _cupy_backend._simt_config(257, 64, "float32", 90, False)


def test_softmax_limits_match_the_kernel_constants():
    """The numbers softmax_family chooses its kernel by (see its body) are the .cuh's."""
    asserts = [
        'static_assert(cupyflash::SOFTMAX_ROW_MAX_THREADS == 512, "max threads per row");',
        'static_assert(cupyflash::SOFTMAX_SPLIT_THREADS == 256, "threads of the split kernels");',
        'static_assert(cupyflash::SOFTMAX_CLUSTER == 8, "blocks per row of softmax_cluster");',
        'static_assert(cupyflash::KIND_SOFTMAX == 0 && cupyflash::KIND_LOG_SOFTMAX == 1 '
        '&& cupyflash::KIND_LOGSUMEXP == 2, "kind numbers");',
    ]
    for ctype, vecs in (("float", 16), ("double", 16), ("__half", 8), ("__nv_bfloat16", 8)):
        asserts.append(f'static_assert(cupyflash::SoftmaxRowVecs<{ctype}>::value == {vecs}, '
                       f'"{ctype}: vectors per thread");')
    _compile_asserts("online_softmax.cuh", asserts)


def test_mma_backward_configs_match_the_kernel_traits():
    """backward_config's keys per block, threads and shared memory are BwdMmaTraits' and
    BwdDqTraits' (plus the fp32 dQ staging tile on sm_90)."""
    asserts = []
    for cc in (90, 80, 86):
        for head_dim in _cupy_backward.BWD_HEAD_DIMS:
            for det in (False, True):
                # (the mma.sync kernels' config: on sm_90 backward_config may pick the
                # Hopper kernel, checked by test_wgmma_backward_configs_match_...)
                cfg = _cupy_backward._mma_backward_config(head_dim, "float16", cc, False, det, "")
                bm, warps, split, qbuf, _ = _cupy_backward.BWD_MMA_TILES[
                    _cupy_backward._smem_class(cc)][head_dim]
                tr = f"cupyflash::BwdMmaTraits<__half, {head_dim}, {bm}, {warps}, {split}, {qbuf}>"
                stage = f" + {tr}::DQ_STAGE_BYTES" if cc == 90 and not det else ""
                asserts.append(f'static_assert({tr}::SMEM_BYTES{stage} == {cfg.main_smem} && '
                               f'{tr}::BLOCK_N == {cfg.block_n} && '
                               f'{tr}::NUM_THREADS == {cfg.main_threads}, "cc {cc} d {head_dim}");')
                dm, dn, dw = _cupy_backward.BWD_DQ_MMA_TILES[
                    _cupy_backward._smem_class(cc)][head_dim]
                dtr = f"cupyflash::BwdDqTraits<__half, {head_dim}, {dm}, {dn}, {dw}>"
                asserts.append(f'static_assert({dtr}::SMEM_BYTES == {cfg.dq_smem} && '
                               f'{dtr}::NUM_THREADS == {cfg.dq_threads} && '
                               f'{dtr}::BLOCK_M == {cfg.block_m_dq}, "dq cc {cc} d {head_dim}");')
    _compile_asserts("flash_bwd_mma.cuh", asserts)


def test_simt_backward_configs_match_the_kernel_traits():
    """_simt_backward_config's tiles, threads, shared memory and alignment are
    SimtBwdTraits'."""
    asserts = []
    for dtype, ctype in (("float32", "float"), ("float64", "double")):
        for head_dim in (32, 64, 128, 256):
            for causal in (False, True):
                c = _cupy_backend._simt_backward_config(head_dim, head_dim, dtype, causal)
                tr = f"cupyflash::SimtBwdTraits<{ctype}, {head_dim}>"
                for what, value in (("DkDv::BLOCK_N", c.block_n),
                                    ("DkDv::BLOCK_M", c.dkdv_block_m),
                                    ("Dq::BLOCK_M", c.block_m), ("Dq::BLOCK_N", c.dq_block_n),
                                    ("NUM_THREADS", c.num_threads),
                                    ("DKDV_SMEM_BYTES", c.dkdv_smem_bytes),
                                    ("DQ_SMEM_BYTES", c.dq_smem_bytes),
                                    ("VEC", c.align_elems), ("VEC", c.pad_d_to)):
                    asserts.append(f'static_assert({tr}::{what} == {value}, '
                                   f'"{dtype} HEAD_DIM {head_dim}: {what} != {value}");')
    _compile_asserts("flash_bwd_simt.cuh", asserts)


@pytest.mark.parametrize("arch", ARCHS)
def test_philox_compiles_without_spills(arch):
    """cuda/philox.cuh (Philox4x32-10 and dropout_keep) compiles through NVRTC with the
    kernels' options, in the tiny keep-mask kernel of test_dropout.py, without local
    memory."""
    from test_dropout import compile_keep_mask_kernel
    cubin, log = compile_keep_mask_kernel(arch, verbose=True)
    assert cubin[:4] == b"\x7fELF"
    frames = [tuple(map(int, m)) for m in _FRAMES.findall(log)]
    assert frames and all(f == (0, 0, 0) for f in frames), log


def test_wgmma_configs_match_the_kernel_traits():
    """_wgmma_config's block rows, threads and shared memory are FwdWgmmaTraits'."""
    asserts = []
    for head_dim in _cupy_backend.WGMMA_HEAD_DIMS:
        for causal, variants, bias, local in ((False, False, False, False),
                                              (True, False, False, False),
                                              (False, True, False, False),
                                              (False, True, True, False),
                                              (False, False, False, True)):
            cfg = _cupy_backend._wgmma_config(head_dim, head_dim, "bfloat16", causal, variants,
                                              bias, local=local)
            table = ((_cupy_backend.WGMMA_BIAS_TILES if bias
                      else _cupy_backend.WGMMA_VARIANT_TILES) if variants
                     else _cupy_backend.WGMMA_LOCAL_TILES if local
                     else _cupy_backend.WGMMA_TILES)
            block_n, consumers, stages = table[head_dim]
            assert cfg.block_n == block_n and cfg.kernel == "wgmma"
            tr = (f"cupyflash::FwdWgmmaTraits<__nv_bfloat16, {head_dim}, {block_n}, "
                  f"{consumers}, {stages}>")
            for what, value in (("BLOCK_M", cfg.block_m), ("BLOCK_N", cfg.block_n),
                                ("NUM_THREADS", cfg.num_threads),
                                ("SMEM_BYTES", cfg.smem_bytes)):
                asserts.append(f'static_assert({tr}::{what} == {value}, '
                               f'"HEAD_DIM {head_dim}: {what} != {value}");')
    _compile_asserts("flash_fwd_wgmma.cuh", asserts)


def test_wgmma_backward_configs_match_the_kernel_traits():
    """_wgmma_backward_config's keys per block, threads and shared memory are
    BwdWgmmaTraits'."""
    asserts = []
    for head_dim in _cupy_backward.WGMMA_BWD_HEAD_DIMS:
        cfg = _cupy_backward._wgmma_backward_config(head_dim, "float16", 90, False, False)
        assert cfg.kernel == "wgmma" and cfg.head_dim == head_dim
        tr = (f"cupyflash::BwdWgmmaTraits<__half, {head_dim}, "
              f"{_cupy_backward.WGMMA_BWD_STAGES[head_dim]}>")
        for what, value in (("BLOCK_M", cfg.block_m), ("BLOCK_N", cfg.block_n),
                            ("NUM_THREADS", cfg.main_threads), ("SMEM_BYTES", cfg.main_smem)):
            asserts.append(f'static_assert({tr}::{what} == {value}, '
                           f'"HEAD_DIM {head_dim}: {what} != {value}");')
    _compile_asserts("flash_bwd_wgmma.cuh", asserts)


def test_the_wgmma_pipeline_check_catches_what_ptxas_reports():
    """A wgmma whose accumulator is touched before its wait: ptxas injects a wait (C7517,
    printed as "info") and the check above must see it."""
    code = (
        '#include "flash_fwd_wgmma.cuh"\n'
        "__global__ void __launch_bounds__(128, 1)\n"
        "touched(float* out, unsigned long long a, unsigned long long b) {\n"
        "    float d[8][4] = {};\n"
        "    cupyflash::wgmma_fence();\n"
        "    cupyflash::Wgmma<64, false>::ss(d, a, b, 1);\n"
        "    cupyflash::wgmma_commit();\n"
        "    d[0][0] += 1.f;  // before the wait: ptxas must serialise\n"
        "    cupyflash::wgmma_wait<0>();\n"
        "    for (int i = 0; i < 32; ++i) out[threadIdx.x * 32 + i] = d[i / 4][i % 4];\n"
        "}\n")
    prog = nvrtc.createProgram(code, "touched.cu", [], [])
    try:
        nvrtc.addNameExpression(prog, "touched")
        nvrtc.compileProgram(prog, _kernels.nvrtc_options("sm_90a", verbose=True))
        log = nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)
    assert _WGMMA_WARNINGS.findall(log), f"no C75xx diagnostic in:\n{log}"


def test_the_wgmma_header_is_the_generator_output():
    """cuda/wgmma_ops.cuh is what tools/gen_wgmma_ops.py writes (edit the script, rerun)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tools"))
    try:
        import gen_wgmma_ops
    finally:
        sys.path.pop(0)
    assert gen_wgmma_ops.HEADER.read_text() == gen_wgmma_ops.generate(), (
        "cupyflash/cuda/wgmma_ops.cuh is stale: run python tools/gen_wgmma_ops.py")


def _cuobjdump():
    path = os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump")
    if not path:
        pytest.skip("no cuobjdump (set $CUOBJDUMP or put it on the PATH)")
    return path


WGMMA_VARIANTS = _cupy_backend.wgmma_attention_variants() + [
    (source, name) for source, name, _ in _cupy_backend.varlen_attention_variants()
    if "wgmma" in name]


@pytest.mark.parametrize("source, name", WGMMA_VARIANTS,
                         ids=[_short(n) for _, n in WGMMA_VARIANTS])
def test_wgmma_machine_code(source, name):
    """The Hopper kernel's SASS has what makes it a Hopper kernel: warpgroup products
    (HGMMA), tensor-map loads (UTMALDG), mbarrier operations (SYNCS), register
    reallocation (USETMAXREG); no local memory (LDL/STL), no mma.sync (HMMA); and no
    register beyond what setmaxnreg grants a consumer thread."""
    cuobjdump = _cuobjdump()
    compiled = _kernels.compile_variant(source, name, "sm_90a", verbose=True)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.cubin)
        f.flush()
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    counts = {op: ops.count(op) for op in set(ops)}
    for needed in ("HGMMA", "UTMALDG", "SYNCS", "USETMAXREG", "WARPGROUP"):
        assert counts.get(needed, 0) > 0, f"{name}: no {needed} in its SASS"
    for banned in ("LDL", "STL", "HMMA"):
        assert counts.get(banned, 0) == 0, f"{name}: {counts[banned]} {banned} in its SASS"
    consumers = int(_WGMMA_CONSUMERS.search(
                              name).group(1))
    limit = 240 if consumers == 2 else 160  # FwdWgmmaTraits::CONSUMER_REGS
    highest = max(int(r) for r in re.findall(r"\bR(\d+)\b", sass))
    assert highest < limit, f"{name}: register R{highest} used, {limit} granted"

def test_decode_configs_match_the_kernel_traits():
    """decode_config's keys per tile, threads, shared memory and bytes in flight are
    DecodeTraits', for every variant the library can request, and the combine and
    append kernels' block sizes and split limit are the .cuh's."""
    asserts = []
    for dtype, ctype in (("float16", "__half"), ("bfloat16", "__nv_bfloat16"),
                         ("float32", "float"), ("float64", "double")):
        for head_dim in _cupy_decode.DECODE_HEAD_DIMS:
            for M in (1, 2, 4, 5, 8, 9, 64):
                cfg = _cupy_decode.decode_config(head_dim - 3, head_dim, dtype, 90, M)
                assert cfg.head_dim == head_dim
                if _cupy_decode.uses_mma(dtype, head_dim, M):
                    assert cfg.name_expression == (f"cupyflash::flash_decode_mma<{ctype}, "
                                                   f"{head_dim}>")
                    assert cfg.traits == f"cupyflash::DecodeMmaTraits<{ctype}, {head_dim}>"
                else:   # (one row, two passes: 4 compute warps and PRODUCER_WARPS more)
                    targs = f"{ctype}, {head_dim}, {cfg.rows}"
                    if cfg.num_threads != 128:
                        producers = cfg.num_threads // 32 - 4
                        assert cfg.rows == 1 and producers == _cupy_decode.PRODUCER_WARPS
                        targs += f", 4, {producers}, {_cupy_decode.PRODUCER_STAGES}"
                    assert cfg.name_expression == f"cupyflash::flash_decode<{targs}>"
                    assert cfg.traits == f"cupyflash::DecodeTraits<{targs}>"
                cfgs = [cfg]
                if M == 1 and dtype in ("float16", "bfloat16"):   # blocks of several units
                    wide = _cupy_decode.decode_config(head_dim - 3, head_dim, dtype, 90, M,
                                                      warps=8)
                    assert wide.name_expression == (f"cupyflash::flash_decode<{ctype}, "
                                                    f"{head_dim}, 1, 8>")
                    assert wide.traits == f"cupyflash::DecodeTraits<{ctype}, {head_dim}, 1, 8>"
                    assert wide.num_threads == 256
                    cfgs.append(wide)
                for cfg in cfgs:
                    tr = cfg.traits
                    asserts.append(f'static_assert({tr}::BLOCK_ROWS == {cfg.rows}, "{cfg.name_expression}");')
                    for what, value in (("BLOCK_N", cfg.block_n), ("NUM_THREADS", cfg.num_threads),
                                        ("SMEM_BYTES", cfg.smem_bytes),
                                        ("INFLIGHT_BYTES", cfg.inflight_bytes)):
                        asserts.append(f'static_assert({tr}::{what} == {value}, '
                                       f'"{dtype} HEAD_DIM {head_dim} ROWS {cfg.rows} '
                                       f'{cfg.num_threads} threads: {what}");')
        if dtype in ("float16", "bfloat16"):   # the cluster kernel's launch constants
            for head_dim in _cupy_decode.CLUSTER_HEAD_DIMS:
                tr = f"cupyflash::DecodeClusterTraits<{ctype}, {head_dim}>"
                assert _cupy_decode.cluster_name(dtype, head_dim) == (
                    f"cupyflash::flash_decode_cluster<{ctype}, {head_dim}>")
                for what, value in (("CLUSTER", _cupy_decode.CLUSTER_SIZE),
                                    ("NUM_THREADS", _cupy_decode.CLUSTER_THREADS),
                                    ("SMEM_BYTES", _cupy_decode.CLUSTER_SMEM_BYTES),
                                    ("BLOCK_N", _cupy_decode.cluster_block_n(head_dim))):
                    asserts.append(f'static_assert({tr}::{what} == {value}, '
                                   f'"{dtype} HEAD_DIM {head_dim} cluster kernel: {what}");')
    asserts += [
        f'static_assert(cupyflash::COMBINE_THREADS == {_cupy_decode.COMBINE_THREADS}, "");',
        f'static_assert(cupyflash::COMBINE_MAX_SPLITS == {_cupy_decode.COMBINE_MAX_SPLITS}, "");',
        f'static_assert(cupyflash::APPEND_THREADS == {_cupy_decode.APPEND_THREADS}, "");',
        f'static_assert(cupyflash::COMBINE_MAX_DV == {max(_cupy_decode.DECODE_HEAD_DIMS)}, '
        f'"the combine holds rows of the widest head dim");',
    ]
    _compile_asserts("flash_decode.cuh", list(dict.fromkeys(asserts)))


def test_decode_param_structs_match_the_python_layout():
    """Every field of DecodeParams, DecodeCombineParams and DecodeAppendParams sits at
    the offset _cupy_decode packs it at (8 bytes each, in order)."""
    asserts = []
    for struct_name, fields in (("DecodeParams", _cupy_decode.DECODE_PARAMS),
                                ("DecodeCombineParams", _cupy_decode.COMBINE_PARAMS),
                                ("DecodeAppendParams", _cupy_decode.APPEND_PARAMS)):
        c = f"cupyflash::{struct_name}"
        asserts.append(f'static_assert(sizeof({c}) == {8 * len(fields)}, "{struct_name} size");')
        for i, (name, _) in enumerate(fields):
            asserts.append(f'static_assert(__builtin_offsetof({c}, {name}) == {8 * i}, '
                           f'"{struct_name}::{name}");')
    _compile_asserts("flash_decode.cuh", asserts)


def test_eight_warps_only_for_the_one_row_16_bit_kernel():
    assert _cupy_decode.decode_config(128, 128, "bfloat16", 90, 1, warps=8).num_threads == 256
    for dtype, M, warps in (("float32", 1, 8), ("float16", 2, 8), ("float16", 1, 6)):
        with pytest.raises(ValueError, match="warps"):
            _cupy_decode.decode_config(128, 128, dtype, 90, M, warps=warps)


def test_decode_config_pads_the_head_dim_and_chooses_rows():
    cfg = _cupy_decode.decode_config(59, 40, "float16", 80, 1)
    assert (cfg.head_dim, cfg.rows) == (64, 1)
    assert _cupy_decode.decode_config(64, 65, "float32", 90, 3).name_expression == (
        "cupyflash::flash_decode<float, 128, 4>")
    assert _cupy_decode.decode_config(128, 128, "bfloat16", 90, 32).rows == 16  # tensor cores
    assert _cupy_decode.decode_config(128, 128, "bfloat16", 90, 1).rows == 1
    assert _cupy_decode.decode_config(256, 256, "float16", 90, 4).name_expression == (
        "cupyflash::flash_decode<__half, 256, 4>")
    assert _cupy_decode.decode_config(100, 100, "float16", 90, 2).name_expression == (
        "cupyflash::flash_decode_mma<__half, 128>")
    assert _cupy_decode.decode_config(128, 128, "float32", 90, 32).rows == 8
    assert _cupy_decode.decode_config(256, 256, "float64", 90, 32).rows == 4
    with pytest.raises(ValueError, match="^attention_decode: head dims up to 256"):
        _cupy_decode.decode_config(257, 64, "float32", 90, 1)


def test_param_structs_match_the_python_layout():
    """Every field of AttentionParams, VariantParams (the packed-sequence offsets
    included) and BackwardParams (return_dbias's included) sits at the offset of the NumPy
    dtype _cupy_backend or _cupy_backward packs it with."""
    asserts = []
    for struct_name, dtype in (("AttentionParams", _cupy_backend.ATTENTION_PARAMS_DTYPE),
                               ("VariantParams", _cupy_backend.VARIANT_PARAMS_DTYPE),
                               ("BackwardParams", _cupy_backward.BACKWARD_PARAMS_DTYPE)):
        c = f"cupyflash::{struct_name}"
        asserts.append(f'static_assert(sizeof({c}) == {dtype.itemsize}, "{struct_name} size");')
        for name in dtype.names:
            asserts.append(f'static_assert(__builtin_offsetof({c}, {name}) == '
                           f'{dtype.fields[name][1]}, "{struct_name}::{name}");')
    _compile_asserts("attention_variants.cuh", asserts)
