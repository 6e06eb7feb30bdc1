// libFuzzer target: the chat-template interpreter. Input: a template source, then (after the first
// NUL byte, if any) the text of a user message. Checked on every input:
//   - loading either succeeds or throws fineserve::Error (never another exception, never a crash);
//   - rendering either succeeds or throws ChatTemplateError, within the step and size limits
//     (small here, so that a hostile template is cut off quickly);
//   - a rendered prompt is no larger than the output limit.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <nlohmann/json.hpp>

#include "server/chat_template.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  const size_t nul = input.find('\0');
  const std::string source = input.substr(0, nul);
  const std::string content = nul == std::string::npos ? "Hello" : input.substr(nul + 1);

  fineserve::ChatTemplateLimits limits;
  limits.max_steps = 20'000;
  limits.max_output_bytes = 64 << 10;
  limits.max_depth = 64;
  std::unique_ptr<fineserve::ChatTemplate> tmpl;
  try {
    tmpl = std::make_unique<fineserve::ChatTemplate>(source, "fuzz", limits);
  } catch (const fineserve::ChatTemplateError&) {
    std::fprintf(stderr, "fuzz_chat_template: a runtime error at load\n");
    std::abort();
  } catch (const fineserve::Error&) {
    return 0;
  }
  nlohmann::ordered_json ctx = {
      {"messages", {{{"role", "system"}, {"content", "Be brief."}}, {{"role", "user"}, {"content", content}},
                    {{"role", "assistant"}, {"content", " ok "}}, {{"role", "user"}, {"content", content}}}},
      {"add_generation_prompt", true}, {"bos_token", "<s>"}, {"eos_token", "</s>"}, {"tools", nullptr}, {"documents", nullptr}};
  try {
    const std::string out = tmpl->render(ctx);
    if (out.size() > limits.max_output_bytes) {
      std::fprintf(stderr, "fuzz_chat_template: output over the limit\n");
      std::abort();
    }
  } catch (const fineserve::ChatTemplateError&) {
  }
  return 0;
}
