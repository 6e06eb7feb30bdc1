"""The OpenAI Python client (from PyPI) against a live `fineserve serve`.

Run by tests/python/run.sh, which starts the server and sets FINESERVE_URL and FINESERVE_MODEL.
"""
import os
import unittest

import openai

BASE_URL = os.environ["FINESERVE_URL"]
MODEL = os.environ["FINESERVE_MODEL"]


class OpenAiClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.client = openai.OpenAI(base_url=BASE_URL + "/v1", api_key="unused", max_retries=0, timeout=120)

    def test_models(self):
        models = self.client.models.list()
        self.assertEqual([m.id for m in models.data], [MODEL])

    def test_completion(self):
        r = self.client.completions.create(model=MODEL, prompt="And God said", max_tokens=6, temperature=0,
                                           extra_body={"ignore_eos": True})
        self.assertEqual(r.object, "text_completion")
        self.assertEqual(len(r.choices), 1)
        self.assertEqual(r.choices[0].finish_reason, "length")
        self.assertTrue(r.choices[0].text)
        self.assertEqual(r.usage.completion_tokens, 6)
        self.assertEqual(r.usage.total_tokens, r.usage.prompt_tokens + 6)
        # Greedy decoding is deterministic; the stream carries the same text.
        again = self.client.completions.create(model=MODEL, prompt="And God said", max_tokens=6, temperature=0,
                                               extra_body={"ignore_eos": True})
        self.assertEqual(again.choices[0].text, r.choices[0].text)
        stream = self.client.completions.create(model=MODEL, prompt="And God said", max_tokens=6, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True})
        chunks = list(stream)
        self.assertEqual("".join(c.choices[0].text for c in chunks if c.choices), r.choices[0].text)
        self.assertEqual(chunks[-1].choices[0].finish_reason, "length")

    def test_chat(self):
        messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"}]
        r = self.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0, seed=3)
        self.assertEqual(r.object, "chat.completion")
        self.assertEqual(r.choices[0].message.role, "assistant")
        self.assertIn(r.choices[0].finish_reason, ("stop", "length"))
        self.assertGreater(r.usage.prompt_tokens, 0)
        self.assertLessEqual(r.usage.completion_tokens, 5)
        stream = self.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                                     stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual(text, r.choices[0].message.content)
        self.assertEqual(chunks[-1].choices, [])
        self.assertEqual(chunks[-1].usage.completion_tokens, r.usage.completion_tokens)

    def test_sampling_with_seed_is_reproducible(self):
        kw = dict(model=MODEL, prompt="In the beginning", max_tokens=8, temperature=0.9, top_p=0.95, seed=77)
        a = self.client.completions.create(**kw)
        b = self.client.completions.create(**kw)
        self.assertEqual(a.choices[0].text, b.choices[0].text)

    def test_errors(self):
        with self.assertRaises(openai.NotFoundError):
            self.client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
        with self.assertRaises(openai.UnprocessableEntityError) as e:
            self.client.completions.create(model=MODEL, prompt="x", max_tokens=2, n=2)
        self.assertEqual(e.exception.status_code, 422)
        with self.assertRaises(openai.UnprocessableEntityError):
            self.client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
        with self.assertRaises(openai.UnprocessableEntityError):
            self.client.completions.create(model=MODEL, prompt="word " * 400, max_tokens=2)


if __name__ == "__main__":
    unittest.main(verbosity=2)
