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
#include <limits>
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

// Calls f(i, ptr, len) for each of the n spans of code units of type T, in order:
// fixed-width rows (width > 0: row i is units [i * width, (i + 1) * width), its trailing
// zeros dropped) or NUL-separated strings (width 0; seps [n - 1]: the NULs' positions,
// ascending).
template <typename T, typename F>
void for_each_span(const T* data, int64_t size, int64_t width, const int64_t* seps,
                   int64_t nseps, int64_t n, const char* name, F f) {
  if (width > 0) {
    TORCH_CHECK_VALUE(size == n * width, name, ": ", size, " code units for ", n, " rows of ",
                      width);
    for (int64_t i = 0; i < n; ++i) {
      const T* p = data + i * width;
      int64_t m = width;
      while (m > 0 && p[m - 1] == 0) --m;
      f(i, p, m);
    }
    return;
  }
  TORCH_CHECK_VALUE(nseps == std::max<int64_t>(n - 1, 0) && (n > 0 || size == 0), name, ": ",
                    nseps, " separators for ", n, " strings");
  int64_t start = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t stop = i < n - 1 ? seps[i] : size;
    TORCH_CHECK_VALUE(start <= stop && stop <= size && (stop == size || data[stop] == 0), name,
                      ": separator ", i, " at ", stop, " is not a NUL in order");
    f(i, data + start, stop - start);
    start = stop + 1;
  }
}

inline uint64_t load_word(const unsigned char* b) {
  uint64_t w;
  std::memcpy(&w, b, 8);
  return w;
}

// Bytes [0, r) of b, r < 8, as the low bytes of a word; reads a whole word when the buffer
// (ending at end) holds one (no partial memcpy: its store would stall the load back).
inline uint64_t tail_word(const unsigned char* b, int64_t r, const unsigned char* end) {
  if (end - b >= 8) {
    uint64_t w;
    std::memcpy(&w, b, 8);
    return w & ((uint64_t{1} << (8 * r)) - 1);
  }
  uint64_t w = 0;
  for (int64_t j = 0; j < r; ++j) w |= static_cast<uint64_t>(b[j]) << (8 * j);
  return w;
}

// Spans of one buffer (ending at end) hashed and compared a word at a time.
struct Words {
  const unsigned char* end;

  uint64_t hash(const unsigned char* b, int64_t bytes) const {
    uint64_t h = 0x9e3779b97f4a7c15ull ^ static_cast<uint64_t>(bytes);
    int64_t i = 0;
    for (; i + 8 <= bytes; i += 8) {
      uint64_t w;
      std::memcpy(&w, b + i, 8);
      h = (h ^ w) * 0xff51afd7ed558ccdull;
      h ^= h >> 32;
    }
    if (i < bytes) h = (h ^ tail_word(b + i, bytes - i, end)) * 0xc4ceb9fe1a85ec53ull;
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ull;
    return h ^ (h >> 32);
  }
};

inline bool bytes_equal(const unsigned char* x, const unsigned char* y, int64_t bytes,
                        const unsigned char* xend, const unsigned char* yend) {
  int64_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    uint64_t u, v;
    std::memcpy(&u, x + i, 8);
    std::memcpy(&v, y + i, 8);
    if (u != v) return false;
  }
  return i == bytes || tail_word(x + i, bytes - i, xend) == tail_word(y + i, bytes - i, yend);
}

// 8 bytes of code units from p (units [0, r) of them, the rest zero; the buffer ends at
// end) as a word whose integer order is the units' lexicographic order.
template <typename T>
inline uint64_t order_word(const T* p, int64_t r, const unsigned char* end) {
  constexpr int64_t per = 8 / sizeof(T);
  const auto* b = reinterpret_cast<const unsigned char*>(p);
  const uint64_t w = r >= per ? load_word(b) : tail_word(b, r * sizeof(T), end);
  if constexpr (sizeof(T) == 1) return __builtin_bswap64(w);  // first byte most significant
  else return (w << 32) | (w >> 32);                          // first uint32 most significant
}

// Code point order, a prefix first (Python's str order and numpy's for unicode arrays),
// a word at a time: zero padding ties with NUL units, and then the shorter comes first.
template <typename T>
inline bool span_less(const T* a, int64_t na, const unsigned char* aend, const T* b, int64_t nb,
                      const unsigned char* bend) {
  constexpr int64_t per = 8 / sizeof(T);
  const int64_t m = std::min(na, nb);
  for (int64_t i = 0; i < m; i += per) {
    const uint64_t x = order_word(a + i, na - i, aend), y = order_word(b + i, nb - i, bend);
    if (x != y) return x < y;
  }
  return na < nb;
}

// The first 16 bytes of a span of `bytes` bytes (zero beyond it) as two words: for spans
// of at most 16 bytes the whole string, compared without reading it again.
struct Head {
  uint64_t w0, w1;
};

inline Head head(const unsigned char* b, int64_t bytes, const unsigned char* end) {
  if (bytes >= 16) return {load_word(b), load_word(b + 8)};
  if (bytes >= 8) return {load_word(b), tail_word(b + 8, bytes - 8, end)};
  return {tail_word(b, bytes, end), 0};
}

// The distinct strings, in first-occurrence order, by open addressing (linear probing, at
// most half full, grown by rehashing the kept hashes). Every hit is confirmed on the
// strings (their heads, then any bytes beyond): equal hashes of different strings only
// cost probes.
template <typename T>
struct StringTable {
  const unsigned char* end;  // of the rows' buffer, where every kept string lies
  std::vector<int32_t> slot{std::vector<int32_t>(64, -1)};  // id, -1 empty
  std::vector<uint64_t> hash;
  std::vector<Head> heads;
  std::vector<const T*> ptr;
  std::vector<int64_t> len, first;

  // The id of span (p, m) (head hd) of a buffer ending at pend, hashed h; else -1 - a
  // free slot.
  int64_t find(const T* p, int64_t m, const Head& hd, uint64_t h, const unsigned char* pend) const {
    const uint64_t mask = slot.size() - 1;
    const int64_t bytes = m * static_cast<int64_t>(sizeof(T));
    for (uint64_t s = h & mask;; s = (s + 1) & mask) {
      const int32_t g = slot[s];
      if (g < 0) return -1 - static_cast<int64_t>(s);
      if (hash[g] == h && len[g] == m && heads[g].w0 == hd.w0 && heads[g].w1 == hd.w1 &&
          (bytes <= 16 ||
           bytes_equal(reinterpret_cast<const unsigned char*>(p) + 16,
                       reinterpret_cast<const unsigned char*>(ptr[g]) + 16, bytes - 16, pend, end)))
        return g;
    }
  }

  int64_t insert(const T* p, int64_t m, const Head& hd, uint64_t h, int64_t row) {
    const int64_t found = find(p, m, hd, h, end);
    if (found >= 0) return found;
    const int64_t g = static_cast<int64_t>(hash.size());
    TORCH_CHECK_VALUE(g < std::numeric_limits<int32_t>::max(), "too many distinct labels");
    hash.push_back(h);
    heads.push_back(hd);
    ptr.push_back(p);
    len.push_back(m);
    first.push_back(row);
    slot[-1 - found] = static_cast<int32_t>(g);
    if (2 * static_cast<uint64_t>(g + 1) > slot.size()) {
      slot.assign(2 * slot.size(), -1);
      const uint64_t mask = slot.size() - 1;
      for (int64_t k = 0; k <= g; ++k) {
        uint64_t s = hash[k] & mask;
        while (slot[s] >= 0) s = (s + 1) & mask;
        slot[s] = static_cast<int32_t>(k);
      }
    }
    return g;
  }
};

// (index [n] in sorted string order, anchor index [k] (-1: absent), first row [G] of
// each group, groups in sorted order). hash_mask narrows the hash (tests: 0 makes every
// string collide, and the groups must come out the same).
template <typename T>
std::tuple<Tensor, Tensor, Tensor> string_labels_impl(const Tensor& data, const Tensor& seps,
                                                      int64_t width, const Tensor& adata,
                                                      const Tensor& aseps, int64_t awidth,
                                                      int64_t n, int64_t k, int64_t hash_mask) {
  const Tensor d = data.contiguous(), ad = adata.contiguous();
  const Tensor sp = seps.to(at::kLong).contiguous(), asp = aseps.to(at::kLong).contiguous();
  const uint64_t mask = static_cast<uint64_t>(hash_mask);
  const T* dp = reinterpret_cast<const T*>(d.data_ptr());
  const T* adp = reinterpret_cast<const T*>(ad.data_ptr());
  const Words words{reinterpret_cast<const unsigned char*>(dp + d.numel())};
  const Words awords{reinterpret_cast<const unsigned char*>(adp + ad.numel())};
  StringTable<T> table{words.end};
  std::vector<int32_t> id(n);
  for_each_span(dp, d.numel(), width, sp.data_ptr<int64_t>(), sp.numel(), n, "labels",
                [&](int64_t i, const T* p, int64_t m) {
                  const auto* b = reinterpret_cast<const unsigned char*>(p);
                  const uint64_t h = words.hash(b, m * sizeof(T)) & mask;
                  id[i] = static_cast<int32_t>(
                      table.insert(p, m, head(b, m * sizeof(T), words.end), h, i));
                });
  const int64_t G = static_cast<int64_t>(table.first.size());
  std::vector<int64_t> order(G), rank(G);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return span_less(table.ptr[a], table.len[a], words.end, table.ptr[b], table.len[b], words.end);
  });
  auto opts = at::TensorOptions().dtype(at::kLong);
  Tensor index = at::empty({n}, opts), aindex = at::empty({k}, opts), firsts = at::empty({G}, opts);
  int64_t* ip = index.data_ptr<int64_t>();
  int64_t* aip = aindex.data_ptr<int64_t>();
  int64_t* fp = firsts.data_ptr<int64_t>();
  for (int64_t r = 0; r < G; ++r) {
    rank[order[r]] = r;
    fp[r] = table.first[order[r]];
  }
  for (int64_t i = 0; i < n; ++i) ip[i] = rank[id[i]];
  for_each_span(adp, ad.numel(), awidth, asp.data_ptr<int64_t>(), asp.numel(), k, "anchor_labels",
                [&](int64_t j, const T* p, int64_t m) {
                  const auto* b = reinterpret_cast<const unsigned char*>(p);
                  const uint64_t h = awords.hash(b, m * sizeof(T)) & mask;
                  const int64_t g = table.find(p, m, head(b, m * sizeof(T), awords.end), h,
                                               awords.end);
                  aip[j] = g >= 0 ? rank[g] : -1;
                });
  return {index, aindex, firsts};
}

std::tuple<Tensor, Tensor, Tensor> string_labels_cpu(const Tensor& data, const Tensor& seps,
                                                     int64_t width, const Tensor& anchor_data,
                                                     const Tensor& anchor_seps,
                                                     int64_t anchor_width, int64_t n, int64_t k,
                                                     int64_t hash_mask) {
  TORCH_CHECK_VALUE(data.dim() == 1 && anchor_data.dim() == 1 && seps.dim() == 1 &&
                        anchor_seps.dim() == 1, "string data must be 1-D");
  TORCH_CHECK_VALUE(width >= 0 && anchor_width >= 0 && n >= 0 && k >= 0, "bad string layout");
  TORCH_CHECK_VALUE(data.scalar_type() == anchor_data.scalar_type(),
                    "labels and anchor_labels must be code units of one type");
  if (data.scalar_type() == at::kInt) {  // numpy unicode: uint32 code points
    TORCH_CHECK_VALUE(width > 0 && anchor_width > 0, "int32 code units come in fixed-width rows");
    return string_labels_impl<uint32_t>(data, seps, width, anchor_data, anchor_seps,
                                        anchor_width, n, k, hash_mask);
  }
  TORCH_CHECK_VALUE(data.scalar_type() == at::kByte && width == 0 && anchor_width == 0,
                    "string data: int32 fixed-width rows or uint8 NUL-separated UTF-8");
  return string_labels_impl<uint8_t>(data, seps, 0, anchor_data, anchor_seps, 0, n, k,
                                     hash_mask);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mars, m) {
  // String labels -> (index [n] in sorted label order, anchor_index [k] (-1: absent),
  // first [G]: the row where each group's label first occurs). data: int32 [n * width]
  // (numpy unicode rows, width > 0; seps empty) or uint8 UTF-8 strings separated by NULs
  // at positions seps [n - 1] (width 0); anchor_data alike. CPU only: the eager fast path
  // of mars.groups for str labels.
  m.def("string_labels(Tensor data, Tensor seps, int width, Tensor anchor_data, "
        "Tensor anchor_seps, int anchor_width, int n, int k, int hash_mask) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mars, CPU, m) {
  m.impl("dense_labels", &dense_labels_cpu);
  m.impl("string_labels", &string_labels_cpu);
}

}  // namespace mars
