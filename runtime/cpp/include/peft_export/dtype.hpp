// Element types shared by the manifest, safetensors files and backends.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace peft_export {

enum class DType { kFloat32, kFloat16, kBFloat16, kFloat64, kInt64, kInt32, kInt16, kInt8, kUInt8, kBool };

std::size_t dtype_size(DType dtype);
// Manifest spelling ("float32", "int64", ...); throws BundleError for unknown names.
DType dtype_from_manifest(const std::string& name);
// safetensors spelling ("F32", "I64", ...); throws BundleError for unknown names.
DType dtype_from_safetensors(const std::string& name);
const char* dtype_name(DType dtype);

// Scalar conversions for logits and adapter math; bit-exact with numpy/torch rounding.
float half_to_float(std::uint16_t bits);
float bfloat16_to_float(std::uint16_t bits);
std::uint16_t float_to_half(float value);
std::uint16_t float_to_bfloat16(float value);

// Converts `count` elements of `dtype` at `src` to float.
void to_float(DType dtype, const void* src, std::size_t count, float* dst);
// Writes `count` floats into `dst` as `dtype` (floating types only).
void from_float(DType dtype, const float* src, std::size_t count, void* dst);

// Product of the dimensions; InferenceError when one is negative or the product overflows
// (sizes multiply manifest and request values: never trusted to fit).
std::int64_t element_count(const std::vector<std::int64_t>& shape);

}  // namespace peft_export
