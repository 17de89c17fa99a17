// SPDX-License-Identifier: Apache-2.0
// Shared by the picture examples: the output folder from the command line and a small CSV writer.
#pragma once

#include <cstdio>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

namespace pictures {

/// The folder named on the command line (created if missing); "." without an argument.
inline std::filesystem::path output_folder(int argc, char** argv) {
  std::filesystem::path dir = argc > 1 ? argv[1] : ".";
  std::filesystem::create_directories(dir);
  return dir;
}

/// `prefix` followed by `i` ("h3"): a column name. Built with append, because g++ 12 at -O3 warns
/// (-Wrestrict, a false positive) on `"literal" + std::to_string(i)`.
inline std::string numbered(const char* prefix, long i) {
  std::string s(prefix);
  s.append(std::to_string(i));
  return s;
}

/// A CSV file with a header row; values are written with 9 significant digits.
class csv {
 public:
  csv(const std::filesystem::path& path, const std::vector<std::string>& columns) : path_(path.string()) {
    f_ = std::fopen(path_.c_str(), "w");
    if (!f_) throw std::runtime_error("cannot write " + path_);
    for (std::size_t i = 0; i < columns.size(); ++i) std::fprintf(f_, "%s%s", i ? "," : "", columns[i].c_str());
    std::fputc('\n', f_);
  }
  csv(const csv&) = delete;
  csv& operator=(const csv&) = delete;
  ~csv() {
    if (f_) std::fclose(f_);
  }
  void row(const std::vector<double>& values) {
    for (std::size_t i = 0; i < values.size(); ++i) std::fprintf(f_, "%s%.9g", i ? "," : "", values[i]);
    std::fputc('\n', f_);
  }
  /// Closes the file, reporting a write error, and says where it went.
  void finish() {
    const bool bad = std::ferror(f_) != 0;
    if (std::fclose(f_) != 0 || bad) {
      f_ = nullptr;
      throw std::runtime_error("error writing " + path_);
    }
    f_ = nullptr;
    std::printf("wrote %s\n", path_.c_str());
  }

 private:
  std::string path_;
  std::FILE* f_ = nullptr;
};

}  // namespace pictures
