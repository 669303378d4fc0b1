// TensorRT IPluginV3 for the peft_export::MultiLoRA op: a thin layer over the C ABI of
// peft_multilora.h (the kernels), kept thin because no machine of this project can run it.
//
// ONNX node: domain peft_export, op MultiLoRA, version 1, no attributes.
// Inputs (x [batch, seq, in], A [slots, r, in], B [slots, out, r], adapter_ids [batch] int64),
// one output [batch, seq, out] of x's type; fp32, fp16 or bf16, linear format.
#pragma once

#include "NvInferRuntime.h"
#include "peft_multilora.h"

#include <string>

namespace peft_export::plugin {

constexpr char const* kMULTILORA_NAME = "MultiLoRA";
constexpr char const* kMULTILORA_VERSION = "1";
constexpr char const* kMULTILORA_NAMESPACE = "peft_export";

class MultiLoRAPlugin : public nvinfer1::IPluginV3,
                        public nvinfer1::IPluginV3OneCore,
                        public nvinfer1::IPluginV3OneBuild,
                        public nvinfer1::IPluginV3OneRuntime {
public:
    explicit MultiLoRAPlugin(std::string pluginNamespace);

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                            nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
                               nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
                            nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs,
                            nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                            nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut,
                                   int32_t nbInputs, int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                            nvinfer1::DynamicPluginTensorDesc const* outputs,
                            int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
                          nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                    void const* const* inputs, void* const* outputs, void* workspace,
                    cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    std::string mNamespace;
    nvinfer1::PluginFieldCollection mFields{0, nullptr};  // the op has no attributes
};

class MultiLoRAPluginCreator : public nvinfer1::IPluginCreatorV3One {
public:
    explicit MultiLoRAPluginCreator(char const* pluginNamespace);

    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                      nvinfer1::TensorRTPhase phase) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

private:
    std::string mNamespace;
    nvinfer1::PluginFieldCollection mFields{0, nullptr};
};

}  // namespace peft_export::plugin

// Entry points of a TensorRT plugin library: IPluginRegistry::loadLibrary (Python:
// registry.load_library), trtexec --dynamicPlugins and engines that serialize the library.
// (TENSORRTAPI exports only inside TensorRT's own build, hence PEFT_ML_API.)
extern "C" PEFT_ML_API void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
extern "C" PEFT_ML_API nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
