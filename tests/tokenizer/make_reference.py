#!/usr/bin/env python3
"""Writes tests/data/gpt2/reference.json: what Hugging Face's tokenizers make of tricky text.

The C++ tokenizer must reproduce these ids and decoded strings exactly. Three tokenizers are
described, all built from the GPT-2 vocab.json + merges.txt next to the output:

  gpt2           the plain vocab.json + merges.txt directory, loaded with transformers'
                 GPT2Tokenizer (its defaults make <|endoftext|> BOS, EOS and UNK; no BOS added);
  tokenizer_json a tokenizer.json written by the tokenizers library with extra added tokens
                 (special and not, lstrip/rstrip/single_word/normalized) and a TemplateProcessing
                 post-processor that puts <|endoftext|> first. Its vocab and merges are emptied
                 in the stored copy to keep the data small: the test fills them back in;
                 tokenizer_json_prefix_space is the same with the pre-tokenizer's
                 add_prefix_space set;
  opt_style      vocab.json + merges.txt + a tokenizer_config.json like OPT's (add_bos_token,
                 "</s>" as BOS/EOS/UNK, "<pad>"), loaded with transformers' AutoTokenizer.

Decoding uses the tokenizers library's decode (clean_up_tokenization_spaces off, as the files
here ask), with and without skip_special_tokens.

  python3 -m venv venv && venv/bin/pip install tokenizers transformers
  venv/bin/python tests/tokenizer/make_reference.py --corpus DIR_WITH_kjv.txt_AND_sotu.txt
"""

import argparse
import json
import pathlib
import random
import shutil
import tempfile

import tokenizers
import transformers
from tokenizers import AddedToken, Tokenizer
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer, GPT2Tokenizer

HERE = pathlib.Path(__file__).resolve().parent
DATA = HERE.parent / "data" / "gpt2"

TRICKY = [
    "",
    "Hello world",
    " Hello world",
    "Hello, world! How are you?",
    "The quick brown fox jumps over the lazy dog.",
    "it's don't we're they've I'm you'll he'd",
    "IT'S DON'T WE'RE THEY'VE I'M YOU'LL HE'D 'S 'T",
    "'s's'S''s 'sup' '' ' 'll'",
    "12345678901234567890 3.14159 1,000,000 0x1F 2nd 1e10",
    "!!!??? ... --- ((())) [[]] {{}} <<>> ;;; ::: @#$%^&*",
    "    leading spaces",
    "trailing spaces    ",
    "multiple   spaces   between     words",
    " ",
    "  ",
    "\t",
    "tab\tseparated\t\tvalues\t",
    "line one\nline two\n\nline four\n",
    "\n\n \n",
    "\n \n  \n   x",
    " \n",
    "\r\n windows\r\nline endings\r\n",
    "mixed \t\n whitespace \u000b\u000c end",
    "你好，世界！这是一个测试。",
    "日本語のテキストです。カタカナもある",
    "한국어 텍스트",
    "مرحبا بالعالم",
    "שלום עולם",
    "Привет, мир!",
    "Ελληνικά γράμματα",
    "नमस्ते दुनिया",
    "emoji 😀 😃 😄 🎉🎉🎉",
    "family 👨‍👩‍👧‍👦 and flags 🇺🇸🇬🇧",
    "skin tones 👍🏻 👍🏽 👍🏿",
    "heart ❤️ and keycap 1️⃣",
    "combining: e\u0301 a\u0308 n\u0303 z\u0327\u0301",
    "café naïve résumé façade Ångström Øresund",
    "non\u00a0breaking\u00a0space",
    "ideographic\u3000space\u3000here",
    "en\u2002em\u2003thin\u2009hair\u200a",
    "line\u2028separator\u2029paragraph",
    "next\u0085line",
    "zero\u200bwidth\u200cjoiner\u200dtest",
    "info\u001cseparators\u001d\u001e\u001f",
    "<|endoftext|>",
    "Hello<|endoftext|>world",
    "Hello <|endoftext|> world",
    "<|endoftext|><|endoftext|>",
    "<|endoftext|",
    "<|endoftext|>>",
    "text with </s> and <s> and <pad> markers",
    "Roman numerals Ⅻ ⅻ and superscripts ² ³ ½",
    "fullwidth ＡＢＣ １２３ and Arabic-Indic ٠١٢٣",
    "math ∑∫∂√∞ ≤≥≠ ℕℤℚ",
    "private use \ue000\uf8ff and noncharacters \ufdd0\uffff",
    "Unicode 16 letters \u1c89\u1c8a \ua7cb and digits \U00010d40\U00010d41",
    "astral 𝕳𝖊𝖑𝖑𝖔 𝟙𝟚𝟛 𓀀𓀁",
    "replacement char \ufffd and BOM \ufeff",
    "a" * 300,
    "ab" * 150,
    "x" + " " * 50 + "y",
    "\n" * 20,
    "https://example.com/path?query=1&b=2#frag",
    "def f(x):\n    return x**2  # comment\n",
    "{\"json\": [1, 2, 3], \"k\": null}",
    "→ arrows ← and é! wordy swordy wordys [NEW] <|im_start|> <|im_end|>  <|im",
]

# Strings for the tokenizer.json case's extra added tokens.
ADDED_TOKEN_TEXTS = [
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant",
    "<|im_end|>   \n after",
    "<|im_start|><|im_end|><|im",
    "<|im <|imx <|im_start",
    "a [NEW] b   [NEW]c[NEW]",
    "  [NEW]",
    "wordy wordy. (wordy) swordy wordys _wordy wordy_ 1wordy wordy1 éwordy",
    "wordy",
    "é! café! e\u0301!",
    "→→ x→y",
    "<|endoftext|><|im_start|>",
]


def byte_to_unicode():
    """GPT-2's printable stand-in for every byte (the vocab's alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def random_unicode(rng, n):
    """Strings mixing scripts, whitespace kinds, marks, emoji and arbitrary code points."""
    pools = [
        [chr(c) for c in range(0x20, 0x7F)] * 3,
        list(" \t\n\r\u000b\u000c\u001c\u001f\u0085\u00a0\u1680\u2000\u200a\u2028\u2029"
             "\u202f\u205f\u3000\u200b\u180e"),
        [chr(c) for c in range(0xC0, 0x250)],
        [chr(c) for c in range(0x300, 0x370)],
        [chr(c) for c in range(0x4E00, 0x4F00)],
        [chr(c) for c in range(0x600, 0x700)],
        [chr(c) for c in range(0x900, 0x980)],
        [chr(c) for c in range(0x1F300, 0x1F700)] + ["\u200d", "\ufe0f"]
        + [chr(c) for c in range(0x1F3FB, 0x1F400)],
        list("0123456789\u0660\u0669\uff10\u2160\u00b2\u00bd\U00010d40\u1c89\ua7cb"),
        ["'s", "'S", "'t", "'re", "'ve", "'m", "'ll", "'d", "'", "<|endoftext|>", "<|"],
    ]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 40)):
            if rng.random() < 0.08:
                cp = rng.randrange(0x110000)
                while 0xD800 <= cp < 0xE000:
                    cp = rng.randrange(0x110000)
                parts.append(chr(cp))
            else:
                parts.append(rng.choice(rng.choice(pools)))
        out.append("".join(parts))
    return out


def corpus_samples(rng, corpus):
    kjv = (corpus / "kjv.txt").read_text(encoding="utf-8").splitlines()
    out = []
    for _ in range(45):
        i = rng.randrange(len(kjv) - 3)
        out.append("\n".join(kjv[i:i + rng.randint(1, 3)]))
    sotu = (corpus / "sotu.txt").read_text(encoding="utf-8")
    for _ in range(55):
        start = rng.randrange(len(sotu) - 1000)
        out.append(sotu[start:start + rng.randint(20, 900)])
    return out


def checked_decode(tok, ids, skip):
    text = tok.decode(ids, skip_special_tokens=skip)
    assert text == tok.backend_tokenizer.decode(ids, skip_special_tokens=skip)
    return text


def cases_for(encode, decode, texts):
    out = []
    for text in texts:
        ids = encode(text, True)
        out.append({
            "text": text,
            "ids": ids,
            "ids_plain": encode(text, False),
            "decoded": decode(ids, False),
            "decoded_skip_special": decode(ids, True),
        })
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--corpus", type=pathlib.Path, required=True,
                    help="folder holding kjv.txt and sotu.txt")
    ap.add_argument("--out", type=pathlib.Path, default=DATA / "reference.json")
    args = ap.parse_args()

    rng = random.Random(20240611)
    texts = TRICKY + random_unicode(rng, 80) + corpus_samples(rng, args.corpus)
    work = pathlib.Path(tempfile.mkdtemp())
    ref = {"generator": {"tokenizers": tokenizers.__version__,
                         "transformers": transformers.__version__}}

    # --- gpt2: the plain vocab.json + merges.txt folder -------------------------------------
    gpt2 = GPT2Tokenizer.from_pretrained(str(DATA))
    backend = gpt2.backend_tokenizer

    def hf_encode(text, special):
        ids = gpt2(text, add_special_tokens=special)["input_ids"]
        assert ids == backend.encode(text, add_special_tokens=special).ids
        return ids

    def hf_decode(ids, skip):
        text = backend.decode(ids, skip_special_tokens=skip)
        assert text == gpt2.decode(ids, skip_special_tokens=skip)
        return text

    ref["gpt2"] = {
        "vocab_size": len(gpt2), "bos_id": gpt2.bos_token_id, "eos_id": gpt2.eos_token_id,
        "cases": cases_for(hf_encode, hf_decode, texts),
    }
    # Decoding arbitrary ids, biased towards single bytes >= 0x80 so that many sequences are
    # invalid or truncated UTF-8 and exercise the U+FFFD replacement.
    high_bytes = [backend.token_to_id(byte_to_unicode()[b]) for b in range(0x80, 0x100)]
    decode_cases = []
    for _ in range(150):
        ids = [rng.choice(high_bytes) if rng.random() < 0.5 else rng.randrange(len(gpt2))
               for _ in range(rng.randint(1, 12))]
        decode_cases.append({"ids": ids, "decoded": hf_decode(ids, False),
                             "decoded_skip_special": hf_decode(ids, True)})
    ref["gpt2"]["decode_cases"] = decode_cases

    # --- tokenizer_json: tokenizers' own file format with added tokens and a BOS template ----
    tok = Tokenizer.from_str(backend.to_str())
    tok.add_special_tokens([
        AddedToken("<|im_start|>", special=True, normalized=False),
        AddedToken("<|im_end|>", special=True, normalized=False, rstrip=True),
    ])
    tok.add_tokens([
        AddedToken("[NEW]", special=False, normalized=False, lstrip=True),
        AddedToken("wordy", special=False, normalized=False, single_word=True),
        AddedToken("é!", special=False, normalized=True),
        AddedToken("→", special=False, normalized=False),
        AddedToken("<|im", special=False, normalized=True),
    ])
    eot = tok.token_to_id("<|endoftext|>")
    tok.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A <|endoftext|> $B",
        special_tokens=[("<|endoftext|>", eot)])
    path = work / "tokenizer.json"
    tok.save(str(path))
    tok = Tokenizer.from_file(str(path))
    stored = json.loads(path.read_text(encoding="utf-8"))
    assert stored["model"]["type"] == "BPE"
    merges_format = "pairs" if isinstance(stored["model"]["merges"][0], list) else "strings"
    stored["model"]["vocab"] = {}
    stored["model"]["merges"] = []
    ref["tokenizer_json"] = {
        "tokenizer": stored, "merges_format": merges_format,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True), "bos_id": eot,
        "cases": cases_for(
            lambda t, s: tok.encode(t, add_special_tokens=s).ids,
            lambda ids, skip: tok.decode(ids, skip_special_tokens=skip),
            TRICKY + ADDED_TOKEN_TEXTS + texts[len(TRICKY):len(TRICKY) + 30]),
    }

    # The same tokenizer with ByteLevel's add_prefix_space on: every piece between added tokens
    # that does not start with a space gets one.
    stored_prefix = json.loads(path.read_text(encoding="utf-8"))
    stored_prefix["pre_tokenizer"]["add_prefix_space"] = True
    path.write_text(json.dumps(stored_prefix), encoding="utf-8")
    tok_prefix = Tokenizer.from_file(str(path))
    ref["tokenizer_json_prefix_space"] = {
        "vocab_size": tok_prefix.get_vocab_size(with_added_tokens=True), "bos_id": eot,
        "cases": cases_for(
            lambda t, s: tok_prefix.encode(t, add_special_tokens=s).ids,
            lambda ids, skip: tok_prefix.decode(ids, skip_special_tokens=skip),
            TRICKY + ADDED_TOKEN_TEXTS),
    }

    # SmolLM/StarCoder's chain: a Digits pre-tokenizer ahead of ByteLevel, isolating each digit
    # (individual_digits, as SmolLM2 ships it) or runs of digits.
    digit_texts = TRICKY + ADDED_TOKEN_TEXTS + texts[len(TRICKY):len(TRICKY) + 60]
    for name, individual in (("tokenizer_json_digits", True), ("tokenizer_json_digit_runs", False)):
        stored_digits = json.loads(path.read_text(encoding="utf-8"))
        byte_level = dict(stored_digits["pre_tokenizer"], add_prefix_space=False)
        stored_digits["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": individual}, byte_level]}
        digits_path = work / f"{name}.json"
        digits_path.write_text(json.dumps(stored_digits), encoding="utf-8")
        tok_digits = Tokenizer.from_file(str(digits_path))
        ref[name] = {
            "pre_tokenizer": stored_digits["pre_tokenizer"],
            "vocab_size": tok_digits.get_vocab_size(with_added_tokens=True), "bos_id": eot,
            "cases": cases_for(
                lambda t, s, tk=tok_digits: tk.encode(t, add_special_tokens=s).ids,
                lambda ids, skip, tk=tok_digits: tk.decode(ids, skip_special_tokens=skip),
                digit_texts),
        }

    # Llama 3's chain (and Qwen2's, which isolates single digits): a Split with the regex below
    # ahead of a ByteLevel that no longer splits (use_regex false). The GPT-2 vocabulary stands in
    # for Llama 3's: the split, not the vocabulary, is under test.
    contractions_and_newlines = [
        "I'M HERE, you'RE there, it'S", "'Ll 'vE 'D 't", "a\r\nb\r\n\r\n  c", " \n\t x\n",
        "12345678 1234.5 ٠١٢٣٤", "x!!\n\ny", "é! e\u0301x \u0301abc", "tab\tword\t\tend  ", "'\n's",
    ]
    split_texts = digit_texts + contractions_and_newlines
    for name, digits in (("tokenizer_json_llama3_split", "{1,3}"), ("tokenizer_json_qwen2_split", "")):
        regex = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}" + digits +
                 "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
        stored_split = json.loads(path.read_text(encoding="utf-8"))
        byte_level = dict(stored_split["pre_tokenizer"], add_prefix_space=False, use_regex=False)
        stored_split["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            byte_level]}
        split_path = work / f"{name}.json"
        split_path.write_text(json.dumps(stored_split), encoding="utf-8")
        tok_split = Tokenizer.from_file(str(split_path))
        ref[name] = {
            "pre_tokenizer": stored_split["pre_tokenizer"],
            "vocab_size": tok_split.get_vocab_size(with_added_tokens=True), "bos_id": eot,
            "pieces": [[text, [p for p, _ in tok_split.pre_tokenizer.pre_tokenize_str(text)]]
                       for text in split_texts],
            "cases": cases_for(
                lambda t, s, tk=tok_split: tk.encode(t, add_special_tokens=s).ids,
                lambda ids, skip, tk=tok_split: tk.decode(ids, skip_special_tokens=skip),
                split_texts),
        }

    # --- opt_style: vocab.json + merges.txt + an OPT-like tokenizer_config.json ---------------
    opt_dir = work / "opt"
    opt_dir.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(DATA / name, opt_dir / name)
    opt_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": True,
        "add_prefix_space": False,
        "errors": "replace",
        "bos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False,
                      "normalized": True, "rstrip": False, "single_word": False},
        "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False,
                      "normalized": True, "rstrip": False, "single_word": False},
        "unk_token": "</s>",
        "pad_token": "<pad>",
    }
    (opt_dir / "tokenizer_config.json").write_text(json.dumps(opt_config, indent=2))
    opt = AutoTokenizer.from_pretrained(str(opt_dir))
    ref["opt_style"] = {
        "tokenizer_config": opt_config,
        "vocab_size": len(opt), "bos_id": opt.bos_token_id, "eos_id": opt.eos_token_id,
        "cases": cases_for(
            lambda t, s: opt(t, add_special_tokens=s)["input_ids"],
            lambda ids, skip: checked_decode(opt, ids, skip),
            TRICKY + texts[len(TRICKY):len(TRICKY) + 20]),
    }

    args.out.write_text(json.dumps(ref, ensure_ascii=False, indent=None, separators=(",", ":"))
                        + "\n", encoding="utf-8")
    shutil.rmtree(work)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
