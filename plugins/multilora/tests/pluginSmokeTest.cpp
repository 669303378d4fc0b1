// Exercises libpeft_multilora.so through TensorRT's interfaces without TensorRT or a GPU:
// the library entry points, names, capabilities, format support, output types, workspace
// sizes and the enqueue shape check. Shape expressions and real execution need TensorRT.
#include "multiLoRAPlugin.h"
#include "peft_multilora.h"

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>

using namespace nvinfer1;

namespace {

int gFailures = 0;

void check(bool ok, char const* what) {
    if (!ok) {
        std::fprintf(stderr, "FAILED: %s\n", what);
        ++gFailures;
    }
}

class CapturingLogger : public ILogger {
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override {
        if (severity == Severity::kERROR) last = msg;
    }
    std::string last;
};

class Finder : public ILoggerFinder {
public:
    explicit Finder(ILogger* logger) : mLogger(logger) {}
    ILogger* findLogger() noexcept override { return mLogger; }

private:
    ILogger* mLogger;
};

Dims dims(std::initializer_list<int64_t> v) {
    Dims d{};
    d.nbDims = static_cast<int32_t>(v.size());
    int i = 0;
    for (int64_t e : v) d.d[i++] = e;
    return d;
}

DynamicPluginTensorDesc desc(Dims d, DataType t) {
    DynamicPluginTensorDesc r{};
    r.desc.dims = d;
    r.desc.type = t;
    r.desc.format = TensorFormat::kLINEAR;
    r.min = d;
    r.opt = d;
    r.max = d;
    return r;
}

}  // namespace

int main() {
    CapturingLogger logger;
    Finder finder(&logger);
    setLoggerFinder(&finder);

    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getCreators(n);
    check(n == 2, "two creators");
    auto* own = static_cast<IPluginCreatorV3One*>(creators[0]);
    auto* fallback = static_cast<IPluginCreatorV3One*>(creators[1]);
    check(std::strcmp(own->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0, "creator kind");
    check(std::strcmp(own->getPluginName(), "MultiLoRA") == 0, "name");
    check(std::strcmp(own->getPluginVersion(), "1") == 0, "version");
    check(std::strcmp(own->getPluginNamespace(), "peft_export") == 0, "namespace");
    check(std::strcmp(fallback->getPluginNamespace(), "") == 0, "default-namespace alias");
    check(own->getFieldNames()->nbFields == 0, "no attributes");

    std::unique_ptr<IPluginV3> plugin(own->createPlugin("node", own->getFieldNames(), TensorRTPhase::kBUILD));
    check(plugin != nullptr, "createPlugin");
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    check(std::strcmp(core->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE") == 0, "core capability");
    check(std::strcmp(build->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0, "build capability");
    check(std::strcmp(runtime->getInterfaceInfo().kind, "PLUGIN_V3ONE_RUNTIME") == 0, "runtime capability");
    check(std::strcmp(core->getPluginNamespace(), "peft_export") == 0, "plugin namespace");
    check(build->getNbOutputs() == 1, "one output");

    int64_t const batch = 4, seq = 7, in = 96, out = 80, r = 16, slots = 5;
    DynamicPluginTensorDesc io[5] = {
        desc(dims({batch, seq, in}), DataType::kHALF), desc(dims({slots, r, in}), DataType::kHALF),
        desc(dims({slots, out, r}), DataType::kHALF), desc(dims({batch}), DataType::kINT64),
        desc(dims({batch, seq, out}), DataType::kHALF)};
    check(build->configurePlugin(io, 4, io + 4, 1) == 0, "configurePlugin");
    for (DataType t : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16}) {
        for (auto& d : io) d.desc.type = t;
        io[3].desc.type = DataType::kINT64;
        for (int pos = 0; pos < 5; ++pos) check(build->supportsFormatCombination(pos, io, 4, 1), "supported combination");
        DataType inTypes[4] = {t, t, t, DataType::kINT64};
        DataType outType{};
        check(build->getOutputDataTypes(&outType, 1, inTypes, 4) == 0 && outType == t, "output type follows x");
    }
    io[0].desc.type = DataType::kINT8;
    check(!build->supportsFormatCombination(0, io, 4, 1), "int8 x refused");
    io[0].desc.type = DataType::kHALF;
    io[1].desc.type = DataType::kFLOAT;
    check(!build->supportsFormatCombination(1, io, 4, 1), "A must follow x");
    io[1].desc.type = DataType::kHALF;
    io[3].desc.type = DataType::kINT32;
    check(!build->supportsFormatCombination(3, io, 4, 1), "int32 ids refused");
    io[3].desc.type = DataType::kINT64;
    io[2].desc.format = TensorFormat::kHWC8;
    check(!build->supportsFormatCombination(2, io, 4, 1), "non-linear format refused");
    io[2].desc.format = TensorFormat::kLINEAR;

    check(build->getWorkspaceSize(io, 4, io + 4, 1) ==
              peft_multilora_workspace_size(batch, seq, in, out, r, slots),
          "workspace size from the C ABI");
    check(runtime->getFieldsToSerialize()->nbFields == 0, "nothing to serialize");

    // A mismatched A bank is refused before any CUDA call, with a logged reason.
    PluginTensorDesc inDesc[4] = {io[0].desc, io[1].desc, io[2].desc, io[3].desc};
    inDesc[1].dims = dims({slots, r, in + 1});
    void const* inputs[4] = {nullptr, nullptr, nullptr, nullptr};
    void* outputs[1] = {nullptr};
    check(runtime->enqueue(inDesc, &io[4].desc, inputs, outputs, nullptr, nullptr) != 0, "shape mismatch refused");
    check(logger.last.find("MultiLoRA plugin") != std::string::npos, "error logged");

    std::unique_ptr<IPluginV3> copy(runtime->attachToContext(nullptr));
    auto* copyCore = static_cast<IPluginV3OneCore*>(copy->getCapabilityInterface(PluginCapabilityType::kCORE));
    check(std::strcmp(copyCore->getPluginName(), "MultiLoRA") == 0, "attachToContext clones");

    if (gFailures == 0) std::printf("plugin smoke test passed\n");
    return gFailures == 0 ? 0 : 1;
}
