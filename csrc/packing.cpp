#include "packing.h"

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <string>

namespace atesd {

PackResult first_fit_decreasing(const std::vector<int64_t>& lengths, int64_t budget) {
  if (budget <= 0) throw std::invalid_argument("budget must be > 0, got " + std::to_string(budget));
  const size_t n = lengths.size();
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  // stable_sort keeps input order among equal lengths, which the Python fallback mirrors.
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return lengths[a] > lengths[b]; });
  PackResult out;
  out.bin.assign(n, -1);
  out.offset.assign(n, 0);
  std::vector<int64_t> used;  // tokens used per bin
  for (size_t idx : order) {
    const int64_t len = lengths[idx];
    if (len < 0 || len > budget) {
      throw std::invalid_argument("sequence " + std::to_string(idx) + " has length " +
                                  std::to_string(len) + ", outside [0, budget=" +
                                  std::to_string(budget) + "]");
    }
    size_t b = 0;
    while (b < used.size() && used[b] + len > budget) ++b;
    if (b == used.size()) used.push_back(0);
    out.bin[idx] = static_cast<int64_t>(b);
    out.offset[idx] = used[b];
    used[b] += len;
  }
  out.num_bins = static_cast<int64_t>(used.size());
  return out;
}

}  // namespace atesd
