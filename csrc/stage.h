// Reading the inputs of the CPU kernel as the compute type, and writing its outputs.
//
// float32 and float64 inputs are read in place (Rows4). 16-bit inputs (bfloat16, float16) are computed in
// float32: each thread converts the rows its tasks read into a float buffer on first use (RowSource) and
// accumulates its gradient rows in float (RowSink), converting them once at the end. Nothing 16-bit is
// ever copied whole to float32; a thread's buffers hold at most 5 (forward) or 10 (backward) float
// [len, head_dim] matrices, of which only the rows it touches take memory.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <memory>

namespace prefix_attn {

// A [rows, head_dim] matrix inside a 4-d [B, H, T, D] (or 3-d [H, T, D]) tensor, rows unit-stride. Packed
// sequences are a [1, H, total, D] view with `start` (cu_seqlens, in rows): matrix (b, h) then begins at row
// start[b] of head h, so every sequence is a matrix of its own, indexed from row 0.
template <typename T>
struct Rows4 {
  const T* base;
  int64_t sb, sh, st;
  const int64_t* start;
  explicit Rows4(const at::Tensor& t, const int64_t* row_start = nullptr)
      : base(t.data_ptr<T>()),
        sb(t.dim() == 4 ? t.stride(0) : 0),
        sh(t.stride(t.dim() - 3)),
        st(t.size(-2) > 1 ? t.stride(-2) : t.size(-1)),
        start(row_start) {}
  const T* at(int64_t b, int64_t h, int64_t row) const {
    return base + (start ? start[b] * st : b * sb) + h * sh + row * st;
  }
  T* mut(int64_t b, int64_t h, int64_t row) const { return const_cast<T*>(at(b, h, row)); }  // outputs
};

// rows x dim values, rows strided by ld_src / ld_dst (multiversioned, defined in tile_ops.cpp)
void to_float(const c10::BFloat16* src, int64_t ld_src, int64_t rows, int64_t dim, float* dst, int64_t ld_dst);
void to_float(const c10::Half* src, int64_t ld_src, int64_t rows, int64_t dim, float* dst, int64_t ld_dst);
void from_float(const float* src, int64_t ld_src, int64_t rows, int64_t dim, c10::BFloat16* dst, int64_t ld_dst);
void from_float(const float* src, int64_t ld_src, int64_t rows, int64_t dim, c10::Half* dst, int64_t ld_dst);

// Rows of the [len, dim] matrices of one input, as T. TI == T: the input itself. Otherwise a per-thread float
// copy: the rows asked for are converted once and kept while the same matrix is asked for again (the tasks of a
// thread walk a head's rows in increasing order), so each row is converted about once per thread and head.
template <typename T, typename TI>
class RowSource {
 public:
  RowSource(const Rows4<TI>& rows, int64_t len, int64_t dim) : r_(rows), dim_(dim) {
    if constexpr (!std::is_same<T, TI>::value) {
      buf_.reset(new T[static_cast<size_t>(std::max<int64_t>(len * dim, 1))]);
    }
  }
  // rows [row0, row_end) of matrix (b, h); *ld = the row stride of what is returned
  const T* rows(int64_t b, int64_t h, int64_t row0, int64_t row_end, int64_t* ld) {
    if constexpr (std::is_same<T, TI>::value) {
      *ld = r_.st;
      return r_.at(b, h, row0);
    } else {
      *ld = dim_;
      const TI* key = r_.at(b, h, 0);
      if (key != key_ || row0 > hi_ || row_end < lo_) {  // another matrix, or a range not touching the kept one
        key_ = key;
        lo_ = hi_ = row0;
      }
      if (row0 < lo_) {
        to_float(r_.at(b, h, row0), r_.st, lo_ - row0, dim_, buf_.get() + row0 * dim_, dim_);
        lo_ = row0;
      }
      if (row_end > hi_) {
        to_float(r_.at(b, h, hi_), r_.st, row_end - hi_, dim_, buf_.get() + hi_ * dim_, dim_);
        hi_ = row_end;
      }
      return buf_.get() + row0 * dim_;
    }
  }

 private:
  Rows4<TI> r_;
  int64_t dim_;
  std::unique_ptr<T[]> buf_;  // uninitialised: pages are committed as rows are written
  const TI* key_ = nullptr;
  int64_t lo_ = 0, hi_ = 0;  // rows [lo_, hi_) of key_ are in buf_
};

// A [rows, dim] block of a gradient output (rows ld apart), accumulated in T. TI == T: in the output itself
// (which the caller zero-fills). Otherwise in a zeroed per-thread float buffer (rows dim apart), converted into
// the output by flush(). begin() returns where to accumulate and sets *ld_acc to its row stride.
template <typename T, typename TI>
class RowSink {
 public:
  RowSink(int64_t max_rows, int64_t dim) : dim_(dim) {
    if constexpr (!std::is_same<T, TI>::value) {
      buf_.reset(new T[static_cast<size_t>(std::max<int64_t>(max_rows * dim, 1))]);
    }
  }
  T* begin(TI* out, int64_t rows, int64_t ld, int64_t* ld_acc) {
    if constexpr (std::is_same<T, TI>::value) {
      *ld_acc = ld;
      return out;
    } else {
      out_ = out;
      rows_ = rows;
      ld_ = ld;
      *ld_acc = dim_;
      std::fill(buf_.get(), buf_.get() + rows * dim_, T(0));
      return buf_.get();
    }
  }
  void flush() {
    if constexpr (!std::is_same<T, TI>::value) {
      if (out_ != nullptr) from_float(buf_.get(), dim_, rows_, dim_, out_, ld_);
      out_ = nullptr;
    }
  }

 private:
  int64_t dim_;
  std::unique_ptr<T[]> buf_;  // uninitialised: pages are committed as rows are written
  TI* out_ = nullptr;
  int64_t rows_ = 0, ld_ = 0;
};

}  // namespace prefix_attn
