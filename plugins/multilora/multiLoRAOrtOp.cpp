/*
 * ONNX Runtime custom-op library (libpeft_multilora_ort.so): a CPU kernel for
 * peft_export::MultiLoRA v1 on fp32 tensors. ONNX Runtime prefers a registered kernel over
 * the model's local function of the same name, so a session that loads this library
 * (SessionOptions.register_custom_ops_library) runs multiLoRACpu.cpp instead of the
 * Gather + MatMul body. Built against ONNX Runtime's headers only: the API table comes
 * from the process that loads the library.
 */
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <mutex>
#include <string>
#include <vector>

#include "multiLoRACpu.h"

namespace {

class OrtParallel final : public peft_multilora_cpu::Parallel {
 public:
  explicit OrtParallel(const Ort::KernelContext& context) : context_(context) {}
  void run(size_t count, void (*fn)(void*, size_t), void* arg) const override {
    context_.ParallelFor(fn, count, 0, arg);
  }

 private:
  const Ort::KernelContext& context_;
};

std::string dims(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

// Empty when the shapes fit the op's contract, else what is wrong.
std::string check_shapes(const std::vector<int64_t>& x, const std::vector<int64_t>& a,
                         const std::vector<int64_t>& b, const std::vector<int64_t>& ids) {
  if (x.size() != 3 || a.size() != 3 || b.size() != 3 || ids.size() != 1) {
    return "expects x [batch, seq, in], A [slots, r, in], B [slots, out, r], adapter_ids [batch]";
  }
  if (a[2] != x[2] || b[2] != a[1] || b[0] != a[0] || ids[0] != x[0]) {
    return "shapes do not agree: x " + dims(x) + ", A " + dims(a) + ", B " + dims(b) +
           ", adapter_ids " + dims(ids);
  }
  return {};
}

struct MultiLoRAKernel {
  OrtStatusPtr ComputeV2(OrtKernelContext* raw_context) {
    try {
      Ort::KernelContext context(raw_context);
      const Ort::ConstValue x = context.GetInput(0);
      const Ort::ConstValue a = context.GetInput(1);
      const Ort::ConstValue b = context.GetInput(2);
      const Ort::ConstValue ids = context.GetInput(3);
      const auto xs = x.GetTensorTypeAndShapeInfo().GetShape();
      const auto as = a.GetTensorTypeAndShapeInfo().GetShape();
      const auto bs = b.GetTensorTypeAndShapeInfo().GetShape();
      const auto is = ids.GetTensorTypeAndShapeInfo().GetShape();
      const std::string problem = check_shapes(xs, as, bs, is);
      if (!problem.empty()) {
        return Ort::Status(("peft_export::MultiLoRA: " + problem).c_str(), ORT_INVALID_ARGUMENT)
            .release();
      }
      Ort::UnownedValue delta = context.GetOutput(0, {xs[0], xs[1], bs[1]});
      const peft_multilora_cpu::Problem p{
          x.GetTensorData<float>(), a.GetTensorData<float>(), b.GetTensorData<float>(),
          ids.GetTensorData<int64_t>(), delta.GetTensorMutableData<float>(),
          xs[0], xs[1], xs[2], bs[1], as[1], as[0]};
      peft_multilora_cpu::forward(p, OrtParallel(context));
      return nullptr;
    } catch (const Ort::Exception& e) {
      return Ort::Status(e.what(), e.GetOrtErrorCode()).release();
    } catch (const std::exception& e) {
      return Ort::Status(e.what(), ORT_RUNTIME_EXCEPTION).release();
    }
  }
};

struct MultiLoRAOp : Ort::CustomOpBase<MultiLoRAOp, MultiLoRAKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo*, void** kernel) const {
    *kernel = new MultiLoRAKernel();
    return nullptr;
  }
  const char* GetName() const { return "MultiLoRA"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 3 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
};

}  // namespace

/* Entry point that SessionOptions.register_custom_ops_library calls. The op and its domain
 * live for the whole process: sessions keep pointers to them. */
extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(
    OrtSessionOptions* options, const OrtApiBase* api_base) {
  static std::once_flag init;
  static MultiLoRAOp* op = nullptr;
  static OrtCustomOpDomain* domain = nullptr;
  try {
    std::call_once(init, [api_base] {
      Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
      op = new MultiLoRAOp();
      Ort::CustomOpDomain owned("peft_export");
      owned.Add(op);
      domain = owned.release();
    });
    Ort::UnownedSessionOptions(options).Add(domain);
    return nullptr;
  } catch (const Ort::Exception& e) {
    return Ort::Status(e.what(), e.GetOrtErrorCode()).release();
  }
}
