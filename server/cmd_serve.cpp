// `fineserve serve`: the HTTP server (docs/api.md). Defaults come from configs/server.json (or
// --config FILE); flags override them. SIGTERM / SIGINT drain: /ready turns 503, new requests get
// 503, requests in flight finish within --drain-timeout, and the process exits 0.
#include <pthread.h>
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <filesystem>
#include <memory>
#include <optional>

#include <spdlog/spdlog.h>

#include "configs/server_env.h"
#include "engine/tp_launch.h"
#include "kernels/base.h"
#include "kernels/cpu/omp_threads.h"
#include "quant/gguf_convert.h"
#include "server/commands.h"
#include "server/serve.h"

namespace fineserve {

namespace {
constexpr const char* kDefaultConfig = "configs/server.json";
}

void add_serve_command(CLI::App& app) {
  struct Flags {
    std::string config = kDefaultConfig;
    ServeOptions o = default_serve_options();
    int port = 0;
    int rank = -1;        // tensor parallelism: -1 = not given (rank 0, spawning the others)
    int local_rank = -1;  // the CUDA device of this rank; -1 = the rank
    bool no_prefix_caching = false;
    bool no_prompt_special_tokens = false;
    bool vllm_metrics = false;
    bool no_access_log = false;
    std::string api_key;
  };
  auto f = std::make_shared<Flags>();
  CLI::App* cmd = app.add_subcommand("serve", "Serve a model over HTTP (TGI and OpenAI-compatible routes)");
  auto* config = cmd->add_option("--config", f->config, "Server defaults (JSON); flags override them")->capture_default_str();
  cmd->add_option("--model", f->o.model, "Checkpoint to serve (dense or FineQuant directory, or a llama.cpp .gguf file)");
  auto* name = cmd->add_option("--served-model-name", f->o.served_model_name, "Model id for /v1 routes (default: the checkpoint folder's name)");
  auto* device = cmd->add_option("--device", f->o.device, kDeviceHelp);
  auto* host = cmd->add_option("--host", f->o.http.host, "Address to listen on (0.0.0.0: every interface)");
  auto* port = cmd->add_option("--port", f->port, "Port to listen on (0: any free port)")->check(CLI::Range(0, 65535));
  auto* mbt = cmd->add_option("--max-batch-tokens", f->o.engine.max_batch_tokens, "Tokens per engine step (prefill chunk + decodes)")->check(CLI::PositiveNumber);
  auto* seqs = cmd->add_option("--max-seqs", f->o.engine.max_seqs, "Sequences per engine step")->check(CLI::PositiveNumber);
  auto* kv = cmd->add_option("--kv-cache-mb", f->o.kv_cache_mb, "KV-cache budget in MiB")->check(CLI::PositiveNumber);
  auto* queue = cmd->add_option("--max-queue", f->o.loop.max_queue, "Requests that may wait for a batch slot; more get 429")->check(CLI::PositiveNumber);
  auto* timeout = cmd->add_option("--request-timeout", f->o.loop.request_timeout_s, "Seconds a request may take (0: no limit)")->check(CLI::NonNegativeNumber);
  auto* drain = cmd->add_option("--drain-timeout", f->o.drain_timeout_s, "Seconds in-flight requests get to finish on SIGTERM")->check(CLI::NonNegativeNumber);
  auto* chat_template = cmd->add_option("--chat-template", f->o.chat_template, "Jinja chat template file for /v1/chat/completions (default: the checkpoint's, else ChatML)");
  auto* body = cmd->add_option("--max-body-bytes", f->o.http.max_body_bytes, "Largest request body; larger ones get 413")->check(CLI::PositiveNumber);
  cmd->add_flag("--no-prefix-caching", f->no_prefix_caching, "Turn off automatic prefix caching (reuse of the KV blocks of shared prompt prefixes)");
  auto* max_conn = cmd->add_option("--max-connections", f->o.http.max_connections, "Open client connections; at the limit the longest-waiting idle or slow one is closed")->check(CLI::PositiveNumber);
  auto* keepalive = cmd->add_option("--keepalive-timeout", f->o.http.keepalive_timeout_s, "Seconds a connection may sit idle before (or between) requests")->check(CLI::PositiveNumber);
  auto* header_to = cmd->add_option("--header-timeout", f->o.http.header_timeout_s, "Seconds a request's line and headers may take to arrive in full (then 408)")->check(CLI::PositiveNumber);
  auto* body_to = cmd->add_option("--body-timeout", f->o.http.body_timeout_s, "Seconds a request's body may take to arrive in full (then 408)")->check(CLI::PositiveNumber);
  cmd->add_flag("--no-prompt-special-tokens", f->no_prompt_special_tokens,
                "Tokenize special-token text in raw prompts (/generate, /v1/completions) as plain text (chat content always is)");
  cmd->add_option("--api-key", f->api_key, "Require 'Authorization: Bearer KEY' on every route but /health, /ready, /metrics (also FINESERVE_API_KEY)");
  auto* key_file = cmd->add_option("--api-key-file", f->o.api_key_file, "Read the API key from this file (its first line)");
  auto* cors = cmd->add_option("--cors-allow-origin", f->o.http.cors_allow_origin, "Send CORS headers for this origin ('*': any); off by default");
  cmd->add_flag("--vllm-metrics", f->vllm_metrics, "Also expose /metrics under vLLM's names (vllm:num_requests_running, ...)");
  cmd->add_flag("--no-access-log", f->no_access_log, "Do not log one JSON line per request");

  cmd->add_option("--tp", f->o.tp, "Tensor-parallel ranks (cpu: threads of this process; cuda: one process per GPU)")
      ->check(CLI::Range(1, 1024))
      ->envname("FINESERVE_TP");
  cmd->add_option("--rank", f->rank, "This process's tensor-parallel rank (multi-process groups; without it, rank 0 spawns ranks 1..N-1 on this node)")
      ->check(CLI::NonNegativeNumber)
      ->envname("FINESERVE_RANK");
  cmd->add_option("--coordinator", f->o.coordinator, "HOST:PORT of rank 0's bootstrap/control listener (multi-process groups)")
      ->envname("FINESERVE_COORDINATOR");
  cmd->add_option("--local-rank", f->local_rank, "CUDA device of this rank (default: the rank)")
      ->check(CLI::NonNegativeNumber)
      ->envname("FINESERVE_LOCAL_RANK");
  cmd->add_option("--tp-timeout", f->o.tp_timeout_s, "Seconds the tensor-parallel bootstrap or a collective may wait for the other ranks")
      ->check(CLI::PositiveNumber);

  cmd->callback([f, config, name, device, host, port, mbt, seqs, kv, queue, timeout, drain, body, chat_template, max_conn,
                 keepalive, header_to, body_to, key_file, cors] {
    if (f->o.model.empty())
      throw Error("no --model given: pass --model CHECKPOINT_DIR or FILE.gguf (scripts/serve.sh fetches and "
                  "serves the embedded default model, SmolLM2-135M-Instruct int4)");
    // The config first, then every flag the user gave on top of it.
    const ServeOptions flags = f->o;
    ServeOptions o = default_serve_options();
    // A .gguf file: its FineQuant conversion, made on a short-lived thread so that its OpenMP pool
    // does not outlive it (kernels/cpu/omp_threads.h).
    cpu::run_on_short_lived_thread([&] { o.model = quant::model_dir_for(flags.model).string(); });
    if (config->count() > 0 || std::filesystem::exists(f->config)) load_server_config(f->config, o);
    if (name->count()) o.served_model_name = flags.served_model_name;
    if (device->count()) o.device = flags.device;
    if (host->count()) o.http.host = flags.http.host;
    if (port->count()) o.http.port = f->port;
    if (mbt->count()) o.engine.max_batch_tokens = flags.engine.max_batch_tokens;
    if (seqs->count()) o.engine.max_seqs = flags.engine.max_seqs;
    if (kv->count()) o.kv_cache_mb = flags.kv_cache_mb;
    if (queue->count()) o.loop.max_queue = flags.loop.max_queue;
    if (timeout->count()) o.loop.request_timeout_s = flags.loop.request_timeout_s;
    if (drain->count()) o.drain_timeout_s = flags.drain_timeout_s;
    if (body->count()) o.http.max_body_bytes = flags.http.max_body_bytes;
    if (chat_template->count()) o.chat_template = flags.chat_template;
    if (f->no_prefix_caching) o.engine.prefix_caching = false;
    if (max_conn->count()) o.http.max_connections = flags.http.max_connections;
    if (keepalive->count()) o.http.keepalive_timeout_s = flags.http.keepalive_timeout_s;
    if (header_to->count()) o.http.header_timeout_s = flags.http.header_timeout_s;
    if (body_to->count()) o.http.body_timeout_s = flags.http.body_timeout_s;
    if (f->no_prompt_special_tokens) o.http.prompt_special_tokens = false;
    if (key_file->count()) o.api_key_file = flags.api_key_file;
    if (cors->count()) o.http.cors_allow_origin = flags.http.cors_allow_origin;
    if (f->vllm_metrics) o.vllm_metrics = true;
    if (f->no_access_log) o.http.access_log = false;
    // The key: --api-key first, then FINESERVE_API_KEY (configs/server_env.h), else the key file
    // (flag or config).
    if (!f->api_key.empty()) {
      o.http.api_key = f->api_key;
    } else if (std::optional<std::string> key = api_key_from_env()) {
      o.http.api_key = *key;
    } else {
      resolve_api_key(o);
    }
    o.tp = flags.tp;
    o.coordinator = flags.coordinator;
    o.tp_timeout_s = flags.tp_timeout_s;

    // Tensor parallelism across processes: ranks > 0 run no server, only their shard.
    if (f->rank >= 0 || !o.coordinator.empty()) {
      if (o.tp < 2) throw Error("--rank / --coordinator need --tp N with N >= 2");
      if (o.device == "cpu")
        throw Error("multi-process tensor parallelism needs --device cuda (NCCL); on the CPU, --tp N runs the "
                    "ranks as threads of one process (drop --rank / --coordinator)");
      if (f->rank >= o.tp) throw Error("--rank " + std::to_string(f->rank) + " is outside --tp " + std::to_string(o.tp));
    }
    // CUDA tensor parallelism: rank r runs on GPU --local-rank, by default GPU r.
    const DeviceSpec spec = parse_device(o.device);
    if (o.tp > 1 && spec.cuda) {
      if (spec.explicit_index)
        throw Error("--device " + o.device + " with --tp " + std::to_string(o.tp) +
                    ": every rank picks its own GPU (--local-rank, by default its rank); pass --device cuda");
      if (f->local_rank >= 0 && f->rank < 0)
        throw Error("--local-rank applies to a rank started with --rank; rank 0 spawning the group puts rank r on "
                    "GPU r");
    }
    if (f->rank > 0) {
      TpProcessOptions p;
      p.world = o.tp;
      p.rank = f->rank;
      p.coordinator = o.coordinator;
      p.device_index = f->local_rank >= 0 ? f->local_rank : f->rank;
      p.collective_timeout = std::chrono::milliseconds(static_cast<int64_t>(o.tp_timeout_s * 1000));
      p.net.connect_timeout = p.collective_timeout;
      const std::string dev = "cuda:" + std::to_string(p.device_index);
      p.make_backend = [dev] { return make_backend(dev); };
      spdlog::info("tensor-parallel rank {} of {}: joining {}", p.rank, p.world, p.coordinator);
      run_tp_worker_process(o.model, p);
      spdlog::info("tensor-parallel rank {}: rank 0 shut the group down; exiting", p.rank);
      return;
    }
    if (f->rank == 0) {
      o.spawn_tp_ranks = false;  // the other ranks are started separately
      if (f->local_rank >= 0) o.device = "cuda:" + std::to_string(f->local_rank);
    }

    // Signals are taken synchronously by this thread (sigwait) rather than by a handler: block
    // them before any thread starts so that every thread inherits the mask. A client that goes
    // away must not kill the process either (writes to its socket fail with EPIPE instead).
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGINT);
    pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
    signal(SIGPIPE, SIG_IGN);

    ServingStack stack(o);
    spdlog::info("listening on http://{}:{} (/ready turns 200 once the model is loaded)", o.http.host, stack.port());
    stack.load();
    const EngineStats s = stack.loop()->stats();
    spdlog::info("ready: {} on {}; max_seqs {}, max_batch_tokens {}, {} KV blocks", o.model, o.device,
                 o.engine.max_seqs, o.engine.max_batch_tokens, s.total_blocks);

    int sig = 0;
    sigwait(&stop_signals, &sig);
    spdlog::info("{}: draining (up to {} s)", sig == SIGTERM ? "SIGTERM" : "SIGINT", o.drain_timeout_s);
    // The bound a supervisor can rely on (docs/deploy.md: terminationGracePeriodSeconds): the
    // process is gone drain_timeout_s + 1 s after the signal. The orderly path below ends well
    // within it; should anything hang (an engine step that does not return), this ends it.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(o.drain_timeout_s + 0.9);
    std::thread([deadline] {
      std::this_thread::sleep_until(deadline);
      spdlog::critical("shutdown did not finish within --drain-timeout + 1 s; exiting now");
      spdlog::shutdown();
      std::_Exit(1);
    }).detach();
    const bool clean = stack.drain();
    stack.stop();
    spdlog::info(clean ? "drained; exiting" : "drain timeout: requests still in flight were ended; exiting");

  });
}

}  // namespace fineserve
