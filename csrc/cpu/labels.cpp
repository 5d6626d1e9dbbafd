// CPU body of mars::dense_labels: int labels -> dense group indices in ascending label
// order, as torch.unique(sorted=True, return_inverse=True) gives, in one pass when the
// labels' range is at most a few times their number (prompt indices), else by a sort.
// Anchors whose label is absent get -1; the caller names them in its error.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace mars {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor> dense_labels_cpu(const Tensor& labels,
                                                    const Tensor& anchor_labels) {
  TORCH_CHECK_VALUE(labels.dim() == 1 && anchor_labels.dim() == 1, "labels must be 1-D");
  const Tensor l = labels.to(at::kLong).contiguous(), a = anchor_labels.to(at::kLong).contiguous();
  const int64_t n = l.numel(), k = a.numel();
  const int64_t* lp = l.data_ptr<int64_t>();
  const int64_t* ap = a.data_ptr<int64_t>();
  auto opts = l.options();
  Tensor index = at::empty({n}, opts), aindex = at::empty({k}, opts);
  int64_t* ip = index.data_ptr<int64_t>();
  int64_t* aip = aindex.data_ptr<int64_t>();
  if (n == 0) {
    aindex.fill_(-1);
    return {index, aindex, at::empty({0}, opts)};
  }
  const auto [lo_it, hi_it] = std::minmax_element(lp, lp + n);
  const int64_t lo = *lo_it, hi = *hi_it;
  // hi - lo computed without overflow: compare in unsigned arithmetic.
  const uint64_t range = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo);
  std::vector<int64_t> uniq;
  if (range <= static_cast<uint64_t>(4 * n + 1024)) {
    std::vector<int64_t> rank(range + 1, -1);
    for (int64_t i = 0; i < n; ++i) rank[lp[i] - lo] = 0;
    for (uint64_t v = 0; v <= range; ++v)
      if (rank[v] == 0) {
        rank[v] = static_cast<int64_t>(uniq.size());
        uniq.push_back(lo + static_cast<int64_t>(v));
      }
    for (int64_t i = 0; i < n; ++i) ip[i] = rank[lp[i] - lo];
    for (int64_t j = 0; j < k; ++j) {
      const int64_t x = ap[j];
      aip[j] = (x < lo || x > hi) ? -1 : rank[static_cast<uint64_t>(x) - static_cast<uint64_t>(lo)];
    }
  } else {
    uniq.assign(lp, lp + n);
    std::sort(uniq.begin(), uniq.end());
    uniq.erase(std::unique(uniq.begin(), uniq.end()), uniq.end());
    for (int64_t i = 0; i < n; ++i)
      ip[i] = std::lower_bound(uniq.begin(), uniq.end(), lp[i]) - uniq.begin();
    for (int64_t j = 0; j < k; ++j) {
      auto it = std::lower_bound(uniq.begin(), uniq.end(), ap[j]);
      aip[j] = (it != uniq.end() && *it == ap[j]) ? it - uniq.begin() : -1;
    }
  }
  Tensor u = at::empty({static_cast<int64_t>(uniq.size())}, opts);
  std::copy(uniq.begin(), uniq.end(), u.data_ptr<int64_t>());
  return {index, aindex, u};
}

}  // namespace

TORCH_LIBRARY_IMPL(mars, CPU, m) { m.impl("dense_labels", &dense_labels_cpu); }

}  // namespace mars
