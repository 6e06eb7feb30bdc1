// Error handling shared by every layer.
//
// Two kinds of failure, handled differently (DESIGN: Errors):
//  - bad user input (a request, a checkpoint, a flag): throw fineserve::Error with a message that
//    names what was wrong; callers turn it into an HTTP 4xx or a non-zero exit.
//  - a programmer fault (a broken invariant): FS_ASSERT stops the process with file:line.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace fineserve {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void assert_fail(const char* expr, const char* file, int line, const char* msg) {
  std::fprintf(stderr, "%s:%d: internal error: %s%s%s\n", file, line, expr, msg[0] ? ": " : "", msg);
  std::abort();
}

}  // namespace fineserve

#define FS_ASSERT(cond, ...)                                                                 \
  do {                                                                                       \
    if (!(cond)) ::fineserve::assert_fail(#cond, __FILE__, __LINE__, "" __VA_ARGS__);        \
  } while (0)
