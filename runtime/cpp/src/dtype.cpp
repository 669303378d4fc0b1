#include "peft_export/dtype.hpp"

#include <cstring>
#include <string>

#include "peft_export/errors.hpp"

namespace peft_export {
namespace {

struct DTypeInfo {
  DType dtype;
  const char* manifest;
  const char* safetensors;
  std::size_t size;
};

constexpr DTypeInfo kDTypes[] = {
    {DType::kFloat32, "float32", "F32", 4}, {DType::kFloat16, "float16", "F16", 2},
    {DType::kBFloat16, "bfloat16", "BF16", 2}, {DType::kFloat64, "float64", "F64", 8},
    {DType::kInt64, "int64", "I64", 8},     {DType::kInt32, "int32", "I32", 4},
    {DType::kInt16, "int16", "I16", 2},     {DType::kInt8, "int8", "I8", 1},
    {DType::kUInt8, "uint8", "U8", 1},      {DType::kBool, "bool", "BOOL", 1},
};

const DTypeInfo& info(DType dtype) {
  for (const auto& entry : kDTypes) {
    if (entry.dtype == dtype) return entry;
  }
  throw BundleError("unknown dtype");
}

std::uint32_t float_bits(float value) {
  std::uint32_t bits = 0;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

float bits_float(std::uint32_t bits) {
  float value = 0;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

}  // namespace

std::size_t dtype_size(DType dtype) { return info(dtype).size; }
const char* dtype_name(DType dtype) { return info(dtype).manifest; }

DType dtype_from_manifest(const std::string& name) {
  for (const auto& entry : kDTypes) {
    if (name == entry.manifest) return entry.dtype;
  }
  throw BundleError("unsupported dtype '" + name + "'");
}

DType dtype_from_safetensors(const std::string& name) {
  for (const auto& entry : kDTypes) {
    if (name == entry.safetensors) return entry.dtype;
  }
  throw BundleError("unsupported safetensors dtype '" + name + "'");
}

float half_to_float(std::uint16_t bits) {
  std::uint32_t sign = static_cast<std::uint32_t>(bits & 0x8000u) << 16;
  std::uint32_t exponent = (bits >> 10) & 0x1fu;
  std::uint32_t mantissa = bits & 0x3ffu;
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    // Subnormal (or zero): value = mantissa * 2^-24, exact in float.
    float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
    return sign ? -magnitude : magnitude;
  }
  return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

float bfloat16_to_float(std::uint16_t bits) {
  return bits_float(static_cast<std::uint32_t>(bits) << 16);
}

std::uint16_t float_to_bfloat16(float value) {
  std::uint32_t bits = float_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x40u);
  std::uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>((bits + rounding) >> 16);
}

std::uint16_t float_to_half(float value) {
  std::uint32_t bits = float_bits(value);
  auto sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  std::uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);
  if (magnitude >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // overflow
  if (magnitude < 0x38800000u) {
    // Result is subnormal or zero: round magnitude * 2^24 to nearest even integer.
    float scaled = bits_float(magnitude) * 16777216.0f;
    auto whole = static_cast<std::uint32_t>(scaled);
    float rest = scaled - static_cast<float>(whole);
    if (rest > 0.5f || (rest == 0.5f && (whole & 1u))) ++whole;
    return static_cast<std::uint16_t>(sign | whole);
  }
  std::uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
  return static_cast<std::uint16_t>(sign | ((rounded - (112u << 23)) >> 13));
}

void to_float(DType dtype, const void* src, std::size_t count, float* dst) {
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(dst, src, count * sizeof(float));
      return;
    case DType::kFloat16: {
      const auto* in = static_cast<const std::uint16_t*>(src);
      for (std::size_t i = 0; i < count; ++i) dst[i] = half_to_float(in[i]);
      return;
    }
    case DType::kBFloat16: {
      const auto* in = static_cast<const std::uint16_t*>(src);
      for (std::size_t i = 0; i < count; ++i) dst[i] = bfloat16_to_float(in[i]);
      return;
    }
    default:
      throw InferenceError(std::string("cannot read ") + dtype_name(dtype) + " as float");
  }
}

void from_float(DType dtype, const float* src, std::size_t count, void* dst) {
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(dst, src, count * sizeof(float));
      return;
    case DType::kFloat16: {
      auto* out = static_cast<std::uint16_t*>(dst);
      for (std::size_t i = 0; i < count; ++i) out[i] = float_to_half(src[i]);
      return;
    }
    case DType::kBFloat16: {
      auto* out = static_cast<std::uint16_t*>(dst);
      for (std::size_t i = 0; i < count; ++i) out[i] = float_to_bfloat16(src[i]);
      return;
    }
    default:
      throw InferenceError(std::string("cannot write float as ") + dtype_name(dtype));
  }
}

std::int64_t element_count(const std::vector<std::int64_t>& shape) {
  std::int64_t count = 1;
  for (std::int64_t dim : shape) {
    if (dim < 0 || __builtin_mul_overflow(count, dim, &count)) {
      std::string text;
      for (std::int64_t d : shape) text += (text.empty() ? "" : ", ") + std::to_string(d);
      throw InferenceError("a tensor of shape [" + text + "] has no valid size; check the " +
                           "request's sizes and the bundle's manifest");
    }
  }
  return count;
}

}  // namespace peft_export
