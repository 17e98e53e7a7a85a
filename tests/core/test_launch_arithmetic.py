"""The host-side arithmetic of the CUDA launches, from csrc/multi_tensor.h itself: a tiny host-only
C++ program includes the header (no torch, no CUDA), prints what its functions return, and the
tests check properties of the answers.

- Gram tiles (the CUDA Gram for K > 8, gram_tiles.cuh): every pair k <= l < K is summed by exactly
  one (tile, slot), the slot's pair is (8 bi + i, 8 bj + j), and the bytes a Gram reads per element
  position (passes x K elements) are at most twice the minimum for K = 9..40.
- whole_wave_blocks (grid_for in cuda_launch.cuh): a chunk kernel's grid is one block per work item
  up to exactly one wave of resident blocks, never more; chunk_slices and slice_begin (the plan's
  combine and AdamW): chunks split into the fewest slices that keep the last wave >= 90% busy.
"""
import shutil
import subprocess
from pathlib import Path

import pytest

from fused_balance import _extension

PROGRAM = r"""
#include <cstdio>
#include "multi_tensor.h"
using namespace fused_balance;

int main() {
  for (int K = 1; K <= 70; ++K) {
    const int blocks = gram_row_blocks(K);
    std::printf("K %d %d %d %d\n", K, gram_tile_count(K), gram_tile_passes(K, 8), pair_count(K));
    for (int t = 0; t < gram_tile_count(K); ++t) {
      int bi, bj;
      pair_of_index(t, blocks, &bi, &bj);
      for (int i = 0; i < kGramTile; ++i)
        for (int j = 0; j < kGramTile; ++j) {
          const int q = gram_tile_pair(K, bi, bj, i, j);
          int k = -1, l = -1;
          if (q >= 0) pair_of_index(q, K, &k, &l);
          std::printf("S %d %d %d %d %d %d %d %d %d\n", K, t, bi, bj, i, j, q, k, l);
        }
    }
  }
  const long long waves[] = {0, 1, 108, 132 * 8, 132 * 16};
  const long long chunks[] = {0, 1, 5, 100, 1055, 1056, 1057, 1220, 2000, 10000, 100000};
  for (long long wave : waves)
    for (long long c : chunks)
      std::printf("W %lld %lld %lld %d\n", c, wave, (long long)whole_wave_blocks(c, wave), chunk_slices(c, wave));
  const long long counts[] = {0, 1, 7, 8, 1023, 8192};
  for (long long count : counts)
    for (int slices = 1; slices <= kMaxChunkSlices; ++slices)
      for (int s = 0; s <= slices; ++s)
        std::printf("L %lld %d %d %lld\n", count, slices, s, (long long)slice_begin(count, s, slices));
  return 0;
}
"""


@pytest.fixture(scope="module")
def printed(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    tmp = tmp_path_factory.mktemp("launch")
    (tmp / "main.cpp").write_text(PROGRAM)
    exe = tmp / "main"
    built = subprocess.run([cxx, "-std=c++17", "-O1", f"-I{_extension.CSRC_DIR}", str(tmp / "main.cpp"), "-o",
                            str(exe)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    rows = [line.split() for line in subprocess.run([str(exe)], check=True, capture_output=True, text=True,
                                                    timeout=60).stdout.splitlines()]
    return {tag: [list(map(int, r[1:])) for r in rows if r[0] == tag] for tag in ("K", "S", "W", "L")}


def test_gram_tiles_sum_every_pair_exactly_once(printed):
    slots = {}
    for K, t, bi, bj, i, j, q, k, l in printed["S"]:
        assert bi <= bj
        if q >= 0:
            assert (k, l) == (8 * bi + i, 8 * bj + j) and k <= l < K, (K, t, bi, bj, i, j, q, k, l)
            slots.setdefault(K, []).append((k, l))
        else:  # a discarded slot: off the triangle or past K
            assert 8 * bi + i > 8 * bj + j or 8 * bj + j >= K, (K, t, i, j)
    for K, tiles, passes, npairs in printed["K"]:
        expected = sorted((k, l) for k in range(K) for l in range(k, K))
        assert sorted(slots[K]) == expected and npairs == len(expected), K
        blocks = -(-K // 8)
        assert tiles == blocks * (blocks + 1) // 2 and passes == -(-tiles // 8), K


def test_gram_reads_at_most_twice_the_minimal_bytes_up_to_40_objectives(printed):
    """Each pass reads the chunk's K rows once: passes * K elements per element position against K
    (the minimum) and K (K + 1) for one pass per pair (every pair reads two rows)."""
    read = {K: passes * K for K, _, passes, _ in printed["K"]}
    assert read[9] == 9 and read[16] == 16 and read[32] == 64  # the figures gram_tiles.cuh states
    assert all(read[K] <= 2 * K for K in range(9, 41)), {K: read[K] / K for K in range(9, 41)}
    assert all(read[K] < K * (K + 1) for K in range(9, 71))


def test_whole_wave_blocks_is_one_block_per_item_up_to_exactly_one_wave(printed):
    for chunks, wave, blocks, _ in printed["W"]:
        cap = max(wave, 1)
        assert blocks == (cap if chunks >= cap else max(chunks, 1)), (chunks, wave, blocks)
    # 40 M parameters: 1,220 chunks on 132 SMs x 8 resident blocks -> one wave of 1,056 blocks, not
    # 1,220 (1.16 waves)
    assert [b for c, w, b, _ in printed["W"] if (c, w) == (1220, 1056)] == [1056]


def busy(items, wave):
    """Share of the wave's block slots doing work until the last item ends (equal items)."""
    return items / (-(-items // wave) * wave)


def test_chunk_slices_keep_the_last_wave_nearly_full(printed):
    for chunks, wave, _, slices in printed["W"]:
        assert slices in (1, 2, 4, 8), (chunks, wave, slices)
        if chunks == 0 or wave == 0:
            continue
        fewer = [s for s in (1, 2, 4, 8) if s < slices]
        # the fewest slices that keep >= 90% of the slots busy; 8 when none does
        assert all(busy(chunks * s, wave) < 0.9 for s in fewer), (chunks, wave, slices)
        assert busy(chunks * slices, wave) >= 0.9 or slices == 8, (chunks, wave, slices)
    found = {(c, w): s for c, w, _, s in printed["W"]}
    # the 40 M parameter case: quarter chunks (58% -> 92% busy); many waves need no split
    assert found[(1220, 1056)] == 4 and busy(1220, 1056) < 0.6 and busy(4 * 1220, 1056) > 0.9
    assert found[(10000, 1056)] == 1 and found[(1056, 1056)] == 1


def test_slices_partition_a_range_into_near_equal_parts(printed):
    bounds = {}
    for count, slices, s, begin in printed["L"]:
        bounds.setdefault((count, slices), {})[s] = begin
    for (count, slices), b in bounds.items():
        sizes = [b[s + 1] - b[s] for s in range(slices)]
        assert b[0] == 0 and b[slices] == count and min(sizes) >= 0, (count, slices, b)
        assert max(sizes) - min(sizes) <= 1, (count, slices, sizes)
