// Error types of the C++ runtime, mirroring the Python layers (BundleError, InferenceError).
#pragma once

#include <stdexcept>
#include <string>

namespace peft_export {

// Base of every user-facing error: the message names the problem and the fix.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A bundle or adapter file on disk is missing, malformed, or does not fit.
class BundleError : public Error {
 public:
  using Error::Error;
};

// A request or adapter the loaded bundle cannot serve.
class InferenceError : public Error {
 public:
  using Error::Error;
};

}  // namespace peft_export
