// The eager fast path of the PyTorch face: one C++ call per selection_attention_cuda call.
//
// The Python path (nsa/kernels/cuda_sel_kernel.py) validates in Python, allocates the output
// with torch.empty, packs NsaSelParams with struct and launches through ctypes: 18-25 us of host
// time per call on the H200's host, against ~5 us of GPU time at B = 1. This module does the same
// work for the calls the kernel takes as they are, in C++: it checks the arguments, allocates the
// output, fills NsaSelParams and calls nsa_sel_decode_cuda of the library the Python loader chose
// (dlopen of the same file: the same handle as ctypes'). It never raises for a bad argument and
// never decides a fallback: any call it does not take as it is (a caller bug, a configuration for
// the reference, a copy needed, a non-OK launch status) returns None, and the caller runs the
// Python path, which owns every error message and fallback rule (SPEC.md, Errors).
//
// Built by torch.utils.cpp_extension (nsa/kernels/_fast.py) against the installed torch; it
// includes no CUDA header (the caller passes the current stream's handle) and links nothing of
// libnsa_sel.so.
#include <dlfcn.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "nsa_sel/sel_attention.h"

namespace {

using DecodeFn = NsaSelStatus (*)(const NsaSelParams*, int32_t, void*);

bool is_float_kernel(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }
bool is_index(at::ScalarType t) { return t == at::kInt || t == at::kLong; }
int32_t index_code(at::ScalarType t) { return t == at::kInt ? NSA_SEL_I32 : NSA_SEL_I64; }

// The tensor behind a Python object, or nullptr when it is not a tensor.
const at::Tensor* as_tensor(py::handle h) {
  return THPVariable_Check(h.ptr()) ? &THPVariable_Unpack(h.ptr()) : nullptr;
}

// Python's resolve_scale: None -> 1 / Dk ** 0.5 (pow, as CPython computes it), an int or a float
// (not a bool) -> its value; anything else -> false (the Python path raises the TypeError).
bool resolve_scale(py::handle scale, int64_t d_k, double* out) {
  if (scale.is_none()) {
    *out = d_k > 0 ? 1.0 / std::pow(static_cast<double>(d_k), 0.5) : 1.0;
    return true;
  }
  PyObject* o = scale.ptr();
  if (PyBool_Check(o) || !(PyFloat_Check(o) || PyLong_Check(o))) return false;
  const double v = PyFloat_Check(o) ? PyFloat_AS_DOUBLE(o) : PyLong_AsDouble(o);
  if (v == -1.0 && PyErr_Occurred()) {  // an int too large for a double
    PyErr_Clear();
    return false;
  }
  *out = v;
  return true;
}

// Fills everything of *p but the output (pointer and strides) when the kernel takes these
// arguments as they are: the checks of nsa/_validate.py, plus what _route and _run_kernel send to
// the reference or copy (fp32, S != 1, a zero-sized dim, a non-unit last stride). `need_cuda`:
// every tensor on one CUDA device (false only for the CPU tests of the packing).
bool pack_inputs(py::handle q_h, py::handle k_h, py::handle v_h, py::handle r_h, py::handle kv_h,
                 py::handle scale_h, bool need_cuda, NsaSelParams* p) {
  const at::Tensor* q = as_tensor(q_h);
  const at::Tensor* k = as_tensor(k_h);
  const at::Tensor* v = as_tensor(v_h);
  const at::Tensor* r = as_tensor(r_h);
  if (!q || !k || !v || !r) return false;
  if (q->dim() != 5 || k->dim() != 4 || v->dim() != 4 || r->dim() != 5) return false;
  const auto qs = q->sizes(), ks = k->sizes(), vs = v->sizes(), rs = r->sizes();
  const int64_t B = qs[0], S = qs[1], G = qs[2], H = qs[3], Dk = qs[4];
  const int64_t S_kv = ks[2], Dv = vs[3], N = rs[3];
  if (ks[0] != B || ks[1] != G || ks[3] != Dk) return false;
  if (vs[0] != B || vs[1] != G || vs[2] != S_kv) return false;
  if (rs[4] != 2 || rs[0] != B || rs[1] != S || rs[2] != G) return false;
  const at::ScalarType dt = q->scalar_type();
  if (!is_float_kernel(dt) || k->scalar_type() != dt || v->scalar_type() != dt) return false;
  if (!is_index(r->scalar_type())) return false;
  const at::Device dev = q->device();
  if (need_cuda && !dev.is_cuda()) return false;
  if (k->device() != dev || v->device() != dev || r->device() != dev) return false;
  const at::Tensor* kv = nullptr;
  if (!kv_h.is_none()) {
    kv = as_tensor(kv_h);
    if (!kv || kv->dim() != 1 || kv->size(0) != B || !is_index(kv->scalar_type())) return false;
    if (kv->device() != dev) return false;
  }
  if (S != 1 || B == 0 || G == 0 || H == 0 || Dk == 0 || Dv == 0 || S_kv == 0 || N == 0) {
    return false;
  }
  const auto qt = q->strides(), kt = k->strides(), vt = v->strides(), rt = r->strides();
  if (qt[4] != 1 || kt[3] != 1 || vt[3] != 1) return false;
  double scale = 0.0;
  if (!resolve_scale(scale_h, Dk, &scale)) return false;

  *p = NsaSelParams{};
  p->q = q->data_ptr();
  p->k = k->data_ptr();
  p->v = v->data_ptr();
  p->ranges = r->data_ptr();
  p->kv_lens = kv ? kv->data_ptr() : nullptr;
  p->b = B, p->s = S, p->g = G, p->h = H, p->d_k = Dk, p->d_v = Dv, p->s_kv = S_kv, p->n = N;
  p->q_stride_b = qt[0], p->q_stride_s = qt[1], p->q_stride_g = qt[2], p->q_stride_h = qt[3];
  p->q_stride_d = qt[4];
  p->k_stride_b = kt[0], p->k_stride_g = kt[1], p->k_stride_t = kt[2], p->k_stride_d = kt[3];
  p->v_stride_b = vt[0], p->v_stride_g = vt[1], p->v_stride_t = vt[2], p->v_stride_d = vt[3];
  p->r_stride_b = rt[0], p->r_stride_s = rt[1], p->r_stride_g = rt[2], p->r_stride_n = rt[3];
  p->r_stride_e = rt[4];
  p->kv_lens_stride_b = kv ? kv->stride(0) : 0;
  p->scale = static_cast<float>(scale);
  p->dtype = dt == at::kHalf ? NSA_SEL_F16 : NSA_SEL_BF16;
  p->index_type = index_code(r->scalar_type());
  p->kv_lens_type = kv ? index_code(kv->scalar_type()) : 0;
  return true;
}

void set_output(const at::Tensor& out, NsaSelParams* p) {
  const auto ot = out.strides();
  p->out = out.data_ptr();
  p->o_stride_b = ot[0], p->o_stride_s = ot[1], p->o_stride_g = ot[2], p->o_stride_h = ot[3];
  p->o_stride_d = ot[4];
}

// 0 <= kv_lens[b] <= S_kv, read back in one synchronisation (as nsa/_validate.py does).
bool kv_lens_in_range(const at::Tensor& kv_lens, int64_t s_kv) {
  const auto mm = at::aminmax(kv_lens);
  const at::Tensor both = at::stack({std::get<0>(mm), std::get<1>(mm)}).to(at::kLong).cpu();
  const int64_t* v = both.data_ptr<int64_t>();
  return v[0] >= 0 && v[1] <= s_kv;
}

// The library's nsa_sel_decode_cuda, bound by path.
class Launcher {
 public:
  explicit Launcher(const std::string& path) : path_(path) {
    handle_ = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle_ == nullptr) throw std::runtime_error("cannot load " + path + ": " + dlerror());
    using AbiFn = int32_t (*)();
    using SizeFn = int64_t (*)();
    auto abi = reinterpret_cast<AbiFn>(dlsym(handle_, "nsa_sel_abi_version"));
    auto size = reinterpret_cast<SizeFn>(dlsym(handle_, "nsa_sel_params_size"));
    decode_ = reinterpret_cast<DecodeFn>(dlsym(handle_, "nsa_sel_decode_cuda"));
    if (!abi || !size || !decode_) {
      dlclose(handle_);
      throw std::runtime_error(path + ": missing nsa_sel symbols");
    }
    if (abi() != NSA_SEL_ABI_VERSION || size() != static_cast<int64_t>(sizeof(NsaSelParams))) {
      dlclose(handle_);
      throw std::runtime_error(path + ": ABI mismatch with the fast path's header");
    }
  }
  ~Launcher() { dlclose(handle_); }
  Launcher(const Launcher&) = delete;
  Launcher& operator=(const Launcher&) = delete;

  // The output tensor, or None: the caller then takes the Python path.
  py::object call(py::handle q, py::handle k, py::handle v, py::handle ranges, py::handle kv_lens,
                  py::handle scale, uintptr_t stream, bool check_kv_lens) const {
    NsaSelParams p;
    if (!pack_inputs(q, k, v, ranges, kv_lens, scale, /*need_cuda=*/true, &p)) return py::none();
    if (check_kv_lens && !kv_lens_in_range(THPVariable_Unpack(kv_lens.ptr()), p.s_kv)) {
      return py::none();
    }
    const at::Tensor& vt = THPVariable_Unpack(v.ptr());
    at::Tensor out = at::empty({p.b, p.s, p.g, p.h, p.d_v}, vt.options());
    set_output(out, &p);
    const int32_t device = static_cast<int32_t>(vt.get_device());
    if (decode_(&p, device, reinterpret_cast<void*>(stream)) != NSA_SEL_OK) return py::none();
    return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(out)));
  }

  const std::string& path() const { return path_; }

 private:
  std::string path_;
  void* handle_ = nullptr;
  DecodeFn decode_ = nullptr;
};

// For the tests: the NsaSelParams bytes the fast path would launch with (`out` given), or None.
py::object pack_params(py::handle q, py::handle k, py::handle v, py::handle ranges,
                       py::handle kv_lens, py::handle scale, py::handle out) {
  NsaSelParams p;
  const at::Tensor* o = as_tensor(out);
  if (!o || o->dim() != 5 || !pack_inputs(q, k, v, ranges, kv_lens, scale, false, &p)) {
    return py::none();
  }
  set_output(*o, &p);
  return py::bytes(reinterpret_cast<const char*>(&p), sizeof(p));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "nsa_sel eager fast path (see csrc/torch/nsa_sel_torch.cpp)";
  m.attr("abi_version") = NSA_SEL_ABI_VERSION;
  py::class_<Launcher>(m, "Launcher")
      .def(py::init<const std::string&>(), py::arg("library_path"))
      .def("__call__", &Launcher::call)
      .def_property_readonly("path", &Launcher::path);
  m.def("pack_params", &pack_params);
}
