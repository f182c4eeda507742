"""Per-block timeline of the decode split kernel, and the pure-read ceiling at small sizes.

A lab tool of session 12 (benchmarks/NOTES.md): it copies the package to
_exp/tlpkg, inserts globaltimer stamps into that copy of cuda/flash_decode.cuh (thread 0
of every block writes them to a __device__ buffer, indexed by an atomic ticket, so that
several queued calls are recorded) and prints, per call: the gap after the previous call,
when the first tile landed, when the main loop ended, the partial store, the split
counter, the last block's merge and the end. Stamps whose anchor text is gone from the
kernel are skipped (printed as "skip stamp"). The one-row kernel by default; TL_CASES=B:L:H,...
(H query heads over 8 kv heads) picks the cases, the tensor-core kernel for H > 8
(TL_MMA_ONE_ROW=1: for H = 8 too). Stamp 7 marks the middle of a block's main loop (the
.npy records in $OUT/w keep every stamp). Before that it times flat 16-byte reads of
32 and 128 MiB (rotating over copies larger than L2) and cupy copies of the same bytes:
what any kernel can reach at batch 1 and 4 (TL_SKIP_READS=1 skips them). Each call's line
also counts the SMs its blocks ran on and the most blocks one SM took. TL_PAIRS=n (session
23) also times and stamps the same cache at n places in memory and prints which blocks
end late at each place.

    python3 benchmarks/decode_timeline.py     # on the GPU, from the repository root
"""
import sys, shutil, pathlib, math, json, os
import numpy as np
REPO = pathlib.Path(__file__).resolve().parents[1]
(REPO / '_exp').mkdir(exist_ok=True)
TLD = REPO / '_exp' / 'tlpkg'
shutil.rmtree(TLD, ignore_errors=True)
# TL_PKG: another copy of the package to stamp (e.g. _exp/pkgs/cf_head, the last commit's)
shutil.copytree(REPO / os.environ.get('TL_PKG', 'cupyflash'), TLD / 'cupyflash',
                ignore=shutil.ignore_patterns('__pycache__'))
f = TLD / 'cupyflash/cuda/flash_decode.cuh'
src = f.read_text()
HDR = r'''
__device__ unsigned long long tl_buf[1 << 20];
__device__ unsigned tl_count;
__shared__ unsigned tl_ticket;
__device__ __forceinline__ unsigned long long tl_now() {
    unsigned long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t; }
#define TL(k) do { if (threadIdx.x == 0) tl_buf[(tl_ticket & 0x1ffff) * 16 + (k)] = tl_now(); } while (0)
#define TL_START() do { if (threadIdx.x == 0) { tl_ticket = atomicAdd(&tl_count, 1); \
    unsigned sm, id; asm volatile("mov.u32 %0, %%smid;" : "=r"(sm)); asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(id)); \
    tl_buf[(tl_ticket & 0x1ffff) * 16 + 6] = (static_cast<unsigned long long>(id) << 32) | sm; } TL(0); } while (0)
'''
def sub1(s, old, new):
    assert s.count(old) >= 1, old
    return s.replace(old, new, 1)
src = sub1(src, '#include "attention_common.cuh"\n', '#include "attention_common.cuh"\n' + HDR)
# SIMT kernel: start after `if (b >= p.B) return;` in split_unit (the one-row body)
i = src.index('split_unit(const DecodeParams& p, unsigned unit')
j = src.index('if (b >= p.B) return;', i) + len('if (b >= p.B) return;')
src = src[:j] + ' TL_START();' + src[j:]
i = src.index('decode::cp_async_wait<STAGES - 1>();', j) + len('decode::cp_async_wait<STAGES - 1>();')
src = src[:i] + ' if (j == 0) TL(1); if (j == num_tiles / 2) TL(7);' + src[i:]
src = sub1(src, '    else main_loop(decode::BoolC<false>{});\n', '    else main_loop(decode::BoolC<false>{});\n    TL(2);\n')
src = sub1(src, '    if (one_split || p.split_counters == nullptr) return;\n',
           '    TL(3);\n    if (one_split || p.split_counters == nullptr) return;\n')
# tensor-core kernel: start, first tile, loop end (its tail shares the stamps above)
src = sub1(src, 'if (b >= p.B) return;\n\n    const int tid = threadIdx.x;\n    const int warp = tid / 32;',
           'if (b >= p.B) return;\n    TL_START();\n\n    const int tid = threadIdx.x;\n    const int warp = tid / 32;')
src = sub1(src, '        decode::cp_async_wait<STAGES - 1>();\n        __syncwarp();\n',
           '        decode::cp_async_wait<STAGES - 1>();\n        __syncwarp();\n        if (j == 0) TL(1);\n        if (j == num_tiles / 2) TL(7);\n')
src = sub1(src, '    decode::cp_async_wait<0>();\n    // every thread\'s copies have landed and every warp is done',
           '    TL(2);\n    decode::cp_async_wait<0>();\n    // every thread\'s copies have landed and every warp is done')
src = sub1(src, '    if (!is_last) return;\n', '    TL(4);\n    if (!is_last) return;\n')
src = sub1(src, 'combine_splits<T, NUM_WARPS>(p, smem_raw, b, hk, rc * ROWS, min(ROWS, M - rc * ROWS));\n',
           'combine_splits<T, NUM_WARPS>(p, smem_raw, b, hk, rc * ROWS, min(ROWS, M - rc * ROWS));\n    TL(5);\n')

def ins(s, anchor, before='', after=''):
    if s.count(anchor) != 1:
        print('skip stamp', anchor[:40].strip()); return s
    return s.replace(anchor, before + anchor + after)
src = ins(src, "    // -- merge the warps through shared memory (the pipeline's, now idle)\n    decode::cp_async_wait<0>();\n    // every thread's copies have landed and every thread is done reading its stages\n    __syncthreads();\n", '    TL(8);\n', '    TL(9);\n')
src = src.replace("    // every warp's (m, l, acc) is in shared memory\n    __syncthreads();\n\n    // (the block's", "    // every warp's (m, l, acc) is in shared memory\n    __syncthreads();\n    TL(10);\n\n    // (the block's")
src = ins(src, "    // the weights are in shared memory\n    __syncthreads();\n", '', '    TL(11);\n')
src = ins(src, "    Acc* w_s = reinterpret_cast<Acc*>(smem_raw);          // (S, R)\n", '', '    TL(12);\n')
src = ins(src, "    // every row's weights are in shared memory\n    __syncthreads();\n", '    TL(13);\n', '    TL(14);\n')
src = ins(src, "    if (groups == 1) return;\n    // every group's sums are in shared memory\n", '    TL(15);\n', '')
f.write_text(src)

sys.path.insert(0, str(TLD))
sys.path.insert(1, str(REPO / 'benchmarks'))
import cupy
import cupyflash
assert str(TLD) in cupyflash.__file__, cupyflash.__file__
from cupyflash import _cupy_decode, _kernels
import decode as bench
if os.environ.get('TL_MMA_ONE_ROW'):   # one row on the tensor-core kernel
    _cupy_decode.MMA_ONE_ROW = True
def gptr(m, name):
    r = m.get_global_var(name)
    return int(r[0] if isinstance(r, tuple) else r)

OUT = pathlib.Path(os.environ.get('OUT', '/tmp')) / 'w'
OUT.mkdir(parents=True, exist_ok=True)
res = {}
stream = cupy.cuda.Stream(non_blocking=True)
with stream:
    timer = bench.QueueTimer(cupy, 20, 5)
    copy_gbs = bench.copy_bandwidth(cupy, timer)
    print(f"copy 1 GiB: {copy_gbs:.0f} GB/s", flush=True)
    # ---- pure-read ceiling
    RD = r'''
    extern "C" __global__ void __launch_bounds__(256, 4) rd(const uint4* __restrict__ a, long long n, unsigned* out) {
        unsigned x = 0; long long stride = (long long)gridDim.x * 256;
        long long i = blockIdx.x * 256ll + threadIdx.x;
        for (; i + 7 * stride < n; i += 8 * stride) {
            uint4 v[8];
#pragma unroll
            for (int u = 0; u < 8; ++u) v[u] = __ldcs(a + i + u * stride);
#pragma unroll
            for (int u = 0; u < 8; ++u) x ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
        }
        for (; i < n; i += stride) { uint4 v = __ldcs(a + i); x ^= v.x ^ v.y ^ v.z ^ v.w; }
        if (x == 0x12345678u) out[0] = x;
    }'''
    rd = cupy.RawKernel(RD, 'rd')
    sink = cupy.zeros(4, np.uint32)
    for mib in (() if os.environ.get('TL_SKIP_READS') else (32, 128)):
        nbytes = mib << 20
        copies = max(2, math.ceil(200 * 2**20 / nbytes))
        bufs = [cupy.random.random(nbytes // 8).view(np.uint8) for _ in range(copies)]
        for mult in (1, 2, 4, 8):
            grid = 132 * mult
            fns = [lambda b=b: rd((grid,), (256,), (b, np.int64(nbytes // 16), sink)) for b in bufs]
            ms = timer(fns, nbytes / 2.5e9)
            print(f"read {mib} MiB grid {grid}: {ms*1e3:.2f} us {nbytes/ms/1e6:.0f} GB/s ({nbytes/ms/1e6/copy_gbs:.2f} of copy)", flush=True)
            res[f"read_{mib}_{grid}"] = ms
        half = nbytes // 2
        srcs = [b[:half] for b in bufs]; dsts = [b[half:] for b in bufs]
        ms = timer([lambda s=s, d=d: d.__setitem__(Ellipsis, s) for s, d in zip(srcs, dsts)], nbytes / 2.5e9)
        print(f"copy {mib//2} MiB -> {mib//2} MiB: {ms*1e3:.2f} us {nbytes/ms/1e6:.0f} GB/s", flush=True)
        del bufs, srcs, dsts
        cupy.get_default_memory_pool().free_all_blocks()

    # ---- timelines
    mod = None
    dt = np.dtype('float16')
    cases = [(1, 8192, None, 8), (1, 8192, 32, 8), (4, 8192, None, 8)]
    if os.environ.get('TL_CASES'):   # B:L:H,... (H query heads over 8 kv heads, splits chosen)
        cases = [tuple(int(x) for x in c.split(':')) for c in os.environ['TL_CASES'].split(',')]
        cases = [(B, L, None, H) for B, L, H in cases]
    for (B, L, splits, H) in cases:
        Hk = 8; D = 128
        kv_bytes = 2 * B * L * Hk * D * 2
        copies = max(1, math.ceil(200e6 / kv_bytes))
        q = bench._random(cupy, (B, 1, H, D), dt)
        caches = [(bench._random(cupy, (B, L, Hk, D), dt), bench._random(cupy, (B, L, Hk, D), dt)) for _ in range(copies)]
        seqlens = cupy.full((B,), L, dtype=np.int32)
        def launch(k, v):
            return lambda: _cupy_decode.attention_decode(q, k, v, seqlens, None, None, None,
                num_splits=splits, causal=False, scale=D ** -0.5, max_keys=L)
        fns = [launch(k, v) for k, v in caches]
        ms = timer(fns, kv_bytes / 2.5e9)
        cfg = _cupy_decode.decode_config(D, D, 'float16', 90, H // Hk)
        m, _ = _kernels._load(0, _cupy_decode.SOURCE, cfg.name_expression, 'sm_90a', cfg.smem_bytes)
        buf = cupy.ndarray((1 << 20,), np.uint64, cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(gptr(m, 'tl_buf'), 8 << 20, m), 0))
        cnt = cupy.ndarray((1,), np.uint32, cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(gptr(m, 'tl_count'), 4, m), 0))
        if os.environ.get('TL_PAIRS'):
            # session 23: the same cache at TL_PAIRS places in memory (each allocated on
            # its own, all kept), one call queue each: which blocks end late, by place
            pairs = [caches[0]]
            for _ in range(int(os.environ['TL_PAIRS']) - 1):
                k, v = cupy.empty_like(caches[0][0]), cupy.empty_like(caches[0][1])
                k[...] = caches[0][0]
                v[...] = caches[0][1]
                pairs.append((k, v))
            nq = 8
            for pi, pair in enumerate(pairs):
                pms = timer([launch(*pair)], kv_bytes / 2.5e9)
                stream.synchronize()
                buf.fill(0); cnt.fill(0)
                timer.spin((1,), (1,), (np.uint64(3_000_000),))
                for c in range(nq):
                    launch(*pair)()
                stream.synchronize()
                n = int(cnt.get()[0]); per = n // nq
                t = buf[: n * 16].get().reshape(n, 16).astype(np.int64)
                np.save(OUT / f"tl_pair{pi}_B{B}_L{L}.npy", t)
                ends = []   # (call, block id) -> loop end after the call's first start, us
                for c in range(1, nq):
                    r = t[c * per:(c + 1) * per]
                    ids = r[:, 6] >> 32
                    e = np.zeros(per)
                    e[ids] = (r[:, 2] - r[:, 0].min()) / 1e3
                    ends.append(e)
                ends = np.array(ends)
                late = ends - np.median(ends, axis=1, keepdims=True)
                mean_late = late.mean(axis=0)
                cc = np.corrcoef(late)[np.triu_indices(len(late), 1)]
                print(f"pair {pi}: {pms*1e3:.2f} us/call; loop ends median "
                      f"{np.median(ends):.1f}, max-median per call "
                      f"{np.round(late.max(axis=1), 1).tolist()}; lateness corr between "
                      f"calls {cc.mean():.2f} [{cc.min():.2f}, {cc.max():.2f}]", flush=True)
                if per == B * Hk:
                    by = mean_late.reshape(B, Hk)
                    print(f"   mean lateness by b:  {np.round(by.mean(1), 1).tolist()}")
                    print(f"   mean lateness by hk: {np.round(by.mean(0), 1).tolist()}")
                    latest = np.argsort(-mean_late)[:8]
                    print(f"   latest blocks (id: us): "
                          f"{[(int(i), round(float(mean_late[i]), 1)) for i in latest]}",
                          flush=True)
            del pairs
        # queue: spin then 6 calls; record all
        stream.synchronize()
        buf.fill(0); cnt.fill(0)
        timer.spin((1,), (1,), (np.uint64(3_000_000),))
        ncalls = 6
        for c in range(ncalls):
            fns[c % len(fns)]()
        stream.synchronize()
        n = int(cnt.get()[0])
        t = buf[: n * 16].get().reshape(n, 16)
        np.save(OUT / f"tl_B{B}_H{H}_L{L}_s{splits}.npy", t)
        per = n // ncalls
        print(f"\nB={B} H={H}/{Hk} L={L} splits={splits}: queue {ms*1e3:.2f} us/call ({kv_bytes/ms/1e6:.0f} GB/s); {n} block records, {per} per call", flush=True)
        for c in range(ncalls):
            r = t[c * per:(c + 1) * per].astype(np.int64)
            t0 = r[:, 0].min()
            rel = lambda k: (r[:, k] - t0) / 1e3
            end = np.maximum(r[:, 5], np.maximum(r[:, 4], r[:, 3]))
            prev_end = None
            if c > 0:
                rp = t[(c - 1) * per:c * per].astype(np.int64)
                prev_end = np.maximum(rp[:, 5], np.maximum(rp[:, 4], rp[:, 3])).max()
            gap = (t0 - prev_end) / 1e3 if prev_end is not None else float('nan')
            sm_ids = (r[:, 6] & 0xffffffff).tolist()
            sms, crowd = len(set(sm_ids)), max(sm_ids.count(x) for x in set(sm_ids))
            # this call's blocks that shared their SM with another of its blocks
            shared = sum(sm_ids.count(x) for x in set(sm_ids) if sm_ids.count(x) > 1)
            def med(a, b_):  # median us from stamp a to stamp b_ where a block has both
                sel_ = (r[:, a] > 0) & (r[:, b_] > 0)
                return np.median((r[sel_, b_] - r[sel_, a]) / 1e3) if sel_.any() else float('nan')
            decided = r[r[:, 4] > 0, 4]   # (none with one split: no counter)
            last_decided = (f"{(decided.max() - r[:, 2].max()) / 1e3:.2f}" if len(decided)
                            else "-")
            print(f" call {c}: gap from prev end {gap:.2f} us; starts {rel(0).min():.2f}-{rel(0).max():.2f}; "
                  f"first tile +{np.median(rel(1)-rel(0)):.2f} (max {np.max(rel(1)-rel(0)):.2f}); "
                  f"loop end {np.median(rel(2)):.2f} [{rel(2).min():.2f}, {rel(2).max():.2f}]; "
                  f"stored {med(2, 3):.2f} after; decided {med(3, 4):.2f} after "
                  f"(last loop end to it {last_decided}); "
                  f"combine {med(4, 5):.2f}; "
                  f"end {(end.max()-t0)/1e3:.2f}; SMs {sms}, at most {crowd} blocks on one "
                  f"({shared} blocks share an SM)", flush=True)
        rr = t[2*per:5*per].astype(np.int64); sel = rr[:, 5] > 0
        def stamped(x, a, b_):  # both stamps set (a skipped stamp's slot stays 0)
            return x[(x[:, a] > 0) & (x[:, b_] > 0)]
        for a, b_ in [(2, 8), (8, 9), (9, 10), (10, 11), (11, 3), (3, 4)]:
            x = stamped(rr, a, b_)
            if len(x):
                print(f'  {a}->{b_}: {np.median(x[:, b_] - x[:, a]) / 1e3:.2f} us')
        l = rr[sel]
        for a, b_ in [(4, 12), (12, 13), (13, 14), (14, 15), (15, 5)]:
            x = stamped(l, a, b_)
            if len(x):
                print(f'  last {a}->{b_}: {np.median(x[:, b_] - x[:, a]) / 1e3:.2f} us')
        vals = np.unique(np.diff(np.sort(t[:, 0].astype(np.int64))))
        print(" globaltimer distinct small diffs:", vals[:10])
        res[f"tl_{B}_{L}_{splits}"] = ms
        del caches
        cupy.get_default_memory_pool().free_all_blocks()
json.dump(res, open(OUT / 'res.json', 'w'))
