// Python bindings of cupid_engine._C: only m.def lines live here.
//
// Kernels take raw data pointers (as integers) plus shapes: the Python wrappers in
// cupid_engine/ops check device, dtype, contiguity and shape, so this module links
// neither libtorch nor a CUDA-enabled torch and builds in seconds.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cupid/hash.h"
#include "cupid/kernels.h"
#include "cupid/parallel.h"
#include "cupid/quality.h"
#include "cupid/scan.h"
#include "cupid/spectral.h"
#include "cupid/tensorsketch.h"
#ifdef CUPID_WITH_CUDA
#include "cupid/cuda_kernels.h"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "cupid_engine native kernels (C++ CPU, optional CUDA)";
  m.def("has_cuda", &cupid::has_cuda, "Whether CUDA kernels were compiled into this build.");
  m.def(
      "hash_streams",
      [] {
        py::dict d;
        d["STREAM_DENSE"] = cupid::kStreamDense;
        d["STREAM_SPARSE"] = cupid::kStreamSparse;
        d["STREAM_SIGNSHIFT_SIGN"] = cupid::kStreamSignShiftSign;
        d["STREAM_SIGNSHIFT_SHIFT"] = cupid::kStreamSignShiftShift;
        d["STREAM_TS_OUT"] = cupid::kStreamTsOut;
        d["STREAM_TS_IN"] = cupid::kStreamTsIn;
        d["STREAM_TS_SIGN_OFFSET"] = cupid::kStreamTsSignOffset;
        d["MAX_SPARSE_S"] = cupid::kMaxSparseS;
        return d;
      },
      "The hash-stream ids of cupid/hash.h (C++ and CUDA), by their cupid_engine.constants names.");
  m.def("num_threads", &cupid::num_threads, "OpenMP threads the CPU kernels use.");
  m.def("set_num_threads", &cupid::set_num_threads, py::arg("n"), "Set the OpenMP threads of the CPU kernels.");
  m.def("in_forked_child", &cupid::in_forked_child,
        "Whether this process was forked after the module loaded: its OpenMP kernels then run on one thread\n"
        "(GNU libgomp's thread pool does not survive fork; see csrc/include/cupid/parallel.h).");
  m.def("omp_threads", &cupid::omp_threads, py::arg("work"), py::arg("serial_below"),
        "Threads an OpenMP region of `work` gets: 1 below `serial_below` or in a forked child, else num_threads().");
  m.def(
      "serial_thresholds",
      [] {
        py::dict d;
        d["scan_bytes"] = cupid::kSerialScanBytes;
        d["project_bytes"] = cupid::kSerialProjectBytes;
        d["quality_flops"] = cupid::kSerialQualityFlops;
        return d;
      },
      "Work below which each OpenMP kernel runs on one thread (scan: codes bytes n*k; projection: input bytes\n"
      "rows*P*itemsize per row group of 32, count sketch rows*(O+I+2k)*itemsize; quality: 2*rows_r*rows_d*k).");

  // --- projection (csrc/cpu/projection.cpp) ---
  m.def("project_cpu", &cupid::project_cpu, py::call_guard<py::gil_scoped_release>(),
        py::arg("x_ptr"), py::arg("out_ptr"), py::arg("batch"), py::arg("dim"), py::arg("x_stride"),
        py::arg("k"), py::arg("method"), py::arg("dtype"), py::arg("seed"), py::arg("s"),
        "out[B, k] (fp32, zero-filled by the caller) += P x for x[B, dim] (row stride x_stride).");
  m.def("countsketch_pair_cpu", &cupid::countsketch_pair_cpu, py::call_guard<py::gil_scoped_release>(),
        py::arg("delta_ptr"), py::arg("x_ptr"), py::arg("b1_ptr"), py::arg("s1_ptr"), py::arg("b2_ptr"),
        py::arg("s2_ptr"), py::arg("cs_delta_ptr"), py::arg("cs_x_ptr"), py::arg("rows"), py::arg("out_dim"),
        py::arg("in_dim"), py::arg("k"), py::arg("dtype"),
        "Tensorsketch stage 1: CountSketch of delta[rows, O] and x[rows, I] into [rows, k] each.");

  // --- tensorsketch spectral stage (csrc/cpu/spectral.cpp) ---
  m.def("spectral_mac_cpu", &cupid::spectral_mac_cpu, py::call_guard<py::gil_scoped_release>(),
        py::arg("a_ptr"), py::arg("b_ptr"), py::arg("acc_ptr"), py::arg("rows"), py::arg("steps"), py::arg("freqs"),
        py::arg("dtype"), py::arg("accumulate"),
        "acc[rows, freqs] (= or +=) sum_t a[rows, steps, freqs] * b[...] (complex, t ascending, no FMA).");
  m.def("dft_spectrum_cpu", &cupid::dft_spectrum_cpu, py::call_guard<py::gil_scoped_release>(),
        py::arg("v_ptr"), py::arg("table_ptr"), py::arg("out_ptr"), py::arg("rows"), py::arg("n"), py::arg("freqs"),
        py::arg("dtype"), "out[rows, freqs] = sum_j v[rows, n] * table[n, freqs] (complex, j ascending, no FMA).");

  // --- tensorsketch with its own lane-parallel FFT (csrc/cpu/tensorsketch.cpp) ---
  m.def("tensorsketch_fft_cpu", &cupid::tensorsketch_fft_cpu, py::call_guard<py::gil_scoped_release>(),
        py::arg("delta_ptrs"), py::arg("x_ptrs"), py::arg("steps"), py::arg("out_dims"), py::arg("in_dims"),
        py::arg("d_sb"), py::arg("d_st"), py::arg("x_sb"), py::arg("x_st"), py::arg("b1_ptrs"), py::arg("s1_ptrs"),
        py::arg("b2_ptrs"), py::arg("s2_ptrs"), py::arg("out_ptr"), py::arg("batch"), py::arg("k"), py::arg("dtype"),
        py::arg("direct") = std::vector<int64_t>{}, py::arg("x_ones") = std::vector<int64_t>{},
        py::arg("sums_ptr") = 0,
        "out[B, k] = sum over layers and steps of the tensorsketch of delta_t x_t^T (FFT route, W samples per SIMD\n"
        "lane group, k a power of two >= 8; layers flagged in direct: hashed products in the time domain; in x_ones:\n"
        "x's last coordinate is an implicit 1; sums_ptr: row sums of out).");
  m.def("hash_gradient_cpu", &cupid::hash_gradient_cpu, py::call_guard<py::gil_scoped_release>(), py::arg("g_ptr"),
        py::arg("b1_ptr"), py::arg("s1_ptr"), py::arg("b2_ptr"), py::arg("s2_ptr"), py::arg("out_ptr"),
        py::arg("batch"), py::arg("out_dim"), py::arg("in_dim"), py::arg("k"), py::arg("dtype"),
        py::arg("accumulate"),
        "out[B, k] (+)= CountSketch of a materialised gradient g[B, O, I] with bucket (b1[o] + b2[i]) mod k and\n"
        "sign s1[o] s2[i] (the tensorsketch's 'dense' route).");
  m.def("im2col_cpu", &cupid::im2col_cpu, py::call_guard<py::gil_scoped_release>(), py::arg("x_ptr"),
        py::arg("out_ptr"), py::arg("rows"), py::arg("channels"), py::arg("height"), py::arg("width"), py::arg("kh"),
        py::arg("kw"), py::arg("sh"), py::arg("sw"), py::arg("dh"), py::arg("dw"), py::arg("ph"), py::arg("pw"),
        py::arg("out_h"), py::arg("out_w"), py::arg("append_one"), py::arg("dtype"),
        "im2col of a zero-padded conv input x[R, C, H, W] into out[R, Ho*Wo, C*kh*kw (+1 ones column)].");
  m.def("tensorsketch_lanes", &cupid::tensorsketch_lanes, py::arg("dtype"),
        "Samples per SIMD lane group of tensorsketch_fft_cpu for a dtype (0 float32, 3 float64).");

  // --- scorers (csrc/cpu/quality.cpp) ---
  m.def("scan_int8_cpu", &cupid::scan_int8_cpu, py::call_guard<py::gil_scoped_release>(), py::arg("codes"),
        py::arg("scales"), py::arg("n"), py::arg("k"), py::arg("q"), py::arg("q_scale"), py::arg("scores"),
        "scores[i] = scales[i] * q_scale * <codes[i], q> (int8 x int8, exact int32 sums): the quantised index scan.");
  m.def("quality_minmax_cpu", &cupid::quality_minmax_cpu, py::call_guard<py::gil_scoped_release>(),
        py::arg("r_ptr"), py::arg("r_off_ptr"), py::arg("m"), py::arg("d_ptr"), py::arg("d_off_ptr"), py::arg("n"),
        py::arg("k"), py::arg("maxmin_ptr"), py::arg("minmax_ptr"), py::arg("dtype"),
        "CUPID-Quality: maxmin/minmax[m, n] over (rollout, demo) segment pairs, never storing A.");

  // --- cuda (csrc/cuda/*.cu) ---
#ifdef CUPID_WITH_CUDA
  m.def("project_cuda", &cupid::project_cuda, py::call_guard<py::gil_scoped_release>(),
        py::arg("x_ptr"), py::arg("out_ptr"), py::arg("batch"), py::arg("dim"), py::arg("x_stride"),
        py::arg("k"), py::arg("method"), py::arg("dtype"), py::arg("seed"), py::arg("s"), py::arg("device"),
        py::arg("stream"),
        "GPU: out[B, k] (zero-filled by the caller) = P x for x[B, dim], launched on `stream` of `device`.");
  m.def("countsketch_pair_cuda", &cupid::countsketch_pair_cuda, py::call_guard<py::gil_scoped_release>(),
        py::arg("delta_ptr"), py::arg("x_ptr"), py::arg("order1_ptr"), py::arg("sign1_ptr"), py::arg("offsets1_ptr"),
        py::arg("order2_ptr"), py::arg("sign2_ptr"), py::arg("offsets2_ptr"), py::arg("cs_delta_ptr"),
        py::arg("cs_x_ptr"), py::arg("rows"), py::arg("out_dim"), py::arg("in_dim"), py::arg("k"), py::arg("dtype"),
        py::arg("device"), py::arg("stream"),
        "GPU tensorsketch stage 1: CountSketch of delta[rows, O] and x[rows, I] into [rows, k] each, from\n"
        "bucket-grouped (CSR) int32 tables of reference.countsketch_buckets.");
#endif
}
