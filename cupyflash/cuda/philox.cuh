// Philox4x32-10 and the keep mask of attention dropout.
//
// Philox (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3",
// SC 2011) is a counter-based generator: a keyed bijection of a 128-bit counter, so every
// thread computes the random word of the scores it owns from their coordinates alone, in
// any order, with no state. The forward and the backward kernels (and the NumPy backend,
// cupyflash/_philox.py, bit for bit) therefore draw the same mask whatever their tiles.
// This is Random123's philox4x32 with 10 rounds, the generator of cuRAND's
// curand_Philox4x32_10.
//
// One round, with the counter (c0, c1, c2, c3) and the round key (k0, k1):
//
//   hi0:lo0 = M0 * c0,  hi1:lo1 = M1 * c2            (32 x 32 -> 64-bit products)
//   (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
//
// and between rounds the key is bumped by the Weyl constants: k0 += W0, k1 += W1 (mod 2^32).
//
// Dropout: the key is the 64-bit seed, (seed_lo, seed_hi) = (seed & 0xFFFFFFFF, seed >> 32).
// The score of batch element b (the row-major flat index over the broadcast batch shape),
// query row i and key column j takes output word j & 3 of the counter
//
//   (j >> 2, i, b & 0xFFFFFFFF, b >> 32)
//
// so one call serves four neighbouring keys of a row. It is dropped iff that word is below
// threshold = floor(dropout_p * 2^32), kept iff word >= threshold (threshold 0 keeps all).
#pragma once

namespace cupyflash {

constexpr unsigned int PHILOX_M4x32_0 = 0xD2511F53u;  // round multipliers
constexpr unsigned int PHILOX_M4x32_1 = 0xCD9E8D57u;
constexpr unsigned int PHILOX_W32_0 = 0x9E3779B9u;    // Weyl key increments: golden ratio,
constexpr unsigned int PHILOX_W32_1 = 0xBB67AE85u;    // sqrt(3) - 1
constexpr int PHILOX_ROUNDS = 10;

// One Philox4x32 round.
__device__ __forceinline__ uint4 philox4x32_round(uint4 c, uint2 key) {
    // hi:lo = M * c, the full 64-bit products (the low half is the ordinary product)
    const unsigned int lo0 = PHILOX_M4x32_0 * c.x;
    const unsigned int hi0 = __umulhi(PHILOX_M4x32_0, c.x);
    const unsigned int lo1 = PHILOX_M4x32_1 * c.z;
    const unsigned int hi1 = __umulhi(PHILOX_M4x32_1, c.z);
    return make_uint4(hi1 ^ c.y ^ key.x, lo1, hi0 ^ c.w ^ key.y, lo0);
}

// Philox4x32-10: four uniform 32-bit words (x first) of the counter under the key.
__device__ __forceinline__ uint4 philox4x32_10(uint4 counter, uint2 key) {
#pragma unroll
    for (int r = 0; r < PHILOX_ROUNDS; ++r) {
        if (r > 0) {  // bump the key between rounds (unsigned: wraps mod 2^32)
            key.x += PHILOX_W32_0;
            key.y += PHILOX_W32_1;
        }
        counter = philox4x32_round(counter, key);
    }
    return counter;
}

// Output word w (0..3) of a Philox result.
__device__ __forceinline__ unsigned int philox_word(uint4 r, unsigned int w) {
    return w == 0 ? r.x : w == 1 ? r.y : w == 2 ? r.z : r.w;
}

// True where dropout keeps the score (b, i, j): word j & 3 of Philox4x32-10 on the counter
// (j >> 2, i, b_lo, b_hi) under the key (seed_lo, seed_hi) is >= threshold. A kernel that
// owns four neighbouring keys j = 4g .. 4g + 3 should call philox4x32_10 once and test
// its four words instead.
__device__ __forceinline__ bool dropout_keep(unsigned int seed_lo, unsigned int seed_hi,
                                             unsigned int threshold, unsigned long long b,
                                             unsigned int i, unsigned int j) {
    const uint4 counter = make_uint4(j >> 2, i, static_cast<unsigned int>(b),
                                     static_cast<unsigned int>(b >> 32));
    const uint4 r = philox4x32_10(counter, make_uint2(seed_lo, seed_hi));
    return philox_word(r, j & 3u) >= threshold;
}

}  // namespace cupyflash
