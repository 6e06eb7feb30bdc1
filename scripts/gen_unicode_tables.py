#!/usr/bin/env python3
"""Generates models/tokenizer/unicode_tables.inc: the Unicode classes the GPT-2 pre-tokenizer needs.

The GPT-2 pre-tokenizer regex (see models/tokenizer/pretokenize.cpp) asks three questions of a
code point: is it a letter (\\p{L}), a number (\\p{N}) or whitespace (\\s)? Hugging Face's
`tokenizers` answers them with Oniguruma, whose Unicode data is version 16.0 in current releases,
and whose \\s is the Unicode White_Space property. The answers here come from Python's
`unicodedata`; install the backport `unicodedata2==16.0.0` to get exactly Oniguruma's version
(the script prefers it when present and records which version it used).

Whitespace: Python's `str.isspace` also counts U+001C..U+001F (the information separators, whose
bidirectional class is B or S) as whitespace; the White_Space property, and so Oniguruma's \\s,
does not. They are removed here. Everything else isspace() accepts is White_Space.

A fourth table approximates the Rust `regex` crate's \\w (Alphabetic, marks, decimal digits,
connector punctuation, joiners), which Hugging Face uses to decide whether an added token with
"single_word": true stands alone.

  pip install unicodedata2==16.0.0
  python3 scripts/gen_unicode_tables.py [--out models/tokenizer/unicode_tables.inc] [--check-hf]

--check-hf compares every code point against the installed `tokenizers` package's ByteLevel
pre-tokenizer and fails on any difference.
"""

import argparse
import pathlib
import sys

try:
    import unicodedata2 as unicodedata  # newer Unicode data than the interpreter's, when installed
except ImportError:
    import unicodedata

MAX_CODE_POINT = 0x10FFFF
SURROGATES = range(0xD800, 0xE000)
NOT_WHITE_SPACE = {0x1C, 0x1D, 0x1E, 0x1F}  # str.isspace() says yes, Unicode White_Space says no

# Other_Alphabetic code points that are not marks (general category So): the circled and squared
# Latin letters. Marks (M*) are covered by category, so these are all \w still needs.
OTHER_ALPHABETIC_SYMBOLS = [(0x24B6, 0x24E9), (0x1F130, 0x1F149), (0x1F150, 0x1F169),
                            (0x1F170, 0x1F189)]
JOIN_CONTROL = [(0x200C, 0x200D)]


def char_class(cp):
    """'L', 'N', 'S' (whitespace) or None (anything else) for one code point."""
    c = chr(cp)
    cat = unicodedata.category(c)
    if cat[0] == "L":
        return "L"
    if cat[0] == "N":
        return "N"
    if c.isspace() and cp not in NOT_WHITE_SPACE:
        return "S"
    return None


def is_word(cp):
    cat = unicodedata.category(chr(cp))
    if cat[0] in "LM" or cat in ("Nd", "Nl", "Pc"):
        return True
    return any(lo <= cp <= hi for lo, hi in OTHER_ALPHABETIC_SYMBOLS + JOIN_CONTROL)


def ranges(pred_value):
    """Sorted, maximal [first, last, value] runs of code points where pred_value(cp) is not None."""
    out = []
    for cp in range(MAX_CODE_POINT + 1):
        if cp in SURROGATES:
            continue
        v = pred_value(cp)
        if v is None:
            continue
        if out and out[-1][1] == cp - 1 and out[-1][2] == v:
            out[-1][1] = cp
        else:
            out.append([cp, cp, v])
    return out


def check_against_hf():
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)

    def pieces(s):
        return len(pre.pre_tokenize_str(s))

    def hf_class(c):
        # A letter joins a preceding letter, a number a preceding digit, punctuation a preceding
        # '!'; whitespace joins none of them.
        if pieces("a" + c) == 1:
            return "L"
        if pieces("1" + c) == 1:
            return "N"
        if pieces("!" + c) == 1:
            return None
        return "S"

    # \w: an added token "QQ" with single_word matches after c only when c is not a word char.
    from tokenizers import AddedToken, Tokenizer, models

    tok = Tokenizer(models.BPE(vocab={"a": 0}, merges=[]))
    tok.pre_tokenizer = pre
    tok.add_tokens([AddedToken("QQ", single_word=True, normalized=False)])
    qq = tok.token_to_id("QQ")

    def hf_word(c):
        return qq not in tok.encode(c + "QQ", add_special_tokens=False).ids

    bad = [cp for cp in range(MAX_CODE_POINT + 1)
           if cp not in SURROGATES and (hf_class(chr(cp)) != char_class(cp)
                                        or hf_word(chr(cp)) != is_word(cp))]
    if bad:
        sys.exit(f"{len(bad)} code points differ from tokenizers, e.g. "
                 + ", ".join(f"U+{cp:04X}" for cp in bad[:20]))
    print("all code points agree with the installed tokenizers package")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    root = pathlib.Path(__file__).resolve().parent.parent
    ap.add_argument("--out", type=pathlib.Path, default=root / "models/tokenizer/unicode_tables.inc")
    ap.add_argument("--check-hf", action="store_true")
    args = ap.parse_args()

    if args.check_hf:
        check_against_hf()

    names = {"L": "CharClass::kLetter", "N": "CharClass::kNumber", "S": "CharClass::kSpace"}
    classes = ranges(char_class)
    words = ranges(lambda cp: True if is_word(cp) else None)
    lines = [
        "// Generated by scripts/gen_unicode_tables.py; do not edit.",
        f"// Unicode {unicodedata.unidata_version} ({unicodedata.__name__}).",
        "// Sorted, non-overlapping code point ranges; code points in none of them are CharClass::kOther.",
        "// clang-format off",
        "inline constexpr ClassRange kClassRanges[] = {",
    ]
    lines += [f"    {{0x{lo:04X}, 0x{hi:04X}, {names[v]}}}," for lo, hi, v in classes]
    lines += ["};", "",
              "// \\w as the Rust regex crate sees it (approximated: see the script).",
              "inline constexpr CodePointRange kWordRanges[] = {"]
    lines += [f"    {{0x{lo:04X}, 0x{hi:04X}}}," for lo, hi, _ in words]
    lines += ["};", "// clang-format on", ""]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}: {len(classes)} class ranges, {len(words)} word ranges, "
          f"Unicode {unicodedata.unidata_version}")


if __name__ == "__main__":
    main()
