// Counter-based dropout mask shared by every backend.
//
// An element at linear (row-major) index `i` of the M x C tensor being dropped is kept iff
//   (philox(counter = {lo(i / 4), hi(i / 4), 0, 0}, key = {lo(seed), hi(seed)})[i % 4] >> 1)
//       >= threshold,   threshold = floor(p * 2^31).
// One Philox-4x32-10 evaluation gives the mask of four consecutive elements (all four of its
// output words are used): the mask costs a quarter of the 32-bit multiplies it cost when each
// element took the first word of its own evaluation, and a mask kernel was bound on those
// multiplies (H200: 34 us for the 8 M elements of a k/v LoRA term, benchmarks/NOTES.md).
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

// Philox-4x32 with 10 rounds of counter {lo(counter), hi(counter), 0, 0}: all four output
// words, in Random123's order (counter 0, key 0 gives 0x6627e8d5 first).
LORA_HOST_DEVICE void philox4(uint64_t seed, uint64_t counter, uint32_t words[4]) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#elif defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t prev_c0 = c0, prev_c2 = c2;
    c0 = mulhi32(kPhiloxRoundB, prev_c2) ^ c1 ^ k0;
    c2 = mulhi32(kPhiloxRoundA, prev_c0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * prev_c2;
    c3 = kPhiloxRoundA * prev_c0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  words[0] = c0;
  words[1] = c1;
  words[2] = c2;
  words[3] = c3;
}

// floor(p * 2^31): an element is dropped with probability threshold / 2^31.
inline uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(p * 2147483648.0);
}

LORA_HOST_DEVICE bool keep_word(uint32_t word, uint32_t threshold) { return (word >> 1) >= threshold; }

// The mask of one element (see the top of this file).
LORA_HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t index, uint32_t threshold) {
  uint32_t words[4];
  philox4(seed, index >> 2, words);
  return keep_word(words[index & 3], threshold);
}

}  // namespace lora
