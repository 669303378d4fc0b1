#include "multiLoRAPlugin.h"

#include <atomic>
#include <string>

using namespace nvinfer1;

namespace peft_export::plugin {
namespace {

enum : int32_t { kX = 0, kA = 1, kB = 2, kIDS = 3, kNB_INPUTS = 4, kOUT = 4 };

std::atomic<ILoggerFinder*> gLoggerFinder{nullptr};

void logError(std::string const& msg) noexcept {
    ILoggerFinder* finder = gLoggerFinder.load();
    ILogger* logger = finder != nullptr ? finder->findLogger() : nullptr;
    if (logger != nullptr) logger->log(ILogger::Severity::kERROR, ("MultiLoRA plugin: " + msg).c_str());
}

bool isFloatType(DataType t) { return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16; }

int dtypeCode(DataType t) {
    switch (t) {
        case DataType::kFLOAT: return PEFT_ML_FLOAT32;
        case DataType::kHALF: return PEFT_ML_FLOAT16;
        case DataType::kBF16: return PEFT_ML_BFLOAT16;
        default: return -1;
    }
}

bool ranksOk(Dims const& x, Dims const& a, Dims const& b, Dims const& ids) {
    return x.nbDims == 3 && a.nbDims == 3 && b.nbDims == 3 && ids.nbDims == 1;
}

}  // namespace

MultiLoRAPlugin::MultiLoRAPlugin(std::string pluginNamespace) : mNamespace(std::move(pluginNamespace)) {}

IPluginCapability* MultiLoRAPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept {
    switch (type) {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* MultiLoRAPlugin::clone() noexcept {
    try {
        return new MultiLoRAPlugin(mNamespace);
    } catch (...) {
        return nullptr;
    }
}

char const* MultiLoRAPlugin::getPluginName() const noexcept { return kMULTILORA_NAME; }
char const* MultiLoRAPlugin::getPluginVersion() const noexcept { return kMULTILORA_VERSION; }
char const* MultiLoRAPlugin::getPluginNamespace() const noexcept { return mNamespace.c_str(); }

int32_t MultiLoRAPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                         DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept {
    if (nbInputs != kNB_INPUTS || nbOutputs != 1 ||
        !ranksOk(in[kX].desc.dims, in[kA].desc.dims, in[kB].desc.dims, in[kIDS].desc.dims)) {
        logError("expects inputs x [batch, seq, in], A [slots, r, in], B [slots, out, r], adapter_ids [batch]");
        return 1;
    }
    return 0;
}

int32_t MultiLoRAPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                                            int32_t nbInputs) const noexcept {
    if (nbInputs != kNB_INPUTS || nbOutputs != 1) return 1;
    outputTypes[0] = inputTypes[kX];
    return 0;
}

int32_t MultiLoRAPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t,
                                         DimsExprs* outputs, int32_t nbOutputs, IExprBuilder&) noexcept {
    if (nbInputs != kNB_INPUTS || nbOutputs != 1 || inputs[kX].nbDims != 3 || inputs[kB].nbDims != 3) return 1;
    outputs[0].nbDims = 3;
    outputs[0].d[0] = inputs[kX].d[0];  // batch
    outputs[0].d[1] = inputs[kX].d[1];  // seq
    outputs[0].d[2] = inputs[kB].d[1];  // out features
    return 0;
}

bool MultiLoRAPlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                                int32_t nbOutputs) noexcept {
    if (nbInputs != kNB_INPUTS || nbOutputs != 1 || pos < 0 || pos > kOUT) return false;
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR) return false;
    switch (pos) {
        case kX: return isFloatType(d.type);
        case kIDS: return d.type == DataType::kINT64;
        default: return d.type == inOut[kX].desc.type;  // A, B and the output follow x
    }
}

int32_t MultiLoRAPlugin::getNbOutputs() const noexcept { return 1; }

size_t MultiLoRAPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                                         DynamicPluginTensorDesc const*, int32_t) const noexcept {
    if (nbInputs != kNB_INPUTS) return 0;
    // The size grows with every dimension, so the profile's maxima cover every call.
    Dims const& x = inputs[kX].max;
    Dims const& a = inputs[kA].max;
    Dims const& b = inputs[kB].max;
    return peft_multilora_workspace_size(x.d[0], x.d[1], x.d[2], b.d[1], a.d[1], a.d[0]);
}

int32_t MultiLoRAPlugin::onShapeChange(PluginTensorDesc const*, int32_t, PluginTensorDesc const*, int32_t) noexcept {
    return 0;
}

int32_t MultiLoRAPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*,
                                 void const* const* inputs, void* const* outputs, void* workspace,
                                 cudaStream_t stream) noexcept {
    Dims const& x = inputDesc[kX].dims;
    Dims const& a = inputDesc[kA].dims;
    Dims const& b = inputDesc[kB].dims;
    Dims const& ids = inputDesc[kIDS].dims;
    if (!ranksOk(x, a, b, ids) || a.d[2] != x.d[2] || b.d[0] != a.d[0] || b.d[2] != a.d[1] || ids.d[0] != x.d[0]) {
        logError("input shapes do not fit x [batch, seq, in], A [slots, r, in], B [slots, out, r], ids [batch]");
        return 1;
    }
    size_t const wsSize = peft_multilora_workspace_size(x.d[0], x.d[1], x.d[2], b.d[1], a.d[1], a.d[0]);
    int const status = peft_multilora_forward(dtypeCode(inputDesc[kX].type), inputs[kX], inputs[kA], inputs[kB],
                                              static_cast<int64_t const*>(inputs[kIDS]), x.d[0], x.d[1], x.d[2],
                                              b.d[1], a.d[1], a.d[0], outputs[0], workspace, wsSize, stream);
    if (status != PEFT_ML_OK) {
        logError(peft_multilora_status_string(status));
        return 1;
    }
    return 0;
}

IPluginV3* MultiLoRAPlugin::attachToContext(IPluginResourceContext*) noexcept { return clone(); }

PluginFieldCollection const* MultiLoRAPlugin::getFieldsToSerialize() noexcept { return &mFields; }

MultiLoRAPluginCreator::MultiLoRAPluginCreator(char const* pluginNamespace) : mNamespace(pluginNamespace) {}

IPluginV3* MultiLoRAPluginCreator::createPlugin(char const*, PluginFieldCollection const*, TensorRTPhase) noexcept {
    try {
        return new MultiLoRAPlugin(mNamespace);
    } catch (...) {
        return nullptr;
    }
}

PluginFieldCollection const* MultiLoRAPluginCreator::getFieldNames() noexcept { return &mFields; }
char const* MultiLoRAPluginCreator::getPluginName() const noexcept { return kMULTILORA_NAME; }
char const* MultiLoRAPluginCreator::getPluginVersion() const noexcept { return kMULTILORA_VERSION; }
char const* MultiLoRAPluginCreator::getPluginNamespace() const noexcept { return mNamespace.c_str(); }

}  // namespace peft_export::plugin

extern "C" PEFT_ML_API void setLoggerFinder(ILoggerFinder* finder) {
    peft_export::plugin::gLoggerFinder.store(finder);
}

extern "C" PEFT_ML_API IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    // The op's own namespace, and the default one: TensorRT's ONNX parser looks a node up by
    // op type, its `plugin_version` attribute (default "1") and its `plugin_namespace`
    // attribute (default ""), and the MultiLoRA node carries no attributes.
    static peft_export::plugin::MultiLoRAPluginCreator sOwn{peft_export::plugin::kMULTILORA_NAMESPACE};
    static peft_export::plugin::MultiLoRAPluginCreator sDefault{""};
    static IPluginCreatorInterface* const kCreators[] = {&sOwn, &sDefault};
    nbCreators = 2;
    return kCreators;
}
