// CPU label factorisers of mars.groups (docs/advantage.md, "Labels").
//
// mars::dense_labels: int labels -> dense group indices in ascending label order, as
// torch.unique(sorted=True, return_inverse=True) gives, in one pass when the labels' range
// is at most a few times their number (prompt indices), else by a sort. Anchors whose
// label is absent get -1; the caller names them in its error. factorize_int is the same
// factoriser for mars::advantage_int_labels (cpu/advantage.cpp).
//
// mars::string_labels: string labels, exactly. Each string is a span of code units: a
// row of a numpy fixed-width unicode array (uint32 code points, its trailing zeros the
// padding), or one of the NUL-separated UTF-8 strings of a buffer (Python's encoder with
// "surrogatepass": injective, and its byte order is the code points' order). Equal
// strings get one id by an open-addressing hash table whose every match is confirmed by
// comparing the spans themselves, so a hash collision costs time, never a wrong group.
// The ids are then ranked in sorted string order (code point by code point, a prefix
// first), numpy's order for unicode arrays.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

namespace mars {

// Declared in cpu/advantage.cpp. l [n], a [k] int64 labels -> index [n] (dense, ascending
// label order), aindex [k] (-1: absent); returns the distinct labels, ascending.
std::vector<int64_t> factorize_int(const int64_t* lp, int64_t n, const int64_t* ap, int64_t k,
                                   int64_t* ip, int64_t* aip);

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define MARS_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MARS_CLONES
#endif

namespace {

// Min and max of n >= 1 int64 values (a loop the compiler vectorises with AVX2).
MARS_CLONES void minmax_int64(const int64_t* p, int64_t n, int64_t* lo_out, int64_t* hi_out) {
  int64_t lo = p[0], hi = p[0];
  for (int64_t i = 0; i < n; ++i) {
    lo = p[i] < lo ? p[i] : lo;
    hi = p[i] > hi ? p[i] : hi;
  }
  *lo_out = lo;
  *hi_out = hi;
}

}  // namespace

std::vector<int64_t> factorize_int(const int64_t* lp, int64_t n, const int64_t* ap, int64_t k,
                                   int64_t* ip, int64_t* aip) {
  std::vector<int64_t> uniq;
  if (n == 0) {
    std::fill(aip, aip + k, -1);
    return uniq;
  }
  int64_t lo, hi;
  minmax_int64(lp, n, &lo, &hi);
  // hi - lo computed without overflow: compare in unsigned arithmetic.
  const uint64_t range = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo);
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
  return uniq;
}

namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor> dense_labels_cpu(const Tensor& labels,
                                                    const Tensor& anchor_labels) {
  TORCH_CHECK_VALUE(labels.dim() == 1 && anchor_labels.dim() == 1, "labels must be 1-D");
  const Tensor l = labels.to(at::kLong).contiguous(), a = anchor_labels.to(at::kLong).contiguous();
  const int64_t n = l.numel(), k = a.numel();
  auto opts = l.options();
  Tensor index = at::empty({n}, opts), aindex = at::empty({k}, opts);
  const std::vector<int64_t> uniq = factorize_int(l.data_ptr<int64_t>(), n, a.data_ptr<int64_t>(),
                                                  k, index.data_ptr<int64_t>(),
                                                  aindex.data_ptr<int64_t>());
  Tensor u = at::empty({static_cast<int64_t>(uniq.size())}, opts);
  std::copy(uniq.begin(), uniq.end(), u.data_ptr<int64_t>());
  return {index, aindex, u};
}

// ---- strings ----------------------------------------------------------------------------

// n spans of code units of type T: fixed-width rows (width > 0: row i is units
// [i * width, (i + 1) * width), trailing zeros dropped) or NUL-separated strings (width 0).
template <typename T>
struct Spans {
  std::vector<const T*> ptr;
  std::vector<int64_t> len;

  Spans(const T* data, int64_t size, int64_t width, int64_t n, const char* name) : ptr(n), len(n) {
    if (width > 0) {
      TORCH_CHECK_VALUE(size == n * width, name, ": ", size, " code units for ", n, " rows of ",
                        width);
      for (int64_t i = 0; i < n; ++i) {
        const T* p = data + i * width;
        int64_t m = width;
        while (m > 0 && p[m - 1] == 0) --m;
        ptr[i] = p;
        len[i] = m;
      }
      return;
    }
    if (n == 0) {
      TORCH_CHECK_VALUE(size == 0, name, ": ", size, " code units for no strings");
      return;
    }
    int64_t start = 0, i = 0;
    for (int64_t pos = 0; pos <= size; ++pos)
      if (pos == size || data[pos] == 0) {
        TORCH_CHECK_VALUE(i < n, name, ": more than ", n, " NUL-separated strings");
        ptr[i] = data + start;
        len[i] = pos - start;
        ++i;
        start = pos + 1;
      }
    TORCH_CHECK_VALUE(i == n, name, ": ", i,
                      " NUL-separated strings, expected ", n);
  }
};

template <typename T>
inline uint64_t span_hash(const T* p, int64_t m) {
  uint64_t h = 0x9e3779b97f4a7c15ull ^ static_cast<uint64_t>(m);
  const char* b = reinterpret_cast<const char*>(p);
  const int64_t bytes = m * static_cast<int64_t>(sizeof(T));
  int64_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    uint64_t w;
    std::memcpy(&w, b + i, 8);
    h = (h ^ w) * 0xff51afd7ed558ccdull;
    h ^= h >> 32;
  }
  if (i < bytes) {
    uint64_t w = 0;
    std::memcpy(&w, b + i, bytes - i);
    h = (h ^ w) * 0xc4ceb9fe1a85ec53ull;
  }
  h ^= h >> 29;
  return h * 0xbf58476d1ce4e5b9ull;
}

template <typename T>
inline bool span_equal(const T* a, int64_t na, const T* b, int64_t nb) {
  return na == nb && std::memcmp(a, b, na * sizeof(T)) == 0;
}

// Code point order, a prefix first (Python's str order and numpy's for unicode arrays).
template <typename T>
inline bool span_less(const T* a, int64_t na, const T* b, int64_t nb) {
  return std::lexicographical_compare(a, a + na, b, b + nb);
}

// (index [n] in sorted string order, anchor index [k] (-1: absent), first row [G] of
// each group, groups in sorted order). hash_mask narrows the hash (tests: 0 makes every
// string collide, and the groups must come out the same).
template <typename T>
std::tuple<Tensor, Tensor, Tensor> string_labels_impl(const Tensor& data, int64_t width,
                                                      const Tensor& adata, int64_t awidth,
                                                      int64_t n, int64_t k, int64_t hash_mask) {
  const Tensor d = data.contiguous(), ad = adata.contiguous();
  const Spans<T> rows(reinterpret_cast<const T*>(d.data_ptr()), d.numel(), width, n, "labels");
  const Spans<T> anchors(reinterpret_cast<const T*>(ad.data_ptr()), ad.numel(), awidth, k,
                         "anchor_labels");
  const uint64_t mask = static_cast<uint64_t>(hash_mask);
  int64_t cap = 16;
  while (cap < 2 * n) cap <<= 1;
  std::vector<int64_t> slot_id(cap, -1);   // group id (first-occurrence order) or -1
  std::vector<uint64_t> slot_hash(cap);
  std::vector<int64_t> first;              // first row of each id
  std::vector<int64_t> id(n);
  for (int64_t i = 0; i < n; ++i) {
    const T* p = rows.ptr[i];
    const int64_t m = rows.len[i];
    const uint64_t h = span_hash(p, m) & mask;
    int64_t s = static_cast<int64_t>(h & (cap - 1));
    while (true) {
      const int64_t g = slot_id[s];
      if (g < 0) {
        slot_id[s] = static_cast<int64_t>(first.size());
        slot_hash[s] = h;
        id[i] = slot_id[s];
        first.push_back(i);
        break;
      }
      if (slot_hash[s] == h && span_equal(p, m, rows.ptr[first[g]], rows.len[first[g]])) {
        id[i] = g;
        break;
      }
      s = (s + 1) & (cap - 1);
    }
  }
  const int64_t G = static_cast<int64_t>(first.size());
  std::vector<int64_t> order(G), rank(G);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    const int64_t ra = first[a], rb = first[b];
    return span_less(rows.ptr[ra], rows.len[ra], rows.ptr[rb], rows.len[rb]);
  });
  auto opts = at::TensorOptions().dtype(at::kLong);
  Tensor index = at::empty({n}, opts), aindex = at::empty({k}, opts), firsts = at::empty({G}, opts);
  int64_t* ip = index.data_ptr<int64_t>();
  int64_t* aip = aindex.data_ptr<int64_t>();
  int64_t* fp = firsts.data_ptr<int64_t>();
  for (int64_t r = 0; r < G; ++r) {
    rank[order[r]] = r;
    fp[r] = first[order[r]];
  }
  for (int64_t i = 0; i < n; ++i) ip[i] = rank[id[i]];
  for (int64_t j = 0; j < k; ++j) {
    const T* p = anchors.ptr[j];
    const int64_t m = anchors.len[j];
    const uint64_t h = span_hash(p, m) & mask;
    int64_t s = static_cast<int64_t>(h & (cap - 1));
    aip[j] = -1;
    for (int64_t g; (g = slot_id[s]) >= 0; s = (s + 1) & (cap - 1))
      if (slot_hash[s] == h && span_equal(p, m, rows.ptr[first[g]], rows.len[first[g]])) {
        aip[j] = rank[g];
        break;
      }
  }
  return {index, aindex, firsts};
}

std::tuple<Tensor, Tensor, Tensor> string_labels_cpu(const Tensor& data, int64_t width,
                                                     const Tensor& anchor_data,
                                                     int64_t anchor_width, int64_t n, int64_t k,
                                                     int64_t hash_mask) {
  TORCH_CHECK_VALUE(data.dim() == 1 && anchor_data.dim() == 1, "string data must be 1-D");
  TORCH_CHECK_VALUE(width >= 0 && anchor_width >= 0 && n >= 0 && k >= 0, "bad string layout");
  TORCH_CHECK_VALUE(data.scalar_type() == anchor_data.scalar_type(),
                    "labels and anchor_labels must be code units of one type");
  TORCH_CHECK_VALUE((width > 0) == (anchor_width > 0) || k == 0,
                    "labels and anchor_labels must both be fixed-width or both NUL-separated");
  if (data.scalar_type() == at::kInt) {  // numpy unicode: uint32 code points
    TORCH_CHECK_VALUE(width > 0, "int32 code units come in fixed-width rows");
    return string_labels_impl<uint32_t>(data, width, anchor_data, anchor_width, n, k, hash_mask);
  }
  TORCH_CHECK_VALUE(data.scalar_type() == at::kByte && width == 0,
                    "string data: int32 fixed-width rows or uint8 NUL-separated UTF-8");
  return string_labels_impl<uint8_t>(data, 0, anchor_data, anchor_width, n, k, hash_mask);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mars, m) {
  // String labels -> (index [n] in sorted label order, anchor_index [k] (-1: absent),
  // first [G]: the row where each group's label first occurs). data: int32 [n * width]
  // (numpy unicode rows, width > 0) or uint8 NUL-separated UTF-8 (width 0); anchor_data
  // alike. CPU only: the eager fast path of mars.groups for str labels.
  m.def("string_labels(Tensor data, int width, Tensor anchor_data, int anchor_width, int n, "
        "int k, int hash_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mars, CPU, m) {
  m.impl("dense_labels", &dense_labels_cpu);
  m.impl("string_labels", &string_labels_cpu);
}

}  // namespace mars
