/*
 * ONNX Runtime custom-op library (libpeft_multilora_ort.so): CPU kernels for
 * peft_export::MultiLoRA v1, peft_export::SlotScale v1 (the DoRA/IA3 per-row scales) and, for
 * ONNX Runtime-fused graphs, peft_export::MultiLoRAAdd1..8 (base output + the deltas of
 * modules that share an input, in one node), on fp32 tensors.
 * ONNX Runtime prefers a registered kernel over the model's local function of the same
 * name, so a session that loads this library (SessionOptions.register_custom_ops_library)
 * runs multiLoRACpu.cpp instead of the Gather + MatMul body. Built against ONNX Runtime's
 * headers only: the API table comes from the process that loads the library.
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

// MultiLoRAAdd{n} for n up to this many modules (the exporter packs no more into one node).
constexpr size_t kMaxAddModules = 8;

std::vector<int64_t> shape_of(const Ort::ConstValue& value) {
  return value.GetTensorTypeAndShapeInfo().GetShape();
}

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

// Runs `compute`, turning an exception into the status ONNX Runtime expects.
template <typename Compute>
OrtStatusPtr guarded(Compute compute) {
  try {
    return compute();
  } catch (const Ort::Exception& e) {
    return Ort::Status(e.what(), e.GetOrtErrorCode()).release();
  } catch (const std::exception& e) {
    return Ort::Status(e.what(), ORT_RUNTIME_EXCEPTION).release();
  }
}

// x [batch, seq, in] and adapter_ids [batch]: what every module of a node shares.
struct Rows {
  Rows(const Ort::KernelContext& context, size_t x_input, size_t ids_input)
      : x(context.GetInput(x_input)), ids(context.GetInput(ids_input)), xs(shape_of(x)),
        is(shape_of(ids)) {}
  Ort::ConstValue x, ids;
  std::vector<int64_t> xs, is;
};

// Fills `p` for the banks at inputs a_input (A) and a_input + 1 (B), its delta still unset
// and rows of `out` floats, and returns ""; or says what does not fit, leaving `p` alone.
std::string module_problem(const Ort::KernelContext& context, const Rows& rows, size_t a_input,
                           peft_multilora_cpu::Problem& p) {
  const Ort::ConstValue a = context.GetInput(a_input);
  const Ort::ConstValue b = context.GetInput(a_input + 1);
  const auto as = shape_of(a);
  const auto bs = shape_of(b);
  std::string wrong = check_shapes(rows.xs, as, bs, rows.is);
  if (wrong.empty()) {
    const auto& xs = rows.xs;
    p = {rows.x.GetTensorData<float>(), a.GetTensorData<float>(), b.GetTensorData<float>(),
         rows.ids.GetTensorData<int64_t>(), nullptr, xs[0], xs[1], xs[2], bs[1], as[1], as[0],
         bs[1]};
  }
  return wrong;
}

struct MultiLoRAKernel {
  OrtStatusPtr ComputeV2(OrtKernelContext* raw_context) {
    return guarded([raw_context]() -> OrtStatusPtr {
      Ort::KernelContext context(raw_context);
      const Rows rows(context, 0, 3);
      peft_multilora_cpu::Problem p;
      const std::string problem = module_problem(context, rows, 1, p);
      if (!problem.empty()) {
        return Ort::Status(("peft_export::MultiLoRA: " + problem).c_str(), ORT_INVALID_ARGUMENT)
            .release();
      }
      Ort::UnownedValue delta = context.GetOutput(0, {p.batch, p.seq, p.out});
      p.delta = delta.GetTensorMutableData<float>();
      peft_multilora_cpu::forward(p, OrtParallel(context));
      return nullptr;
    });
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

// y = base + concat(delta of each module) along the last axis; inputs (x, adapter_ids, base,
// A_1, B_1, ..., A_n, B_n). Each delta is written into its slice of y, then base is added.
struct MultiLoRAAddKernel {
  explicit MultiLoRAAddKernel(size_t modules)
      : modules_(modules), name_("peft_export::MultiLoRAAdd" + std::to_string(modules) + ": ") {}

  OrtStatusPtr invalid(const std::string& problem) const {
    return Ort::Status((name_ + problem).c_str(), ORT_INVALID_ARGUMENT).release();
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* raw_context) {
    return guarded([this, raw_context]() -> OrtStatusPtr {
      Ort::KernelContext context(raw_context);
      if (context.GetInputCount() != 3 + 2 * modules_) {
        return invalid("expects x, adapter_ids, base and " + std::to_string(modules_) +
                       " (A, B) pairs");
      }
      const Rows rows(context, 0, 1);
      const Ort::ConstValue base = context.GetInput(2);
      const auto ys = shape_of(base);
      peft_multilora_cpu::Problem problems[kMaxAddModules];
      int64_t packed = 0;
      for (size_t i = 0; i < modules_; ++i) {
        const std::string problem = module_problem(context, rows, 3 + 2 * i, problems[i]);
        if (!problem.empty()) return invalid(problem);
        packed += problems[i].out;
      }
      const auto& xs = rows.xs;
      if (ys.size() != 3 || ys[0] != xs[0] || ys[1] != xs[1] || ys[2] != packed) {
        return invalid("base " + dims(ys) + " is not [batch, seq, " + std::to_string(packed) +
                       "] (x " + dims(xs) + ")");
      }
      Ort::UnownedValue out = context.GetOutput(0, ys);
      float* y = out.GetTensorMutableData<float>();
      int64_t offset = 0;
      for (size_t i = 0; i < modules_; ++i) {
        peft_multilora_cpu::Problem& p = problems[i];
        p.delta = y + offset;
        p.delta_stride = packed;
        peft_multilora_cpu::forward(p, OrtParallel(context));
        offset += p.out;
      }
      const float* from = base.GetTensorData<float>();
      const int64_t total = ys[0] * ys[1] * packed;
      for (int64_t i = 0; i < total; ++i) y[i] += from[i];
      return nullptr;
    });
  }

 private:
  size_t modules_;
  std::string name_;
};

struct MultiLoRAAddOp : Ort::CustomOpBase<MultiLoRAAddOp, MultiLoRAAddKernel, true> {
  explicit MultiLoRAAddOp(size_t modules)
      : modules_(modules), name_("MultiLoRAAdd" + std::to_string(modules)) {}
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo*, void** kernel) const {
    *kernel = new MultiLoRAAddKernel(modules_);
    return nullptr;
  }
  const char* GetName() const { return name_.c_str(); }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == 3 ? INPUT_OUTPUT_VARIADIC : INPUT_OUTPUT_REQUIRED;
  }
  int GetVariadicInputMinArity() const { return static_cast<int>(2 * modules_); }
  bool GetVariadicInputHomogeneity() const { return true; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }

 private:
  size_t modules_;
  std::string name_;
};

// y = x * scale[adapter_ids], inputs (x, scale, adapter_ids): the DoRA/IA3 scales of runtime
// bundles (peft_export::SlotScale), one node instead of Gather + Unsqueeze + Mul.
struct SlotScaleKernel {
  OrtStatusPtr ComputeV2(OrtKernelContext* raw_context) {
    return guarded([raw_context]() -> OrtStatusPtr {
      Ort::KernelContext context(raw_context);
      const Ort::ConstValue x = context.GetInput(0);
      const Ort::ConstValue scale = context.GetInput(1);
      const Ort::ConstValue ids = context.GetInput(2);
      const auto xs = shape_of(x);
      const auto ss = shape_of(scale);
      const auto is = shape_of(ids);
      if (xs.size() != 3 || ss.size() != 2 || is.size() != 1 || ss[1] != xs[2] ||
          is[0] != xs[0]) {
        const std::string problem =
            "peft_export::SlotScale: expects x [batch, seq, n], scale [slots, n], adapter_ids "
            "[batch]; got x " + dims(xs) + ", scale " + dims(ss) + ", adapter_ids " + dims(is);
        return Ort::Status(problem.c_str(), ORT_INVALID_ARGUMENT).release();
      }
      Ort::UnownedValue y = context.GetOutput(0, xs);
      peft_multilora_cpu::scale_rows({x.GetTensorData<float>(), scale.GetTensorData<float>(),
                                      ids.GetTensorData<int64_t>(),
                                      y.GetTensorMutableData<float>(), xs[0], xs[1], xs[2],
                                      ss[0]});
      return nullptr;
    });
  }
};

struct SlotScaleOp : Ort::CustomOpBase<SlotScaleOp, SlotScaleKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo*, void** kernel) const {
    *kernel = new SlotScaleKernel();
    return nullptr;
  }
  const char* GetName() const { return "SlotScale"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
};

}  // namespace

/* Entry point that SessionOptions.register_custom_ops_library calls. The ops and their domain
 * live for the whole process: sessions keep pointers to them. */
extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(
    OrtSessionOptions* options, const OrtApiBase* api_base) {
  static std::once_flag init;
  static OrtCustomOpDomain* domain = nullptr;
  try {
    std::call_once(init, [api_base] {
      Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
      Ort::CustomOpDomain owned("peft_export");
      owned.Add(new MultiLoRAOp());
      for (size_t modules = 1; modules <= kMaxAddModules; ++modules) {
        owned.Add(new MultiLoRAAddOp(modules));
      }
      owned.Add(new SlotScaleOp());
      domain = owned.release();
    });
    Ort::UnownedSessionOptions(options).Add(domain);
    return nullptr;
  } catch (const Ort::Exception& e) {
    return Ort::Status(e.what(), e.GetOrtErrorCode()).release();
  }
}
