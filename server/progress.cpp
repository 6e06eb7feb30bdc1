#include "server/progress.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>

namespace fineserve {

ProgressBar::ProgressBar(std::string label)
    : label_(std::move(label)), enabled_(::isatty(STDERR_FILENO) != 0), start_(std::chrono::steady_clock::now()) {}

ProgressBar::~ProgressBar() { done(); }

void ProgressBar::update(double fraction, const std::string& detail) {
  if (!enabled_ || finished_) return;
  const auto now = std::chrono::steady_clock::now();
  if (fraction < 1.0 && now - last_draw_ < std::chrono::milliseconds(100)) return;  // ~10 redraws/s
  last_draw_ = now;
  fraction = std::clamp(fraction, 0.0, 1.0);
  constexpr int kWidth = 30;
  const int filled = static_cast<int>(fraction * kWidth);
  std::string bar(static_cast<size_t>(filled), '=');
  if (filled < kWidth) bar += '>';
  bar.resize(kWidth, ' ');
  const double elapsed = std::chrono::duration<double>(now - start_).count();
  std::string d = detail.size() > 50 ? "..." + detail.substr(detail.size() - 47) : detail;
  std::fprintf(stderr, "\r\033[K%s [%s] %3.0f%% %6.1fs %s", label_.c_str(), bar.c_str(), fraction * 100, elapsed,
               d.c_str());
  std::fflush(stderr);
}

void ProgressBar::done() {
  if (!enabled_ || finished_) return;
  finished_ = true;
  std::fprintf(stderr, "\r\033[K");
  std::fflush(stderr);
}

}  // namespace fineserve
