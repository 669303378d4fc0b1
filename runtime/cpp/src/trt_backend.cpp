#include "peft_export/backend.hpp"
#include "peft_export/errors.hpp"

namespace peft_export {

bool tensorrt_available() { return false; }

std::unique_ptr<Backend> make_tensorrt_backend(const std::filesystem::path&, const Manifest&,
                                               AdapterBanks*, const BackendOptions&) {
  throw InferenceError("this build of the C++ runtime has no TensorRT backend; rebuild with "
                       "-DTENSORRT_ROOT=<TensorRT install> or use backend 'ort'");
}

}  // namespace peft_export
