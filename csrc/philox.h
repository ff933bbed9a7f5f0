// Counter-based dropout mask shared by every backend.
//
// An element at linear (row-major) index `i` of the M x C tensor being dropped is kept iff
//   half(i % 2) of philox(counter = {lo(i / 8), hi(i / 8), 0, 0}, key = {lo(seed), hi(seed)})[(i / 2) % 4]
//       >= threshold,   threshold = floor(p * 2^16),
// where half 0 is a word's low 16 bits and half 1 its high 16 bits. One Philox-4x32-10
// evaluation gives the masks of eight consecutive elements (every bit of its four output
// words is used). Mask kernels were bound on Philox's 32-bit multiplies: one evaluation per
// element, then per four (one 31-bit number each), cut that cost by 4x and then 2x
// (benchmarks/NOTES.md #9, #20). p is thereby resolved to 2^-16: an element is dropped with
// probability floor(p * 2^16) / 2^16, within 1.5e-5 of p, and kept ones are scaled by 1 / (1 - p).
// The Triton kernels (lora_ext/kernels/philox.py), the CUDA kernels and the plain-numpy
// reference (lora_ext/reference.py) implement the same function, so a mask never has to be
// stored: every backend regenerates it from (seed, i).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LORA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LORA_HOST_DEVICE inline
#endif

namespace lora {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;

LORA_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

constexpr int kPhiloxRounds = 10;

// Round `round` (0-based) of Philox-4x32 on the counter c: its keys are the seed's two halves plus `round`
// times kPhiloxKeyA / kPhiloxKeyB (mod 2^32). Callers that run the rounds in pieces (the native masked
// step's TileKeeps) get the same values as philox4.
LORA_HOST_DEVICE void philox_round(uint32_t c[4], uint64_t seed, int round) {
  const uint32_t k0 = static_cast<uint32_t>(seed) + static_cast<uint32_t>(round) * kPhiloxKeyA;
  const uint32_t k1 = static_cast<uint32_t>(seed >> 32) + static_cast<uint32_t>(round) * kPhiloxKeyB;
  const uint32_t prev_c0 = c[0], prev_c2 = c[2];
  c[0] = mulhi32(kPhiloxRoundB, prev_c2) ^ c[1] ^ k0;
  c[2] = mulhi32(kPhiloxRoundA, prev_c0) ^ c[3] ^ k1;
  c[1] = kPhiloxRoundB * prev_c2;
  c[3] = kPhiloxRoundA * prev_c0;
}

// Philox-4x32 with 10 rounds of counter {lo(counter), hi(counter), 0, 0}: all four output
// words, in Random123's order (counter 0, key 0 gives 0x6627e8d5 first).
LORA_HOST_DEVICE void philox4(uint64_t seed, uint64_t counter, uint32_t words[4]) {
  uint32_t c[4] = {static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0, 0};
#if defined(__CUDACC__)
#pragma unroll
#elif defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 10
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) philox_round(c, seed, round);
  for (int w = 0; w < 4; ++w) words[w] = c[w];
}

// Elements per Philox evaluation.
constexpr int kMaskGroup = 8;

// floor(p * 2^16): an element is dropped with probability threshold / 2^16.
inline uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(p * 65536.0);
}

// Whether the even (low half of `word`) and the odd (high half) of the two elements whose
// 16-bit numbers `word` holds are kept.
LORA_HOST_DEVICE bool keep_low_half(uint32_t word, uint32_t threshold) { return (word & 0xFFFFu) >= threshold; }
LORA_HOST_DEVICE bool keep_high_half(uint32_t word, uint32_t threshold) { return (word >> 16) >= threshold; }

// keep[k] for the eight elements of group `group` (element 8 * group + k), as bool (CUDA) or
// uint8 flags (the CPU loop's buffer).
template <typename Flag>
LORA_HOST_DEVICE void dropout_keep_group(uint64_t seed, uint64_t group, uint32_t threshold, Flag* keep) {
  uint32_t words[4];
  philox4(seed, group, words);
  for (int w = 0; w < 4; ++w) {
    keep[2 * w] = static_cast<Flag>(keep_low_half(words[w], threshold));
    keep[2 * w + 1] = static_cast<Flag>(keep_high_half(words[w], threshold));
  }
}

// The mask of one element (see the top of this file).
LORA_HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t index, uint32_t threshold) {
  uint32_t words[4];
  philox4(seed, index >> 3, words);
  const uint32_t word = words[(index >> 1) & 3];
  return (index & 1) ? keep_high_half(word, threshold) : keep_low_half(word, threshold);
}

}  // namespace lora
