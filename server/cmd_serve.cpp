// `fineserve serve`: the HTTP server. The engine that it drives is not built yet; until it is,
// the command says what it would serve and exits non-zero.
#include <cstdio>
#include <memory>

#include "kernels/base.h"
#include "server/commands.h"

namespace fineserve {

void add_serve_command(CLI::App& app) {
  auto model = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand("serve", "Serve a model over HTTP");
  cmd->add_option("--model", *model, "Checkpoint to serve (default: the embedded default model)");
  cmd->callback([model] {
    throw Error("serving is not implemented yet: the inference engine lands with the CPU engine issue; "
                "would serve " + (model->empty() ? std::string("the embedded default model") : *model));
  });
}

}  // namespace fineserve
