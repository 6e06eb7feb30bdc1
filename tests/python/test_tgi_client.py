"""The TGI Python client (`text-generation` from PyPI) against a live `fineserve serve`.

The client posts every request to the root route POST / and dispatches on "stream"; its pydantic
models check the shapes of the responses and stream events. Run by tests/python/run.sh.
"""
import os
import unittest

from text_generation import Client
from text_generation.errors import ValidationError

BASE_URL = os.environ["FINESERVE_URL"]


class TgiClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.client = Client(BASE_URL, timeout=120)

    def test_generate_with_details(self):
        r = self.client.generate("And God said", max_new_tokens=5, decoder_input_details=True,
                                 top_n_tokens=2)
        d = r.details
        self.assertIn(d.finish_reason.value, ("length", "eos_token"))
        self.assertEqual(d.generated_tokens, len(d.tokens))
        self.assertGreater(len(d.prefill), 1)
        self.assertIsNone(d.prefill[0].logprob)  # the first prompt token has no context
        self.assertTrue(all(t.logprob <= 0 for t in d.prefill[1:]))
        self.assertEqual(len(d.top_tokens), len(d.tokens))
        for chosen, top in zip(d.tokens, d.top_tokens):
            self.assertEqual(top[0].id, chosen.id)  # greedy: the most likely token
            self.assertAlmostEqual(top[0].logprob, chosen.logprob, places=5)
        self.assertEqual("".join(t.text for t in d.tokens), r.generated_text)

    def test_generate_stream_matches(self):
        full = self.client.generate("In the beginning", max_new_tokens=6)  # the client always asks for details
        events = list(self.client.generate_stream("In the beginning", max_new_tokens=6))
        self.assertEqual([e.token.id for e in events], [t.id for t in full.details.tokens])
        self.assertEqual(events[-1].generated_text, full.generated_text)
        self.assertEqual(events[-1].details.generated_tokens, full.details.generated_tokens)

    def test_sampling_seed_and_best_of(self):
        kw = dict(max_new_tokens=6, do_sample=True, temperature=0.9, seed=11)
        a = self.client.generate("And God said", **kw)
        b = self.client.generate("And God said", **kw)
        self.assertEqual(a.generated_text, b.generated_text)
        self.assertEqual(a.details.seed, 11)
        best = self.client.generate("And God said", max_new_tokens=4, do_sample=True, best_of=3)  # (the client refuses a seed with best_of)
        self.assertEqual(len(best.details.best_of_sequences), 2)

    def test_validation_error(self):
        with self.assertRaises(ValidationError):
            self.client.generate("word " * 400, max_new_tokens=2)  # longer than the context: 422


if __name__ == "__main__":
    unittest.main(verbosity=2)
