// Python bindings of the native helpers (module atesd_mc._native).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "packing.h"

namespace py = pybind11;

PYBIND11_MODULE(_native, m) {
  m.doc() = "atesd-mc native helpers";
  m.def(
      "first_fit_decreasing",
      [](const std::vector<int64_t>& lengths, int64_t budget) {
        auto r = atesd::first_fit_decreasing(lengths, budget);
        return py::make_tuple(r.bin, r.offset, r.num_bins);
      },
      py::arg("lengths"), py::arg("budget"),
      "First-fit-decreasing bin packing: returns (bin per sequence, offset per sequence, bins).");
}
