#!/usr/bin/env python3
"""Writes tests/data/spm/: a tiny Llama-style SentencePiece tokenizer and what Hugging Face makes of it.

  tokenizer.model        SentencePiece BPE (512 pieces, byte_fallback) trained on the King James
                         Bible (plus indented copies of some verses, so that whitespace-only pieces
                         such as "▁▁▁▁" exist, as in Llama's vocabulary), with Llama-2's trainer and
                         normalizer settings: split_digits, allow_whitespace_only_pieces, identity
                         normalization, add_dummy_prefix, no whitespace folding, <unk>/<s>/</s> = 0/1/2;
  tokenizer_config.json  Llama-2's (LlamaTokenizer, add_bos_token, legacy=false, the three specials);
  tokenizer.json         what transformers' save_pretrained writes for it (a BPE with byte_fallback,
                         as every Llama checkpoint ships: FineServe must fall back to tokenizer.model);
  reference.json         ids and decoded text from transformers' AutoTokenizer for tricky text.

The reference tokenizer is AutoTokenizer on a folder holding only tokenizer.model and
tokenizer_config.json: in transformers 5 that is LlamaTokenizer, the Rust "tokenizers" backend
(there is no slow/fast split any more) built from the .model's vocabulary with a Metaspace
pre-tokenizer whose prepend_scheme is "first" (legacy=false, the default) or "always"
(legacy=true), and a Replace/ByteFallback/Fuse/Strip decoder. The script checks that the folder with
tokenizer.json gives the same ids, and records where the sentencepiece library itself (what the
model was trained with: a '▁' before every piece of text, also after special tokens) differs.

Sections of reference.json, each with its tokenizer_config.json (the test writes it next to a copy
of tokenizer.model):
  llama2           the folder's own config;
  legacy           legacy=true (Mistral-7B's config): '▁' after special tokens too;
  bos_eos          add_bos_token=false, add_eos_token=true;
  added_tokens     added_tokens_decoder with tokens beyond the vocabulary (special and not,
                   lstrip/rstrip);
  no_prefix_space  add_prefix_space=false: no '▁' in front, none stripped when decoding.
Decoding uses skip_special_tokens both ways. "ill_formed_decode" records HF's text for byte tokens
that do not form UTF-8, where FineServe knowingly differs (see the test).

  python3 -m venv venv && venv/bin/pip install sentencepiece protobuf tokenizers transformers
  venv/bin/python tests/tokenizer/make_spm_reference.py --corpus DIR_WITH_kjv.txt_AND_sotu.txt
"""

import argparse
import io
import json
import pathlib
import random
import shutil
import sys
import tempfile

import sentencepiece as spm
import tokenizers
import transformers
from transformers import AutoTokenizer

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_reference import TRICKY, random_unicode  # noqa: E402  (the GPT-2 reference's texts)

DATA = HERE.parent / "data" / "spm"

# Texts aimed at SentencePiece and Llama's tokenizer.
SPM_TRICKY = [
    "<s>", "</s>", "<unk>", "<s><s>", "<s>Hello", "<s> Hello", "Hello<s>", "Hello <s> world",
    "a</s>b", "x <unk> y", "<s>\n</s>", " <s>", "  <s>  ", "<s", "</s", "<<s>>",
    "▁", "▁▁", "▁Hello", "Hello▁world", " ▁ x", "▁ ", "\u2581\u2581\u2581",
    " ", "  ", "   ", "    ", "        indented", "  two", "\tone tab", " \t mixed",
    "1", " 1", "12", "2024", "3.14", "-5", "1,000,000", "v1.2.3", "a1b2c3",
    "And God said, Let there be light: and there was light.",
    "In the beginning God created the heaven and the earth.",
    "\n", "\n\n", "line\nbreak", " \n ", "a\r\nb",
    "ünïcödé", "日本語", "😀", "👨‍👩‍👧", "e\u0301", "עִבְרִית", "العربية", "\u0000", "nul\u0000byte",
    "\ufffd", "\U0010ffff", "<0x41>", "<0xE4>",
]

# Only for the added_tokens section.
ADDED_TEXTS = [
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant",
    "<|im_end|>   after", "x <|im_end|> y", "<|im_start|><|im_start|>",
    "a [NEW] b   [NEW]c[NEW]", "  [NEW]", "[NEW]", "▁[NEW]", "<s>[NEW]</s>",
]


def train_model(corpus):
    """The tiny Llama-style model, deterministic (one thread)."""
    kjv = (corpus / "kjv.txt").read_text(encoding="utf-8").splitlines()
    rng = random.Random(11)
    lines = kjv[:12000]
    lines += ["    " + v for v in rng.sample(kjv, 400)] + ["  " + v for v in rng.sample(kjv, 200)]
    lines += ["        " + v for v in rng.sample(kjv, 100)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out,
        model_type="bpe", vocab_size=512, character_coverage=0.99995,
        split_digits=True, allow_whitespace_only_pieces=True, byte_fallback=True,
        split_by_unicode_script=True, split_by_whitespace=True, split_by_number=True,
        max_sentencepiece_length=16, treat_whitespace_as_suffix=False,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        vocabulary_output_piece_score=True, hard_vocab_limit=True, num_threads=1, minloglevel=2)
    return out.getvalue()


def special(content):
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


# Llama-2-7b-hf's tokenizer_config.json, less model_max_length and padding_side.
LLAMA2_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "added_tokens_decoder": {"0": special("<unk>"), "1": special("<s>"), "2": special("</s>")},
    "bos_token": "<s>",
    "clean_up_tokenization_spaces": False,
    "eos_token": "</s>",
    "legacy": False,
    "pad_token": None,
    "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
    "unk_token": "<unk>",
}


def corpus_samples(rng, corpus):
    kjv = (corpus / "kjv.txt").read_text(encoding="utf-8").splitlines()
    out = []
    for _ in range(30):
        i = rng.randrange(len(kjv) - 3)
        out.append("\n".join(kjv[i:i + rng.randint(1, 3)]))
    sotu = (corpus / "sotu.txt").read_text(encoding="utf-8")
    for _ in range(20):
        start = rng.randrange(len(sotu) - 600)
        out.append(sotu[start:start + rng.randint(20, 600)])
    return out


def load(folder, config):
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert type(tok).__name__ == "LlamaTokenizer", type(tok)
    return tok


def section(tok, config, texts):
    cases = []
    for text in texts:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        cases.append({
            "text": text,
            "ids": ids,
            "ids_plain": tok(text, add_special_tokens=False)["input_ids"],
            "decoded": tok.decode(ids, skip_special_tokens=False),
            "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
        })
    return {"tokenizer_config": config, "vocab_size": len(tok), "bos_id": tok.bos_token_id,
            "eos_id": tok.eos_token_id, "pre_tokenizer": str(tok.backend_tokenizer.pre_tokenizer),
            "cases": cases}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--corpus", type=pathlib.Path, required=True, help="folder holding kjv.txt and sotu.txt")
    ap.add_argument("--out", type=pathlib.Path, default=DATA)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model = train_model(args.corpus)
    (args.out / "tokenizer.model").write_bytes(model)
    (args.out / "tokenizer_config.json").write_text(json.dumps(LLAMA2_CONFIG, indent=2) + "\n", encoding="utf-8")

    rng = random.Random(20240612)
    texts = TRICKY + SPM_TRICKY + random_unicode(rng, 60) + corpus_samples(rng, args.corpus)
    work = pathlib.Path(tempfile.mkdtemp())
    shutil.copy(args.out / "tokenizer.model", work / "tokenizer.model")
    ref = {"generator": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                         "sentencepiece": spm.__version__,
                         "reference": "AutoTokenizer on tokenizer.model + tokenizer_config.json "
                                      "(transformers' LlamaTokenizer, tokenizers backend)"}}

    tok = load(work, LLAMA2_CONFIG)
    ref["llama2"] = section(tok, LLAMA2_CONFIG, texts)

    # tokenizer.json as save_pretrained writes it; AutoTokenizer must agree with or without it.
    tok.save_pretrained(str(work / "saved"))
    shutil.copy(work / "saved" / "tokenizer.json", args.out / "tokenizer.json")
    with_json = AutoTokenizer.from_pretrained(str(args.out))
    for c in ref["llama2"]["cases"]:
        assert with_json(c["text"])["input_ids"] == c["ids"], c["text"]
    stored = json.loads((args.out / "tokenizer.json").read_text(encoding="utf-8"))
    assert stored["model"]["type"] == "BPE" and stored["model"]["byte_fallback"]

    # Where the sentencepiece library (a '▁' before every piece of text) differs from HF.
    sp = spm.SentencePieceProcessor(model_proto=model)
    ref["generator"]["sentencepiece_library_differs"] = sum(
        sp.encode(c["text"]) != c["ids_plain"] for c in ref["llama2"]["cases"])

    legacy = dict(LLAMA2_CONFIG, legacy=True)
    ref["legacy"] = section(load(work, legacy), legacy, TRICKY + SPM_TRICKY + texts[-10:])

    bos_eos = dict(LLAMA2_CONFIG, add_bos_token=False, add_eos_token=True)
    ref["bos_eos"] = section(load(work, bos_eos), bos_eos, SPM_TRICKY)

    added = json.loads(json.dumps(LLAMA2_CONFIG))
    added["added_tokens_decoder"]["512"] = dict(special("<|im_start|>"))
    added["added_tokens_decoder"]["513"] = dict(special("<|im_end|>"), rstrip=True)
    added["added_tokens_decoder"]["514"] = dict(special("[NEW]"), special=False, lstrip=True)
    ref["added_tokens"] = section(load(work, added), added, SPM_TRICKY + ADDED_TEXTS)

    no_prefix = dict(LLAMA2_CONFIG, add_prefix_space=False)
    ref["no_prefix_space"] = section(load(work, no_prefix), no_prefix, TRICKY[:30] + SPM_TRICKY)

    # Random ids for decoding: whole characters spelled in byte tokens, pieces, specials, '▁'.
    tok = load(work, LLAMA2_CONFIG)
    byte_id = {b: tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)}
    pieces = [i for i in range(3, len(tok)) if i not in byte_id.values()]
    chars = "é你😀ß\u0301\n\t"
    decode_cases = []
    for _ in range(120):
        ids = []
        for _ in range(rng.randint(1, 12)):
            r = rng.random()
            if r < 0.3:
                ids += [byte_id[b] for b in rng.choice(chars).encode("utf-8")]
            elif r < 0.4:
                ids.append(rng.choice([0, 1, 2, tok.convert_tokens_to_ids("▁")]))
            else:
                ids.append(rng.choice(pieces))
        decode_cases.append({"ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False),
                             "decoded_skip_special": tok.decode(ids, skip_special_tokens=True)})
    ref["llama2"]["decode_cases"] = decode_cases
    # Byte tokens that are not UTF-8: HF turns every byte of such a run into U+FFFD.
    ill = [[byte_id[0xE4], byte_id[0xBD]], [byte_id[0xE4], byte_id[0xBD], tok.convert_tokens_to_ids("a")],
           [byte_id[0xC3], byte_id[0xA9], byte_id[0xA9]], [byte_id[0xFF]]]
    ref["ill_formed_decode"] = [{"ids": ids, "decoded": tok.decode(ids)} for ids in ill]

    out = args.out / "reference.json"
    out.write_text(json.dumps(ref, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    shutil.rmtree(work)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "reference.json"):
        print(f"{args.out / name}: {(args.out / name).stat().st_size} bytes")
    print("sentencepiece library differs from HF on", ref["generator"]["sentencepiece_library_differs"],
          "of", len(ref["llama2"]["cases"]), "texts")


if __name__ == "__main__":
    main()
