#!/usr/bin/env python3
"""Writes docs/openapi.json, the OpenAPI 3 document of FineServe's HTTP API.

The server embeds docs/openapi.json at build time and serves it at GET /openapi.json. Edit the
schemas here, then run `python3 scripts/openapi.py > docs/openapi.json`; docs/api.md describes the
same fields in prose, and schemathesis (scripts/schemathesis.sh) checks the server against it.
"""
import json
def obj(props, required=(), extra=True, desc=None):
    o = {"type": "object", "properties": props}
    if required: o["required"] = list(required)
    o["additionalProperties"] = extra
    if desc: o["description"] = desc
    return o
num = lambda d, **k: {"type": "number", "description": d, **k}
integer = lambda d, **k: {"type": "integer", "description": d, **k}
boolean = lambda d: {"type": "boolean", "description": d}
nullable = lambda s: {"anyOf": [s, {"type": "null"}]}
stop = {"description": "up to max_stop_sequences (4) non-empty strings of at most 256 bytes",
        "anyOf": [{"type": "string", "minLength": 1}, {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4}]}
ext = {
  "presence_penalty": num("OpenAI's presence penalty on generated tokens", minimum=-2, maximum=2),
  "frequency_penalty": num("OpenAI's frequency penalty on generated tokens", minimum=-2, maximum=2),
  "logit_bias": {"type": "object", "description": "token id (as a string) -> bias added to its logit, in [-100, 100]",
                 "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}},
  "min_tokens": integer("stop tokens are forbidden until this many tokens were generated; <= the tokens to generate", minimum=0),
  "stop_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}, "description": "token ids that end generation (finish_reason stop)"},
  "ignore_eos": boolean("keep generating past the end-of-sequence token"),
}
tgi_params = obj({
  "max_new_tokens": integer("tokens to generate; prompt + max_new_tokens must fit the context", minimum=1),
  "do_sample": boolean("sample instead of greedy decoding"),
  "temperature": num("> 0", exclusiveMinimum=0),
  "top_k": integer(">= 1", minimum=1),
  "top_p": num("(0, 1]", exclusiveMinimum=0, maximum=1),
  "repetition_penalty": num("> 0 (CTRL rule)", exclusiveMinimum=0),
  "seed": integer("random seed; sequence i of best_of uses seed + i", minimum=0),
  "stop": {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4},
  "details": boolean("return details (finish reason, tokens with logprobs, seed)"),
  "decoder_input_details": boolean("details.prefill: the prompt tokens with their logprobs"),
  "return_full_text": boolean("prepend the prompt to generated_text"),
  "best_of": integer("sampled sequences; the most likely one is returned (needs sampling, not streaming)", minimum=1, maximum=16),
  "top_n_tokens": integer("alternatives per generated token (details.top_tokens)", minimum=0, maximum=20),
  "typical_p": {"type": "null", "description": "not supported"},
  "truncate": {"type": "null", "description": "not supported"},
  "watermark": {"type": "boolean", "enum": [False], "description": "not supported"},
  "grammar": nullable(obj({"type": {"type": "string", "enum": ["json", "regex"]},
                           "value": {"description": "a JSON Schema (json) or a regular expression (regex)"}},
                          ["type", "value"], desc="constrained decoding (docs/structured_output.md)")),
  "adapter_id": {"type": "null", "description": "not supported"},
  **ext})
tgi_req = lambda stream: obj({"inputs": {"type": "string", "minLength": 1}, "parameters": tgi_params,
                              "stream": {"type": "boolean"} if stream is None else {"type": "boolean", "enum": [stream]}}, ["inputs"])
tgi_token = obj({"id": {"type": "integer"}, "text": {"type": "string"}, "logprob": nullable({"type": "number"}),
                 "special": {"type": "boolean"}}, ["id", "text", "logprob"])
tgi_details = obj({"finish_reason": {"type": "string", "enum": ["length", "eos_token", "stop_sequence", "grammar_end"]},
                   "generated_tokens": {"type": "integer"}, "seed": nullable({"type": "integer"}),
                   "input_length": {"type": "integer"},
                   "prefill": {"type": "array", "items": {"$ref": "#/components/schemas/TgiToken"}},
                   "tokens": {"type": "array", "items": {"$ref": "#/components/schemas/TgiToken"}},
                   "top_tokens": {"type": "array", "items": {"type": "array", "items": {"$ref": "#/components/schemas/TgiToken"}}},
                   "best_of_sequences": {"type": "array", "items": {"type": "object"}}},
                  ["finish_reason", "generated_tokens", "seed"])
tgi_resp = obj({"generated_text": {"type": "string"}, "details": {"$ref": "#/components/schemas/TgiDetails"}}, ["generated_text"])
tgi_stream_event = obj({"index": {"type": "integer"}, "token": {"$ref": "#/components/schemas/TgiToken"},
                        "top_tokens": nullable({"type": "array", "items": {"$ref": "#/components/schemas/TgiToken"}}),
                        "generated_text": nullable({"type": "string"}), "details": nullable({"type": "object"})}, ["token"])
openai_common = {
  "model": {"type": "string", "description": "when given, the served model's id (else 404)"},
  "stream": {"type": "boolean"},
  "stream_options": obj({"include_usage": {"type": "boolean"}, "continuous_usage_stats": {"type": "boolean"}}),
  "temperature": num("0 is greedy; default 1", minimum=0, maximum=2),
  "top_p": num("(0, 1]", exclusiveMinimum=0, maximum=1),
  "top_k": integer("-1 or 0: off", minimum=-1),
  "repetition_penalty": num("> 0", exclusiveMinimum=0),
  "seed": integer("choice i uses seed + i", minimum=0),
  "stop": stop,
  "n": integer("choices returned", minimum=1, maximum=16),
  "user": {"type": "string"},
  "response_format": obj({"type": {"type": "string", "enum": ["text", "json_object", "json_schema"]},
                          "json_schema": obj({"name": {"type": "string"}, "schema": {"type": "object"}, "strict": nullable({"type": "boolean"})})},
                         ["type"], desc="structured output by constrained decoding (docs/structured_output.md)"),
  **ext}
ids = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
completion_req = obj({"prompt": {"anyOf": [{"type": "string", "minLength": 1},
                                           {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
                                           ids, {"type": "array", "items": ids, "minItems": 1, "maxItems": 1}]},
                      "max_tokens": integer("default 16; 0 scores the prompt (with echo)", minimum=0),
                      "echo": boolean("prepend the prompt (and, with logprobs, its tokens' logprobs)"),
                      "logprobs": integer("logprob of each token and this many alternatives", minimum=0, maximum=20),
                      "best_of": integer("sequences generated; the n of highest cumulative logprob are returned", minimum=1, maximum=16),
                      "suffix": {"type": "null", "description": "not supported"},
                      **openai_common}, ["prompt"])
message = obj({"role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
               "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": obj({"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}, ["type", "text"])}, {"type": "null"}]},
               "name": {"type": "string"}, "tool_call_id": {"type": "string"},
               "tool_calls": {"type": "array", "items": {"type": "object"}}}, ["role"])
chat_req = obj({"messages": {"type": "array", "items": {"$ref": "#/components/schemas/ChatMessage"}, "minItems": 1},
                "max_tokens": integer("default: the rest of the context", minimum=1),
                "max_completion_tokens": integer("max_tokens' newer name", minimum=1),
                "logprobs": boolean("logprob of each generated token"),
                "top_logprobs": integer("alternatives per token (needs logprobs)", minimum=0, maximum=20),
                "tools": {"type": "array", "items": obj({"type": {"type": "string", "enum": ["function"]},
                                                         "function": obj({"name": {"type": "string"}, "description": {"type": "string"},
                                                                          "parameters": {"type": "object"}}, ["name"])}, ["type", "function"])},
                "tool_choice": {"anyOf": [{"type": "string", "enum": ["none", "auto", "required"]},
                                          obj({"type": {"type": "string", "enum": ["function"]}, "function": obj({"name": {"type": "string"}}, ["name"])}, ["type", "function"])]},
                "parallel_tool_calls": {"type": "boolean"},
                **openai_common}, ["messages"])
usage = obj({"prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}},
            ["prompt_tokens", "completion_tokens", "total_tokens"])
legacy_lp = nullable(obj({"tokens": {"type": "array", "items": {"type": "string"}},
                          "token_logprobs": {"type": "array", "items": nullable({"type": "number"})},
                          "top_logprobs": {"type": "array", "items": nullable({"type": "object", "additionalProperties": {"type": "number"}})},
                          "text_offset": {"type": "array", "items": {"type": "integer"}}},
                         ["tokens", "token_logprobs", "top_logprobs", "text_offset"]))
finish = nullable({"type": "string", "enum": ["stop", "length", "tool_calls"]})
completion_resp = obj({"id": {"type": "string"}, "object": {"type": "string", "enum": ["text_completion"]},
                       "created": {"type": "integer"}, "model": {"type": "string"},
                       "choices": {"type": "array", "items": obj({"index": {"type": "integer"}, "text": {"type": "string"},
                                                                   "logprobs": {"$ref": "#/components/schemas/CompletionLogprobs"},
                                                                   "finish_reason": finish}, ["index", "text", "logprobs", "finish_reason"])},
                       "usage": {"$ref": "#/components/schemas/Usage"}}, ["id", "object", "created", "model", "choices"])
chat_lp_entry = obj({"token": {"type": "string"}, "logprob": {"type": "number"}, "bytes": {"type": "array", "items": {"type": "integer"}},
                     "top_logprobs": {"type": "array", "items": obj({"token": {"type": "string"}, "logprob": {"type": "number"}, "bytes": {"type": "array", "items": {"type": "integer"}}})}},
                    ["token", "logprob"])
chat_lp = nullable(obj({"content": {"type": "array", "items": chat_lp_entry}}, ["content"]))
chat_resp = obj({"id": {"type": "string"}, "object": {"type": "string", "enum": ["chat.completion"]}, "created": {"type": "integer"},
                 "model": {"type": "string"},
                 "choices": {"type": "array", "items": obj({"index": {"type": "integer"},
                                                             "message": obj({"role": {"type": "string"}, "content": nullable({"type": "string"}),
                                                                             "tool_calls": {"type": "array", "items": {"type": "object"}}}, ["role", "content"]),
                                                             "logprobs": {"$ref": "#/components/schemas/ChatLogprobs"},
                                                             "finish_reason": finish}, ["index", "message", "finish_reason"])},
                 "usage": {"$ref": "#/components/schemas/Usage"}}, ["id", "object", "created", "model", "choices", "usage"])
tgi_error = obj({"error": {"type": "string"}, "error_type": {"type": "string"}}, ["error", "error_type"])
openai_error = obj({"error": obj({"message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": "null"},
                                  "code": {"type": "integer"}}, ["message", "type", "code"])}, ["error"])
def errors(kind, codes):
    ref = {"$ref": "#/components/schemas/" + kind}
    d = {"400": "not JSON, not an object, or a field of the wrong type", "404": "the model named is not served",
         "413": "the body is larger than max_body_bytes", "422": "a value out of range or not supported",
         "429": "too many requests are waiting", "499": "cancelled", "500": "internal error",
         "503": "loading, or shutting down", "504": "the request ran past the server's timeout",
         "401": "an API key is required (Authorization: Bearer KEY)", "408": "the request did not arrive in time",
         "415": "the body is not declared application/json"}
    # 400 and 413 may come from the HTTP layer before the route is known (a malformed request
    # line, a body over the limit): then the error has either shape.
    either = {"anyOf": [{"$ref": "#/components/schemas/TgiError"}, {"$ref": "#/components/schemas/OpenAiError"}]}
    return {c: {"description": d[c], "content": {"application/json": {"schema": either if c in ("400", "413") else ref}}}
            for c in codes}
gen_codes = ["400", "401", "404", "408", "413", "415", "422", "429", "500", "503", "504"]
def sse_event(desc):
    # One server-sent event as clients parse it: its data line(s) and event name.
    return obj({"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}}, ["data"], desc=desc)
def post(summary, req_ref, ok, kind, codes=gen_codes, sse=None):
    content = {"application/json": {"schema": ok}}
    if sse: content["text/event-stream"] = {"schema": sse_event(sse)}
    return {"post": {"summary": summary, "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": req_ref}}}},
                     "responses": {"200": {"description": "the generation", "content": content}, **errors(kind, codes)}}}
def get(summary, schema, codes=(), ctype="application/json", kind="TgiError"):
    return {"get": {"summary": summary, "responses": {"200": {"description": "ok", "content": {ctype: {"schema": schema}}}, **errors(kind, list(codes))}}}
doc = {
 "openapi": "3.1.0",
 "info": {"title": "FineServe HTTP API", "version": "0.1.0",
          "description": "TGI and OpenAI-compatible generation routes of `fineserve serve`. docs/api.md describes every field. Unknown request fields are ignored (logged once per name)."},
 "paths": {
  "/": post("TGI root route: /generate, or /generate_stream when stream is true", "#/components/schemas/TgiRootRequest",
            {"type": "array", "items": {"$ref": "#/components/schemas/TgiResponse"}, "minItems": 1, "maxItems": 1},
            "TgiError", sse="TGI stream events (TgiStreamEvent), one per token"),
  "/generate": post("TGI: one JSON response", "#/components/schemas/TgiGenerateRequest", {"$ref": "#/components/schemas/TgiResponse"}, "TgiError"),
  "/generate_stream": {"post": {"summary": "TGI: server-sent events, one per token",
       "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TgiStreamRequest"}}}},
       "responses": {"200": {"description": "SSE events; each data line is a TgiStreamEvent", "content": {"text/event-stream": {"schema": sse_event("a TgiStreamEvent as JSON")}}}, **errors("TgiError", gen_codes)}}},
  "/v1/completions": post("OpenAI completions", "#/components/schemas/CompletionRequest", {"$ref": "#/components/schemas/CompletionResponse"},
                          "OpenAiError", sse="text_completion chunks, then data: [DONE]"),
  "/v1/chat/completions": post("OpenAI chat completions", "#/components/schemas/ChatCompletionRequest", {"$ref": "#/components/schemas/ChatCompletionResponse"},
                               "OpenAiError", sse="chat.completion.chunk chunks, then data: [DONE]"),
  "/tokenize": {"post": {"summary": "vLLM's tokenize: a prompt, or chat messages rendered with the chat template",
       "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TokenizeRequest"}}}},
       "responses": {"200": {"description": "the token ids", "content": {"application/json": {"schema": obj({"count": {"type": "integer"}, "max_model_len": {"type": "integer"}, "tokens": {"type": "array", "items": {"type": "integer"}}}, ["count", "max_model_len", "tokens"])}}},
                     **errors("OpenAiError", ["400", "401", "404", "408", "413", "415", "422", "500", "503"])}}},
  "/detokenize": {"post": {"summary": "vLLM's detokenize",
       "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/DetokenizeRequest"}}}},
       "responses": {"200": {"description": "the text", "content": {"application/json": {"schema": obj({"prompt": {"type": "string"}}, ["prompt"])}}},
                     **errors("OpenAiError", ["400", "401", "408", "413", "415", "422", "500", "503"])}}},
  "/v1/models": get("the served model", obj({"object": {"type": "string"}, "data": {"type": "array", "items": obj({"id": {"type": "string"}, "object": {"type": "string"}, "created": {"type": "integer"}, "owned_by": {"type": "string"}, "max_model_len": {"type": "integer"}}, ["id", "object"])}}, ["object", "data"]), ["401", "503"], kind="OpenAiError"),
  "/health": get("200 while the process runs", obj({"status": {"type": "string"}}, ["status"])),
  "/ready": {"get": {"summary": "200 when the model is loaded and the engine runs", "responses": {
       "200": {"description": "ready", "content": {"application/json": {"schema": obj({"status": {"type": "string"}}, ["status"])}}},
       "503": {"description": "loading or draining", "content": {"application/json": {"schema": obj({"status": {"type": "string"}}, ["status"])}}}}}},
  "/info": get("model, device and limits", obj({"model_id": {"type": "string"}, "max_input_tokens": {"type": "integer"}, "max_total_tokens": {"type": "integer"},
                                                "max_best_of": {"type": "integer"}, "max_top_n_tokens": {"type": "integer"}, "max_stop_sequences": {"type": "integer"},
                                                "vocab_size": {"type": "integer"}}, ["model_id", "max_input_tokens", "max_total_tokens"]), ["401", "503"]),
  "/metrics": get("Prometheus text format", {"type": "string"}, ctype="text/plain"),
  "/openapi.json": get("this document", {"type": "object"}),
 },
 "components": {"schemas": {
  "TgiParameters": tgi_params, "TgiGenerateRequest": tgi_req(False), "TgiStreamRequest": tgi_req(True), "TgiRootRequest": tgi_req(None),
  "TgiToken": tgi_token, "TgiDetails": tgi_details, "TgiResponse": tgi_resp, "TgiStreamEvent": tgi_stream_event,
  "CompletionRequest": completion_req, "ChatMessage": message, "ChatCompletionRequest": chat_req,
  "Usage": usage, "CompletionLogprobs": legacy_lp, "ChatLogprobs": chat_lp,
  "CompletionResponse": completion_resp, "ChatCompletionResponse": chat_resp,
  "TokenizeRequest": obj({"model": {"type": "string"}, "prompt": {"type": "string"}, "messages": {"type": "array", "items": {"$ref": "#/components/schemas/ChatMessage"}, "minItems": 1},
                          "add_special_tokens": {"type": "boolean"}, "add_generation_prompt": {"type": "boolean"}},
                         desc="exactly one of prompt and messages") | {"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]},
  "DetokenizeRequest": obj({"model": {"type": "string"}, "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}}}, ["tokens"]),
  "TgiError": tgi_error, "OpenAiError": openai_error}}}
print(json.dumps(doc, indent=2))
