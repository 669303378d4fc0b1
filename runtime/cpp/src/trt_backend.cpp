// TensorRT backend: runs a serialized engine from the bundle's engines/ with CUDA buffers.
//
// Built only where TensorRT is found (PEFT_EXPORT_WITH_TENSORRT); no machine this project
// tests on can execute a TensorRT engine, so this layer is kept thin: host-side step inputs
// are the ones the ORT backend gets, the banks are mirrored slot by slot on the device, and
// each request owns an execution context and ping-pong KV buffers.
#include "peft_export/backend.hpp"
#include "peft_export/errors.hpp"

#ifdef PEFT_EXPORT_WITH_TENSORRT
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <mutex>
#endif

namespace peft_export {

#ifndef PEFT_EXPORT_WITH_TENSORRT

bool tensorrt_available() { return false; }

std::unique_ptr<Backend> make_tensorrt_backend(const std::filesystem::path&, const Manifest&,
                                               AdapterBanks*, const BackendOptions&) {
  throw InferenceError("this build of the C++ runtime has no TensorRT backend; rebuild with "
                       "-DTENSORRT_ROOT=<TensorRT install> or use backend 'ort'");
}

#else

namespace {

void cuda_check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw InferenceError(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(status) +
                         "; check the GPU and driver");
  }
}

class Logger final : public nvinfer1::ILogger {
 public:
  void log(Severity severity, nvinfer1::AsciiChar const* message) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << "[TensorRT] " << message << "\n";
  }
};

Logger& logger() {
  static Logger instance;
  return instance;
}

// Device memory that grows on demand and frees itself.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept : data_(other.data_), bytes_(other.bytes_) {
    other.data_ = nullptr;
    other.bytes_ = 0;
  }
  ~DeviceBuffer() { cudaFree(data_); }

  void reserve(std::size_t bytes) {
    if (bytes <= bytes_) return;
    void* grown = nullptr;
    cuda_check(cudaMalloc(&grown, bytes), "cudaMalloc");
    cudaFree(data_);
    data_ = grown;
    bytes_ = bytes;
  }
  void* data() const { return data_; }

 private:
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
};

nvinfer1::Dims dims_of(const std::vector<std::int64_t>& shape) {
  nvinfer1::Dims dims{};
  dims.nbDims = static_cast<std::int32_t>(shape.size());
  for (std::size_t i = 0; i < shape.size(); ++i) dims.d[i] = shape[i];
  return dims;
}

DType dtype_of(nvinfer1::DataType type, const std::string& name) {
  switch (type) {
    case nvinfer1::DataType::kFLOAT: return DType::kFloat32;
    case nvinfer1::DataType::kHALF: return DType::kFloat16;
    case nvinfer1::DataType::kBF16: return DType::kBFloat16;
    case nvinfer1::DataType::kINT64: return DType::kInt64;
    case nvinfer1::DataType::kINT32: return DType::kInt32;
    case nvinfer1::DataType::kBOOL: return DType::kBool;
    default:
      throw InferenceError("engine tensor '" + name + "' has a type this backend does not handle; "
                           "rebuild the engine with --precision fp32, fp16 or bf16");
  }
}

class TrtState final : public KVState {
 public:
  std::int64_t past_len() const override { return past_len_; }
  std::unique_ptr<nvinfer1::IExecutionContext> context;
  cudaStream_t stream = nullptr;
  std::vector<DeviceBuffer> kv[2];  // ping-pong: kv[front] holds the past
  int front = 0;
  std::int64_t past_len_ = 0;
  std::map<std::string, DeviceBuffer> inputs;
  DeviceBuffer logits;
  std::vector<std::byte> host_logits;
  ~TrtState() override {
    if (stream != nullptr) cudaStreamDestroy(stream);
  }
};

class TrtBackend final : public Backend {
 public:
  TrtBackend(const std::filesystem::path& engine_file, const Manifest& manifest, AdapterBanks* banks,
             const std::filesystem::path& plugin)
      : manifest_(manifest), banks_(banks) {
    if (!plugin.empty()) require_plugin_file(plugin);
    std::ifstream in(engine_file, std::ios::binary);
    std::vector<char> blob((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (blob.empty()) throw InferenceError(engine_file.string() + ": empty or unreadable engine");
    runtime_.reset(nvinfer1::createInferRuntime(logger()));
    if (!runtime_) throw InferenceError("TensorRT could not create a runtime; check the install");
    if (!plugin.empty() && runtime_->getPluginRegistry().loadLibrary(plugin.c_str()) == nullptr) {
      throw InferenceError(plugin.string() + ": TensorRT could not load the multi-LoRA plugin "
                           "library; rebuild plugins/multilora for this TensorRT version");
    }
    engine_.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
    if (!engine_) {
      throw InferenceError(engine_file.string() +
                           ": TensorRT could not deserialize the engine (other TensorRT version or "
                           "GPU, or the multi-LoRA plugin is missing); rebuild it with "
                           "'peft-export build-engine' on this machine");
    }
    for (std::int32_t i = 0; i < engine_->getNbIOTensors(); ++i) {
      std::string name = engine_->getIOTensorName(i);
      DType dtype = dtype_of(engine_->getTensorDataType(name.c_str()), name);
      if (engine_->getTensorIOMode(name.c_str()) == nvinfer1::TensorIOMode::kINPUT) {
        input_types_[name] = dtype;
      } else {
        output_types_[name] = dtype;
      }
    }
    if (!output_types_.count("logits")) {
      throw InferenceError(engine_file.string() + ": the engine has no 'logits' output; rebuild it");
    }
    upload_banks();
  }

  std::string name() const override { return "tensorrt"; }

  std::unique_ptr<KVState> new_state() override {
    auto state = std::make_unique<TrtState>();
    state->context.reset(engine_->createExecutionContext());
    if (!state->context) throw InferenceError("TensorRT could not create an execution context");
    cuda_check(cudaStreamCreate(&state->stream), "cudaStreamCreate");
    for (auto& side : state->kv) side.resize(static_cast<std::size_t>(2 * manifest_.kv.num_layers));
    return state;
  }

  void step(KVState& base_state, const StepInputs& in, std::vector<float>& last_logits) override {
    auto& state = static_cast<TrtState&>(base_state);
    nvinfer1::IExecutionContext& context = *state.context;
    const KVLayout& kv = manifest_.kv;
    std::int64_t past = state.past_len_;
    auto seeded = in.extra.find("past_key_values.0.key");
    if (past == 0 && seeded != in.extra.end()) past = seeded->second.shape.at(2);
    std::int64_t total = past + in.position_len;
    std::vector<std::int64_t> past_shape{in.batch, kv.num_kv_heads, past, kv.head_dim};
    std::vector<std::int64_t> present_shape{in.batch, kv.num_kv_heads, total, kv.head_dim};
    std::size_t kv_item = dtype_size(kv.dtype);
    auto kv_bytes = [&](std::int64_t len) {
      return static_cast<std::size_t>(in.batch * kv.num_kv_heads * len * kv.head_dim) * kv_item;
    };

    for (const auto& [name, dtype] : input_types_) {
      const void* host = nullptr;
      std::vector<std::int64_t> shape;
      if (name == "input_ids") {
        host = in.input_ids;
        shape = {in.batch, in.seq};
      } else if (name == "attention_mask") {
        host = in.attention_mask;
        shape = {in.batch, in.mask_len};
      } else if (name == "position_ids") {
        host = in.position_ids;
        shape = {in.batch, in.position_len};
      } else if (name == "adapter_ids") {
        host = in.adapter_ids;
        shape = {in.batch};
      } else if (bank_index_.count(name)) {
        const BankSpec& spec = banks_->specs()[bank_index_[name]];
        context.setInputShape(name.c_str(), dims_of(spec.shape));
        context.setTensorAddress(name.c_str(), bank_device_[bank_index_[name]].data());
        continue;
      } else if (int slot = kv_slot(name, "past_key_values."); slot >= 0) {
        DeviceBuffer& buffer = state.kv[state.front][static_cast<std::size_t>(slot)];
        buffer.reserve(std::max<std::size_t>(kv_bytes(past), 1));
        auto seed = in.extra.find(name);
        if (state.past_len_ == 0 && seed != in.extra.end()) {
          cuda_check(cudaMemcpyAsync(buffer.data(), seed->second.data, kv_bytes(past),
                                     cudaMemcpyHostToDevice, state.stream), "cudaMemcpyAsync");
        }
        context.setInputShape(name.c_str(), dims_of(past_shape));
        context.setTensorAddress(name.c_str(), buffer.data());
        continue;
      } else {
        auto extra = in.extra.find(name);
        if (extra == in.extra.end()) {
          throw InferenceError("engine input '" + name + "' is fed by nothing in this runtime");
        }
        host = extra->second.data;
        shape = extra->second.shape;
      }
      std::size_t bytes = static_cast<std::size_t>(element_count(shape)) * dtype_size(dtype);
      DeviceBuffer& buffer = state.inputs[name];
      buffer.reserve(std::max<std::size_t>(bytes, 1));
      if (bytes > 0) {
        cuda_check(cudaMemcpyAsync(buffer.data(), host, bytes, cudaMemcpyHostToDevice, state.stream),
                   "cudaMemcpyAsync");
      }
      context.setInputShape(name.c_str(), dims_of(shape));
      context.setTensorAddress(name.c_str(), buffer.data());
    }

    DType logits_type = output_types_["logits"];
    std::size_t logits_bytes =
        static_cast<std::size_t>(in.batch * in.position_len * manifest_.vocab_size) * dtype_size(logits_type);
    state.logits.reserve(logits_bytes);
    context.setTensorAddress("logits", state.logits.data());
    for (int slot = 0; slot < 2 * kv.num_layers; ++slot) {
      DeviceBuffer& buffer = state.kv[1 - state.front][static_cast<std::size_t>(slot)];
      buffer.reserve(kv_bytes(total));
      context.setTensorAddress(present_name(slot).c_str(), buffer.data());
    }
    if (!context.enqueueV3(state.stream)) {
      throw InferenceError("TensorRT failed to run a step; the request's shapes may be outside the "
                           "engine's profiles (see the manifest's engines[].profiles)");
    }
    state.host_logits.resize(logits_bytes);
    cuda_check(cudaMemcpyAsync(state.host_logits.data(), state.logits.data(), logits_bytes,
                               cudaMemcpyDeviceToHost, state.stream), "cudaMemcpyAsync");
    cuda_check(cudaStreamSynchronize(state.stream), "cudaStreamSynchronize");
    std::int64_t vocab = manifest_.vocab_size;
    last_logits.resize(static_cast<std::size_t>(in.batch * vocab));
    std::size_t item = dtype_size(logits_type);
    for (std::int64_t row = 0; row < in.batch; ++row) {
      std::size_t offset = static_cast<std::size_t>((row * in.position_len + in.position_len - 1) * vocab) * item;
      to_float(logits_type, state.host_logits.data() + offset, static_cast<std::size_t>(vocab),
               last_logits.data() + static_cast<std::size_t>(row * vocab));
    }
    state.front = 1 - state.front;
    state.past_len_ = total;
  }

 private:
  static void require_plugin_file(const std::filesystem::path& plugin) {
    std::error_code ec;
    if (!std::filesystem::is_regular_file(plugin, ec)) {
      throw InferenceError(plugin.string() + ": the multi-LoRA plugin library is missing; build "
                           "plugins/multilora or pass its path as plugin_library");
    }
  }

  int kv_slot(const std::string& name, const std::string& prefix) const {
    for (int layer = 0; layer < manifest_.kv.num_layers; ++layer) {
      std::string base = prefix + std::to_string(layer) + ".";
      if (name == base + "key") return 2 * layer;
      if (name == base + "value") return 2 * layer + 1;
    }
    return -1;
  }

  static std::string present_name(int slot) {
    return "present." + std::to_string(slot / 2) + (slot % 2 ? ".value" : ".key");
  }

  void upload_banks() {
    if (banks_ == nullptr) return;
    for (std::size_t i = 0; i < banks_->specs().size(); ++i) {
      bank_index_[banks_->specs()[i].name] = i;
      bank_device_.emplace_back();
      bank_device_.back().reserve(banks_->nbytes(i));
      cuda_check(cudaMemcpy(bank_device_.back().data(), banks_->data(i), banks_->nbytes(i),
                            cudaMemcpyHostToDevice), "cudaMemcpy");
    }
    banks_->set_listener([this](int slot) {
      std::lock_guard<std::mutex> lock(bank_mutex_);
      for (std::size_t i = 0; i < banks_->specs().size(); ++i) {
        std::size_t offset = banks_->slot_bytes(i) * static_cast<std::size_t>(slot);
        cuda_check(cudaMemcpy(static_cast<std::byte*>(bank_device_[i].data()) + offset,
                              static_cast<const std::byte*>(banks_->data(i)) + offset,
                              banks_->slot_bytes(i), cudaMemcpyHostToDevice), "cudaMemcpy");
      }
    });
  }

  const Manifest& manifest_;
  AdapterBanks* banks_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  std::map<std::string, DType> input_types_;
  std::map<std::string, DType> output_types_;
  std::map<std::string, std::size_t> bank_index_;
  std::vector<DeviceBuffer> bank_device_;
  std::mutex bank_mutex_;
};

std::filesystem::path default_plugin() {
  const char* env = std::getenv("PEFT_EXPORT_MULTILORA_PLUGIN");
  return env ? env : "libpeft_multilora.so";
}

}  // namespace

bool tensorrt_available() { return true; }

std::unique_ptr<Backend> make_tensorrt_backend(const std::filesystem::path& bundle_dir,
                                               const Manifest& manifest, AdapterBanks* banks,
                                               const BackendOptions& options) {
  const EngineRecord* record = nullptr;
  for (const EngineRecord& engine : manifest.engines) {
    if ((options.engine.empty() && engine.backend == "tensorrt") || engine.file == options.engine) {
      record = &engine;
      break;
    }
  }
  if (record == nullptr) {
    throw InferenceError("the bundle has no TensorRT engine" +
                         (options.engine.empty() ? std::string() : " '" + options.engine + "'") +
                         "; build one with 'peft-export build-engine', or use backend 'ort'");
  }
  if (record->backend != "tensorrt") {
    throw InferenceError("engine " + record->file + " was built for " + record->backend +
                         ", which this backend (TensorRT) cannot run; rebuild with --engine trt");
  }
  std::filesystem::path plugin;
  if (record->lora_impl == "plugin") {
    plugin = options.plugin_library.empty() ? default_plugin() : options.plugin_library;
  }
  return std::make_unique<TrtBackend>(confined_path(bundle_dir, record->file), manifest, banks, plugin);
}

#endif

}  // namespace peft_export
