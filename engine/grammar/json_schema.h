// JSON Schema -> grammar tree (engine/grammar/regex.h), for constrained decoding.
//
// The output is JSON text that validates against the schema. Whitespace: at each place JSON allows
// it (around structural characters and values) at most `max_whitespace` bytes of space, tab or
// newline; 0 gives compact JSON. A bound keeps a model from padding forever and keeps the
// automaton small (vLLM/xgrammar and llama.cpp bound it too). Object members come in the order
// the schema lists them (as OpenAI's strict mode and Outlines do).
//
// Supported keywords: type (one or a list), properties, required, additionalProperties (false,
// true or a schema; when a schema has "properties" (even empty) and says nothing, extra members
// are not generated, as in OpenAI strict mode), enum, const, items, prefixItems, minItems, maxItems,
// minLength, maxLength, pattern, format (date, time, date-time, uuid, email, ipv4, hostname are
// enforced; others are annotations and ignored, as the spec allows), anyOf, oneOf (generated
// like anyOf), allOf with one subschema, $ref to "#", "#/$defs/..." or "#/definitions/..." (also
// recursive: expanded up to max_ref_depth levels, deeper branches are not generated), nullable,
// minimum / maximum / exclusiveMinimum / exclusiveMaximum for integers, and the annotations
// (title, description, default, examples, $schema, $id, $comment, deprecated, readOnly,
// writeOnly). Any other validation keyword is rejected with fineserve::Error naming it.
//
// A value the schema leaves open ({} or true, "type": "object" without properties, the items of
// an array without "items") is any JSON value nested at most max_any_depth levels deep.
// Numbers: integers have at most 19 digits, fractions 16 and exponents 3.
#pragma once

#include <nlohmann/json.hpp>

#include "engine/grammar/regex.h"

namespace fineserve::grammar {

struct JsonGrammarOptions {
  int max_whitespace = 2;   // per whitespace position; 0 = compact
  int max_any_depth = 3;    // nesting of free-form JSON values
  int max_ref_depth = 3;    // expansions of one $ref inside itself
  int max_schema_depth = 32;  // nesting of the schema document itself
  int max_repeat = 1000;    // largest minLength/maxLength/minItems/maxItems honoured as a count
};

// The schema is an ordered_json so that members keep the order the client wrote them in.
// Throws fineserve::Error for an invalid or unsupported schema (the message names the keyword and
// where it is, as a JSON pointer).
NodePtr json_schema_grammar(const nlohmann::ordered_json& schema, const JsonGrammarOptions& options = {});

// Any JSON value (OpenAI's json_object mode uses an object: any_json_object).
NodePtr any_json_value(const JsonGrammarOptions& options = {});
NodePtr any_json_object(const JsonGrammarOptions& options = {});

}  // namespace fineserve::grammar
