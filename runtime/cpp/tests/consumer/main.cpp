// Links against the installed runtime and checks a manifest parses (no bundle needed).
#include <iostream>

#include "peft_export/runtime.hpp"

int main() {
  try {
    peft_export::parse_manifest("{\"schema_version\": 9}");
  } catch (const peft_export::BundleError& exc) {
    std::cout << "refused as expected: " << exc.what() << "\n";
    return 0;
  }
  return 1;
}
