"""Read the machine code of kernel variants: which instructions did the compiler emit?

Compiles each variant with the library's own NVRTC path, writes the cubin, runs
``cuobjdump --dump-sass`` on it (on the GPU image, or anywhere CUDA's binutils are) and
prints a histogram of the instructions that matter for attention: tensor-core ops
(HMMA, HGMMA), shared-memory matrix loads (LDSM), asynchronous copies (LDGSTS, UTMALDG),
16-byte global stores (STG.E.128), MUFU.EX2, and any local-memory traffic (LDL/STL).

    python benchmarks/sass.py                         # the d=64 and d=128 fp16 variants
    python benchmarks/sass.py --filter "__nv_bfloat16, 256" --arch sm_90a
    python benchmarks/sass.py --kernel wgmma          # the Hopper kernel (sm_90a)
    python benchmarks/sass.py --kernel wgmma_bwd      # the Hopper backward (sm_90a)
    python benchmarks/sass.py --kernel decode --filter cluster --all-ops

For the Hopper kernel it also counts what marks it (HGMMA, UTMALDG, SYNCS, USETMAXREG,
WARPGROUP barriers), reports the highest register index (a consumer thread may use at
most what setmaxnreg grants it) and prints ptxas's C75xx diagnostics, if any.
"""

import argparse
import collections
import pathlib
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from cupyflash import _cupy_backend, _cupy_backward, _cupy_decode, _kernels  # noqa: E402

WATCH = ("HMMA", "HGMMA", "LDSM", "LDGSTS", "UTMALDG", "UBLKRED", "LDS", "STS", "LDG", "STG",
         "MUFU.EX2", "BAR.SYNC", "BAR.ARV", "SHFL", "LDL", "STL", "SYNCS", "USETMAXREG",
         "WARPGROUP")


def histogram(sass, all_ops=False):
    counts = collections.Counter()
    for line in sass.splitlines():
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            op = m.group(1)
            if all_ops or any(op == w or op.startswith(w + ".") for w in WATCH):
                counts[op] += 1
    return counts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--filter", default="__half, ", help="substring of the name expression")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--dump", default=None, help="folder to write the full SASS into")
    ap.add_argument("--cuobjdump", default="cuobjdump")
    ap.add_argument("--kernel", choices=("mma", "wgmma", "wgmma_bwd", "decode"), default="mma",
                    help="the mma.sync forward variants, the Hopper (wgmma) ones, the "
                         "Hopper backward, or the decode kernels")
    ap.add_argument("--all-ops", action="store_true",
                    help="count every instruction, not only the watched ones")
    args = ap.parse_args()
    if args.kernel == "wgmma":
        args.arch = "sm_90a"
        pool = _cupy_backend.wgmma_attention_variants()
    elif args.kernel == "wgmma_bwd":
        args.arch = "sm_90a"
        pool = _cupy_backward.wgmma_backward_variants()
    elif args.kernel == "decode":
        pool = _cupy_decode.decode_variants()
    else:
        pool = _cupy_backend.all_attention_variants()
    variants = [v for v in pool if args.filter in v[1]]
    for source, name in variants:
        c = _kernels.compile_variant(source, name, args.arch, verbose=True)
        rep = _kernels.resource_report(c.log)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(c.cubin)
            f.flush()
            run = subprocess.run([args.cuobjdump, "--dump-sass", f.name], capture_output=True,
                                 text=True)
            if run.returncode:
                sys.exit(f"cuobjdump failed ({run.returncode}): {run.stderr}")
            sass = run.stdout
        if args.dump:
            out = pathlib.Path(args.dump)
            out.mkdir(parents=True, exist_ok=True)
            (out / (re.sub(r"\W+", "_", name) + ".sass")).write_text(sass)
        h = histogram(sass, args.all_ops)
        highest = max((int(r) for r in re.findall(r"\bR(\d+)\b", sass)), default=-1)
        print(f"{name} [{args.arch}] regs={rep['registers']} stack={rep['stack']} "
              f"spills={rep['spill_stores']}/{rep['spill_loads']} smem={rep['smem']} "
              f"highest=R{highest}")
        print("   " + "  ".join(f"{k}={v}" for k, v in sorted(h.items())))
        for line in c.log.splitlines():
            if re.search(r"\(C75\d\d\)|warning", line):
                print("   ptxas: " + line.strip())


if __name__ == "__main__":
    main()
