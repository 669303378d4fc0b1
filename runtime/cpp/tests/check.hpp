// A minimal test harness: CHECK macros and a registry, no dependency beyond the library.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <string>
#include <unistd.h>
#include <vector>

namespace check {

inline int& failures() {
  static int count = 0;
  return count;
}

inline std::vector<std::pair<std::string, std::function<void()>>>& registry() {
  static std::vector<std::pair<std::string, std::function<void()>>> tests;
  return tests;
}

struct Register {
  Register(const char* name, std::function<void()> fn) { registry().emplace_back(name, std::move(fn)); }
};

// Directories made by temp_dir, removed once every test has run.
inline std::vector<std::filesystem::path>& temp_dirs() {
  static std::vector<std::filesystem::path> dirs;
  return dirs;
}

inline int run_all() {
  for (auto& [name, fn] : registry()) {
    try {
      fn();
    } catch (const std::exception& exc) {
      std::cerr << name << ": unexpected exception: " << exc.what() << "\n";
      ++failures();
    }
  }
  for (const auto& dir : temp_dirs()) {
    std::error_code ignored;
    std::filesystem::remove_all(dir, ignored);
  }
  std::cerr << registry().size() << " tests, " << failures() << " failures\n";
  return failures() == 0 ? 0 : 1;
}

inline std::filesystem::path temp_dir(const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() / ("peft_export_cpp_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  temp_dirs().push_back(dir);
  return dir;
}

inline void write_file(const std::filesystem::path& path, const std::string& bytes) {
  std::filesystem::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary) << bytes;
}

}  // namespace check

#define TEST(name)                                         \
  static void name();                                      \
  static const check::Register register_##name(#name, name); \
  static void name()

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::cerr << __FILE__ << ":" << __LINE__ << ": CHECK failed: " #cond "\n";      \
      ++check::failures();                                                            \
    }                                                                                 \
  } while (0)

// Checks that `expr` throws `type` whose message contains `part`.
#define CHECK_THROWS(expr, type, part)                                                      \
  do {                                                                                      \
    try {                                                                                   \
      (void)(expr);                                                                         \
      std::cerr << __FILE__ << ":" << __LINE__ << ": expected " #type " from " #expr "\n";  \
      ++check::failures();                                                                  \
    } catch (const type& exc) {                                                             \
      if (std::string(exc.what()).find(part) == std::string::npos) {                        \
        std::cerr << __FILE__ << ":" << __LINE__ << ": message '" << exc.what()             \
                  << "' lacks '" << (part) << "'\n";                                        \
        ++check::failures();                                                                \
      }                                                                                     \
    }                                                                                       \
  } while (0)
