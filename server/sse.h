// Server-sent events (the WHATWG "text/event-stream" format): writing events, and an incremental
// parser for clients (tests, `fineserve bench serve`).
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace fineserve {

// One event: "data: <data>\n\n" (a data containing newlines becomes several data lines).
std::string sse_event(std::string_view data);
// A comment line, ignored by every SSE client; the server sends one to probe an idle connection.
inline constexpr std::string_view kSseHeartbeat = ": ping\n\n";

struct SseEvent {
  std::string event;  // the "event:" field; empty means "message"
  std::string data;   // "data:" lines joined with '\n'
  std::string id;
};

// Feeds bytes as they arrive; returns the events they complete. Lines may end in LF, CR or CRLF;
// comment lines (":") and unknown fields are skipped, as the standard says.
class SseParser {
 public:
  std::vector<SseEvent> feed(std::string_view bytes);

 private:
  void line(std::string_view l, std::vector<SseEvent>& out);

  std::string buf_;  // an incomplete line
  bool last_was_cr_ = false;
  SseEvent cur_;
  bool has_data_ = false;
};

}  // namespace fineserve
