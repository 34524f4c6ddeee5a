// Thread-local last-error message and the ABI queries of the C API.
#include <cstdio>
#include <string>

#include "internal.hpp"

namespace nsa_sel {
namespace {
thread_local std::string g_last_error;
}  // namespace

NsaSelStatus fail(NsaSelStatus status, const char* fmt, ...) {
  char buf[1024];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, args);
  va_end(args);
  g_last_error = buf;
  return status;
}

NsaSelStatus ok() {
  g_last_error.clear();
  return NSA_SEL_OK;
}

}  // namespace nsa_sel

extern "C" {

int32_t nsa_sel_abi_version(void) { return NSA_SEL_ABI_VERSION; }
int64_t nsa_sel_params_size(void) { return static_cast<int64_t>(sizeof(NsaSelParams)); }
const char* nsa_sel_last_error(void) { return nsa_sel::g_last_error.c_str(); }

}  // extern "C"
