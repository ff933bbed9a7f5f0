// How the native 'post' backward step (cuda/masked_grad_y.cu) splits its (M, C) dY into programs.
// Host-side arithmetic only, so that the CPU build exposes it too (lora.cpp: masked_grad_y_grid,
// tested against a brute-force search in tests/test_ops.py).
//
// The kernel's program (i, j) owns blocks_m_per_group 64-row blocks and blocks_c_per_group
// 128-column blocks of dY, and all programs are resident at once (at most `slots`: programs per SM
// times SMs). So the step lasts as long as its longest program, blocks_m_per_group *
// blocks_c_per_group tiles. Two float32 partials are summed afterwards: c_groups x M_pad rows of
// grad_xa and m_groups x C_pad rows of grad_B, R_PAD floats each.
//
// The first rule (kSqrt, until 12-05) picked m_groups ~ sqrt(slots * M / C), so that the two
// partials are about equal, and rounded the blocks per group up: at 8192 x 4096 and 264 slots that
// is 22 x 11 programs of 6 x 3 = 18 tiles where 16 suffice, and at 8192 x 1024 172 programs of
// 6 tiles where 256 programs of 4 fit (Nsight Compute, H100: 0.92 waves, SM active cycles 83% of
// the elapsed ones; benchmarks/NOTES.md #56). kBalanced searches every split for the fewest tiles
// in the longest program, within the slots and a memory cap, ties to the smaller partials, then to
// fewer column blocks per program (each column block after a program's first reads and rewrites
// its grad_xa partial rows). Below two tiles a program counts as two: its fixed costs (B's panel,
// xa's rows, the grad_B partial's write, its share of the sums) are about a tile's, and at
// 4096 x 512 (256 tiles, 264 slots) 256 one-tile programs took 15.4 us where 128 two-tile ones
// took 13.5 (H100, #56), so there the fewer programs with smaller partials win.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>

namespace lora {

constexpr int64_t kMaskedTileRows = 64;
constexpr int64_t kMaskedTileCols = 128;

// A program of fewer tiles counts as this many (see above).
constexpr int64_t kMaskedMinCountedTiles = 2;

struct MaskedGradYGrid {
  int64_t m_groups = 1, c_groups = 1;
  int64_t blocks_m_per_group = 1, blocks_c_per_group = 1;
  int64_t partial_bytes = 0;  // both float32 partials together
  int64_t longest_program_tiles() const { return blocks_m_per_group * blocks_c_per_group; }
};

enum class MaskedGradYGridRule : int { kBalanced = 0, kSqrt = 1 };

// The rule's name, "balanced" or "sqrt" (the setter, the binding and LORA_EXT_MASKED_GRAD_Y_GRID use these).
inline const char* masked_grad_y_grid_rule_name(MaskedGradYGridRule rule) {
  return rule == MaskedGradYGridRule::kSqrt ? "sqrt" : "balanced";
}

// The rule of that name into *rule; false (and *rule untouched) for any other name.
inline bool masked_grad_y_grid_rule_named(const std::string& name, MaskedGradYGridRule* rule) {
  if (name != "balanced" && name != "sqrt") return false;
  *rule = name == "sqrt" ? MaskedGradYGridRule::kSqrt : MaskedGradYGridRule::kBalanced;
  return true;
}

inline int64_t masked_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The rank the kernel is compiled for (its R_PAD): r <= 64 padded to 16, 32 or 64.
inline int masked_rank_pad(int64_t r) { return r <= 16 ? 16 : (r <= 32 ? 32 : 64); }

inline int64_t masked_partial_bytes(int64_t M, int64_t C, int r_pad, int64_t m_groups, int64_t c_groups) {
  const int64_t M_pad = masked_ceil_div(M, kMaskedTileRows) * kMaskedTileRows;
  const int64_t C_pad = masked_ceil_div(C, kMaskedTileCols) * kMaskedTileCols;
  return (c_groups * M_pad + m_groups * C_pad) * r_pad * static_cast<int64_t>(sizeof(float));
}

// The grid with m_groups row groups of `a` blocks and column groups of `b` blocks.
inline MaskedGradYGrid masked_grid_of(int64_t M, int64_t C, int r_pad, int64_t a, int64_t b) {
  MaskedGradYGrid grid;
  const int64_t m_blocks = masked_ceil_div(M, kMaskedTileRows), c_blocks = masked_ceil_div(C, kMaskedTileCols);
  grid.m_groups = masked_ceil_div(m_blocks, a);
  grid.c_groups = masked_ceil_div(c_blocks, b);
  // The fewest blocks per group that give the same group counts: no program longer than it needs.
  grid.blocks_m_per_group = masked_ceil_div(m_blocks, grid.m_groups);
  grid.blocks_c_per_group = masked_ceil_div(c_blocks, grid.c_groups);
  grid.partial_bytes = masked_partial_bytes(M, C, r_pad, grid.m_groups, grid.c_groups);
  return grid;
}

// The first rule (kept for A/B measurements: set_masked_grad_y_grid_rule).
inline MaskedGradYGrid masked_grad_y_sqrt_grid(int64_t M, int64_t C, int r_pad, int64_t slots) {
  const int64_t m_blocks = masked_ceil_div(M, kMaskedTileRows), c_blocks = masked_ceil_div(C, kMaskedTileCols);
  const double programs = static_cast<double>(std::max<int64_t>(slots, 1));
  const int64_t m_groups_wanted = std::clamp<int64_t>(
      std::llround(std::sqrt(programs * static_cast<double>(M) / static_cast<double>(C))), 1, m_blocks);
  const int64_t a = masked_ceil_div(m_blocks, m_groups_wanted);
  const int64_t m_groups = masked_ceil_div(m_blocks, a);
  const int64_t c_groups_wanted =
      std::clamp<int64_t>(std::llround(programs / static_cast<double>(m_groups)), 1, c_blocks);
  return masked_grid_of(M, C, r_pad, a, masked_ceil_div(c_blocks, c_groups_wanted));
}

// kBalanced: the fewest tiles in the longest program with at most `slots` programs and partials of
// at most max(max_partial_bytes, what kSqrt allocates) bytes (the caller passes dx's size: allocated
// after this step, so partials up to it do not raise the backward's peak; 0: no more than kSqrt).
// One pass over the row-group counts, at most `slots` steps on the host.
inline MaskedGradYGrid masked_grad_y_balanced_grid(int64_t M, int64_t C, int r_pad, int64_t slots,
                                                   int64_t max_partial_bytes) {
  slots = std::max<int64_t>(slots, 1);
  const MaskedGradYGrid first_rule = masked_grad_y_sqrt_grid(M, C, r_pad, slots);
  const int64_t cap = std::max(max_partial_bytes, first_rule.partial_bytes);
  const int64_t m_blocks = masked_ceil_div(M, kMaskedTileRows), c_blocks = masked_ceil_div(C, kMaskedTileCols);
  const int64_t M_pad = m_blocks * kMaskedTileRows, C_pad = c_blocks * kMaskedTileCols;
  const int64_t bytes_per_row = static_cast<int64_t>(r_pad) * static_cast<int64_t>(sizeof(float));
  // Fewest tiles in the longest program (below kMaskedMinCountedTiles counted as that), then smaller
  // partials, then fewer column blocks per program.
  const auto key = [](const MaskedGradYGrid& g) {
    return std::make_tuple(std::max<int64_t>(g.longest_program_tiles(), kMaskedMinCountedTiles), g.partial_bytes,
                           g.blocks_c_per_group);
  };
  MaskedGradYGrid best;
  bool found = false;
  // Every row-group count the slots allow, each with the fewest row blocks per program that gives
  // it (a count no split gives exactly is skipped: its programs are another count's). At most
  // `slots` steps, whatever the token count.
  for (int64_t m_groups = 1; m_groups <= std::min(slots, m_blocks); ++m_groups) {
    const int64_t a = masked_ceil_div(m_blocks, m_groups);
    if (masked_ceil_div(m_blocks, a) != m_groups) continue;
    // Column groups: as many as the slots allow, as few as the cap needs.
    int64_t c_groups = std::min(c_blocks, slots / m_groups);
    const int64_t rows_left_for_grad_xa = cap / bytes_per_row - m_groups * C_pad;
    if (rows_left_for_grad_xa < M_pad) continue;  // not even one column group fits
    c_groups = std::min(c_groups, rows_left_for_grad_xa / M_pad);
    // More column blocks per program only lengthen it, except up to the tiles that count anyway.
    const int64_t b = std::max(masked_ceil_div(c_blocks, c_groups), masked_ceil_div(kMaskedMinCountedTiles, a));
    const MaskedGradYGrid grid = masked_grid_of(M, C, r_pad, a, b);
    if (!found || key(grid) < key(best)) best = grid, found = true;
  }
  // Always found: one program (one row group, one column group) fits the slots, and the cap, which
  // is at least kSqrt's bytes, so at least M_pad + C_pad rows. The fallback only keeps that explicit.
  return found ? best : first_rule;
}

inline MaskedGradYGrid masked_grad_y_grid(MaskedGradYGridRule rule, int64_t M, int64_t C, int r_pad, int64_t slots,
                                          int64_t max_partial_bytes) {
  return rule == MaskedGradYGridRule::kSqrt ? masked_grad_y_sqrt_grid(M, C, r_pad, slots)
                                            : masked_grad_y_balanced_grid(M, C, r_pad, slots, max_partial_bytes);
}

}  // namespace lora
