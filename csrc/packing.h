// Sequence packing: first-fit-decreasing of variable-length sequences into token-budget bins.
#pragma once
#include <cstdint>
#include <vector>

namespace atesd {

struct PackResult {
  std::vector<int64_t> bin;     // bin index per input sequence
  std::vector<int64_t> offset;  // token offset of the sequence inside its bin
  int64_t num_bins = 0;
};

// Sequences are taken longest first (ties: lower input index first) and put into the first open
// bin with room; a new bin opens when none has room. Lengths above `budget` are an error.
PackResult first_fit_decreasing(const std::vector<int64_t>& lengths, int64_t budget);

}  // namespace atesd
