// Patch 84's Philox in pieces against philox.h's philox4, on the host: TileKeeps (in the patch) runs the ten
// rounds (philox_round, which the patch adds to philox.h) split over the products' K steps (8 for the grad_xa
// warps, 4 for the grad_B warps, 1 for the others). Same words expected:
// g++ -O2 -std=c++17 benchmarks/patches/84_philox_stepped_check.cpp -o /tmp/philox_check && /tmp/philox_check
// (12-07 00:40: 600,000 evaluations, 0 mismatched words.) Since 12-07 06:05 philox_round derives its keys from
// (seed, round) itself and philox4 runs it too (the same words as the incrementing philox4 on 1,000,000
// evaluations; the same SASS for every CUDA source): this check now tests the stepping only. Needs patch 84 no
// longer: main has it.
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>

#include "../../csrc/philox.h"
using namespace lora;
// TileKeeps' key formula and its split of the rounds, stepped as the kernel steps them.
static void stepped(uint64_t seed, uint64_t group, int steps, uint32_t w[4]) {
  uint32_t c[4] = {(uint32_t)group, (uint32_t)(group >> 32), 0, 0};
  auto rounds = [&](int first, int end) {
    for (int round = first; round < end; ++round) {
      philox_round(c, seed, round);
    }
  };
  if (steps == 0) rounds(0, 10);
  else for (int s = 0; s < steps; ++s) rounds(s * 10 / steps, (s + 1) * 10 / steps);
  for (int i = 0; i < 4; ++i) w[i] = c[i];
}
int main() {
  srand(7); long bad = 0, n = 0;
  for (int it = 0; it < 200000; ++it) {
    uint64_t seed = ((uint64_t)rand() << 33) ^ ((uint64_t)rand() << 11) ^ rand();
    uint64_t group = ((uint64_t)rand() << 31) ^ rand();
    uint32_t ref[4]; philox4(seed, group, ref);
    for (int steps : {0, 4, 8}) {
      uint32_t w[4]; stepped(seed, group, steps, w); ++n;
      for (int i = 0; i < 4; ++i) bad += w[i] != ref[i];
    }
  }
  printf("checked %ld, mismatched words %ld\n", n, bad);
  return bad != 0;
}
