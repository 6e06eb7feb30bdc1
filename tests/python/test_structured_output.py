"""Structured output and tools with the OpenAI Python client (from PyPI) against a live `fineserve serve`.

Outputs are validated with the `jsonschema` library, not with FineServe's own grammar engine.
Run by tests/python/run_structured_output.sh, which starts the server and sets FINESERVE_URL and
FINESERVE_MODEL.
"""
import json
import os
import re
import unittest
import urllib.request

import jsonschema
import openai

BASE_URL = os.environ["FINESERVE_URL"]
MODEL = os.environ["FINESERVE_MODEL"]

# Small enough for the golden model's 128-token context, and still with $ref, anyOf, pattern,
# enum, integer bounds and array bounds.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        "home": {"$ref": "#/$defs/home"},
        "nick": {"anyOf": [{"type": "string", "maxLength": 4}, {"type": "null"}]},
    },
    "required": ["name", "age", "tags", "home", "nick"],
    "additionalProperties": False,
    "$defs": {
        "home": {
            "type": "object",
            "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["zip"],
            "additionalProperties": False,
        }
    },
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


class StructuredOutputTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.client = openai.OpenAI(base_url=BASE_URL + "/v1", api_key="unused", max_retries=0, timeout=300)

    def test_json_schema_outputs_validate(self):
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}}
        for seed in range(4):
            r = self.client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Make up a person."}], 
                temperature=1.0, seed=seed, response_format=fmt)
            self.assertEqual(r.choices[0].finish_reason, "stop", r.choices[0].message.content)
            jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
        r = self.client.completions.create(model=MODEL, prompt="{", max_tokens=120, seed=1,
                                           extra_body={"response_format": fmt})
        self.assertEqual(r.choices[0].finish_reason, "stop", r.choices[0].text)
        jsonschema.validate(json.loads(r.choices[0].text), PERSON)

    def test_json_object(self):
        r = self.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "JSON please"}], temperature=0.7, seed=5,
            response_format={"type": "json_object"})
        if r.choices[0].finish_reason == "stop":
            self.assertIsInstance(json.loads(r.choices[0].message.content), dict)

    def test_unsupported_keyword_is_422(self):
        bad = {"type": "object", "properties": {"a": {"type": "string", "not": {"const": "x"}}}}
        with self.assertRaises(openai.UnprocessableEntityError) as e:
            self.client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=5,
                response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": bad}})
        self.assertIn("'not'", str(e.exception))

    def test_tgi_regex_grammar(self):
        body = json.dumps({"inputs": "Code:", "parameters": {"max_new_tokens": 30, "do_sample": True, "seed": 3,
                                                             "grammar": {"type": "regex", "value": "[A-Z]{3}-[0-9]{3}"}}})
        req = urllib.request.Request(BASE_URL + "/generate", data=body.encode(), headers={"Content-Type": "application/json"})
        text = json.loads(urllib.request.urlopen(req, timeout=300).read())["generated_text"]
        self.assertRegex(text, re.compile(r"\A[A-Z]{3}-[0-9]{3}\Z"))

    def test_tools_round_trip(self):
        messages = [{"role": "user", "content": "What is the weather in Paris?"}]
        r = self.client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required",
                                                parallel_tool_calls=False, max_tokens=90, temperature=0)
        choice = r.choices[0]
        self.assertEqual(choice.finish_reason, "tool_calls")
        self.assertEqual(len(choice.message.tool_calls), 1)
        call = choice.message.tool_calls[0]
        self.assertEqual(call.type, "function")
        self.assertEqual(call.function.name, "get_weather")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

        # Streaming deltas reassemble to the same call (greedy decoding).
        stream = self.client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER],
                                                     tool_choice="required", parallel_tool_calls=False, max_tokens=90,
                                                     temperature=0, stream=True)
        # OpenAI's shape: the call's first delta has its index, id, type and name; then its
        # arguments come in fragments as they are generated.
        deltas, finish = [], None
        for chunk in stream:
            if not chunk.choices:
                continue
            deltas += chunk.choices[0].delta.tool_calls or []
            finish = chunk.choices[0].finish_reason or finish
        self.assertEqual(finish, "tool_calls")
        self.assertGreater(len(deltas), 2)
        first = deltas[0]
        self.assertEqual((first.index, first.type, first.function.name), (0, "function", call.function.name))
        self.assertTrue(first.id.startswith("call_"))
        self.assertTrue(all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:]))
        fragments = [d.function.arguments for d in deltas if d.function.arguments]
        self.assertGreater(len(fragments), 1)
        self.assertEqual("".join(fragments), call.function.arguments)

        # The named form, then the tool's answer goes back and the model replies in text.
        named = self.client.chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER], max_tokens=90, temperature=0,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        self.assertEqual(named.choices[0].message.tool_calls[0].function.name, "get_weather")
        messages.append(choice.message.model_dump(exclude_none=True))
        messages.append({"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"})
        answer = self.client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                                     max_tokens=8, temperature=0)
        self.assertIsNone(answer.choices[0].message.tool_calls)
        self.assertIsInstance(answer.choices[0].message.content, str)


if __name__ == "__main__":
    unittest.main(verbosity=2)
