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

    def test_completion_logprobs_echo_and_n(self):
        r = self.client.completions.create(model=MODEL, prompt="And God said", max_tokens=3, temperature=0, logprobs=2,
                                           echo=True, extra_body={"ignore_eos": True})
        lp = r.choices[0].logprobs
        n_prompt = r.usage.prompt_tokens
        self.assertEqual(len(lp.tokens), n_prompt + 3)
        self.assertIsNone(lp.token_logprobs[0])  # the first prompt token has no context
        self.assertTrue(all(x <= 0 for x in lp.token_logprobs[1:]))
        self.assertTrue(r.choices[0].text.startswith("And God said"))
        for chosen, top in zip(lp.token_logprobs[n_prompt:], lp.top_logprobs[n_prompt:]):
            self.assertAlmostEqual(max(top.values()), chosen, places=5)  # greedy: the chosen one is the best
        # Prompt scoring, as lm-evaluation-harness asks for it.
        s = self.client.completions.create(model=MODEL, prompt="And God said", max_tokens=0, echo=True, logprobs=1)
        self.assertEqual(s.usage.completion_tokens, 0)
        self.assertEqual(s.choices[0].logprobs.token_logprobs[1:n_prompt], lp.token_logprobs[1:n_prompt])
        # n greedy choices are identical; streamed chunks carry their index.
        many = self.client.completions.create(model=MODEL, prompt="And God said", max_tokens=4, temperature=0, n=3,
                                              extra_body={"ignore_eos": True})
        self.assertEqual([c.index for c in many.choices], [0, 1, 2])
        self.assertEqual(len({c.text for c in many.choices}), 1)
        self.assertEqual(many.usage.completion_tokens, 12)
        stream = self.client.completions.create(model=MODEL, prompt="And God said", max_tokens=4, temperature=0, n=2,
                                                stream=True, logprobs=1, extra_body={"ignore_eos": True})
        texts, logprobs = {}, {}
        for chunk in stream:
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + c.text
                if c.logprobs:
                    logprobs.setdefault(c.index, []).extend(c.logprobs.token_logprobs)
        self.assertEqual(texts, {0: many.choices[0].text, 1: many.choices[0].text})
        self.assertEqual(len(logprobs[0]), 4)

    def test_chat_logprobs_and_n(self):
        messages = [{"role": "user", "content": "Hello"}]
        r = self.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0, n=2,
                                                logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
        self.assertEqual(len(r.choices), 2)
        for c in r.choices:
            self.assertEqual(len(c.logprobs.content), 4)
            for t in c.logprobs.content:
                self.assertEqual(len(t.top_logprobs), 3)
                self.assertAlmostEqual(t.top_logprobs[0].logprob, t.logprob, places=5)
        stream = self.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                                     logprobs=True, stream=True, extra_body={"ignore_eos": True})
        streamed = [t.logprob for chunk in stream for c in chunk.choices if c.logprobs for t in c.logprobs.content]
        want = [t.logprob for t in r.choices[0].logprobs.content]
        self.assertEqual(len(streamed), len(want))
        for a, b in zip(streamed, want):  # (a batch of 2 and a batch of 1 round differently in the last bits)
            self.assertAlmostEqual(a, b, places=4)

    def test_penalties_bias_and_unknown_fields(self):
        r = self.client.completions.create(model=MODEL, prompt="And God said", max_tokens=6, temperature=0,
                                           presence_penalty=1.0, frequency_penalty=0.5, logit_bias={"17": 5},
                                           extra_body={"ignore_eos": True, "min_tokens": 2, "some_new_field": 1})
        self.assertEqual(r.usage.completion_tokens, 6)
        with self.assertRaises(openai.UnprocessableEntityError):
            self.client.completions.create(model=MODEL, prompt="x", max_tokens=2, presence_penalty=3)

    def test_errors(self):
        with self.assertRaises(openai.NotFoundError):
            self.client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
        with self.assertRaises(openai.UnprocessableEntityError) as e:
            self.client.completions.create(model=MODEL, prompt="x", max_tokens=2, n=17)
        self.assertEqual(e.exception.status_code, 422)
        with self.assertRaises(openai.UnprocessableEntityError):
            self.client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
        with self.assertRaises(openai.UnprocessableEntityError):
            self.client.completions.create(model=MODEL, prompt="word " * 400, max_tokens=2)


if __name__ == "__main__":
    unittest.main(verbosity=2)
