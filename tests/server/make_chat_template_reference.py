"""Generates tests/data/chat_templates/expected.json: what transformers renders for real chat
templates (tests/data/chat_templates/*.jinja) and for small template snippets. test_chat_template
checks FineServe's interpreter against it byte for byte.

    python tests/server/make_chat_template_reference.py

Needs transformers (which brings jinja2). Rendering goes through transformers' own
render_jinja_template, i.e. its sandboxed jinja2 environment with trim_blocks, lstrip_blocks, loop
controls, raise_exception and its tojson, exactly as apply_chat_template uses it.
"""

import json
import pathlib

import jinja2
import transformers
from transformers.utils.chat_template_utils import render_jinja_template

DATA = pathlib.Path(__file__).resolve().parent.parent / "data" / "chat_templates"

# The special tokens each template's checkpoint passes (tokenizer_config.json); None: not set.
SPECIAL = {
    "deepseek_coder": ("<｜begin▁of▁sentence｜>", "<|EOT|>"),
    "gemma2": ("<bos>", "<eos>"),
    "llama2_chat": ("<s>", "</s>"),
    "llama3_1_instruct": ("<|begin_of_text|>", "<|eot_id|>"),
    "llama3_instruct": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral_v0_1": ("<s>", "</s>"),
    "mistral_v0_3": ("<s>", "</s>"),
    "mixtral_v0_1": ("<s>", "</s>"),
    "phi3_5_mini": ("<s>", "<|endoftext|>"),
    "qwen1_5": (None, "<|im_end|>"),
    "qwen2_5": (None, "<|im_end|>"),
    "smollm2": ("<|im_start|>", "<|im_end|>"),
    "zephyr": ("<s>", "</s>"),
}

CONVERSATIONS = {
    "system_multi_turn": [
        {"role": "system", "content": "You are brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "  Hi there!  "},
        {"role": "user", "content": "What is 2+2?\n"},
    ],
    "no_system": [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi"},
        {"role": "user", "content": "Bye"},
    ],
    "single_user": [{"role": "user", "content": "Only one question?"}],
    "ends_with_assistant": [
        {"role": "user", "content": "Say A"},
        {"role": "assistant", "content": "A"},
    ],
    "unicode_and_markup": [
        {"role": "system", "content": "Réponds en français. {{ not a tag }} {% neither %}"},
        {"role": "user", "content": "  ¿Qué tal? 你好 🙂\n\n<b>bold</b> \"quoted\" 'single' \\ backslash  "},
    ],
    # Two user turns in a row: the templates that check alternation raise.
    "not_alternating": [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
    ],
}

# Small templates exercising the interpreter's pieces, with the variables they see.
VARS = {
    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
    "x": "X",
    "n": None,
    "d": {"b": 1, "a": [1, 2]},
}
SNIPPETS = [
    "{% set a = 1 %}{% for x in [1,2] %}{{ a }}{% set a = a + 1 %}{{ a }};{% endfor %}{{ a }}",
    "{% for x in [1,2] %}{% if x == 2 %}{{ b }}{% endif %}{% set b = x %}{% endfor %}[{{ b }}]",
    "{% if true %}{% set c = 5 %}{% endif %}{{ c }}",
    "{{ none.y }}|{{ (none.y) is defined }}{{ [1,2][5] }}|",
    "{{ 'abc'[1] }}{{ 'abc'[-1] }}{{ 'abc'[::-1] }}{{ 'héllo'[1:3] }}{{ [1,2,3,4][::2] }}{{ [1,2,3][-2:] }}{{ 'abc'[:-1] }}",
    "{{ 1.0 }} {{ 1e20 }} {{ 0.1+0.2 }} {{ 3/2 }} {{ 4/2 }} {{ 7//2 }} {{ -7//2 }} {{ -7 % 3 }} {{ 2**10 }} {{ 2**-1 }} {{ 7.5 // 2 }} {{ -7.5 % 2 }}",
    "{{ [1,'a',none,true] }} {{ {'a':1} }} {{ \"it's\" }}{{ ['a\\'b', 'c\"d', \"x\\ny\"] }}",
    "{{ {'b':1,'a':2}|tojson }} {{ [1,2]|tojson(indent=2) }} {{ 'é\\n\\u0001'|tojson }} {{ d|tojson(indent=4) }} {{ {}|tojson }}{{ []|tojson(indent=2) }} {{ 1.5|tojson }}",
    "{{ true == 1 }} {{ 1 == 1.0 }} {{ q == r }} {{ [1,2] == [1,2] }} {{ 'a' != 'b' }}",
    "{{ messages|length }}{{ foo|length }}{{ 'héllo'|length }}{{ d|length }}",
    "{% for k in {'a':1,'b':2} %}{{k}}{% endfor %}{% for k, v in d.items() %}{{k}}={{v}};{% endfor %}",
    "{{ 'a b  c'.split() }}{{ 'a,b'.split(',') }}{{ ' a b '.split(' ') }}{{ 'a,b,c'.split(',', 1) }}{{ 'a,b,c'.rsplit(',', 1) }}",
    "{{ ' x '|trim }}|{{ 'xxhixx'.strip('x') }}|{{ '  y'.lstrip() }}|{{ 'z  '.rstrip() }}|{{ 'abc'|trim('ac') }}",
    "{{ range(3)|list }}{{ range(1,10,3)|list }}{{ range(5,0,-2)|list }}",
    "{{ 'abc'|upper }}{{ 'hello world-foo'|title }}{{ 'hELLO'|capitalize }}{{ 'hello world'.title() }}{{ 'ABC'.lower() }}",
    "{{ [3,1,2]|sort }}{{ [1,2]|join(',') }}{{ [1,2]|first }}{{ 'ab'|last }}{{ [3,1,2]|sort(reverse=true) }}{{ [{'n':2},{'n':1}]|sort(attribute='n') }}",
    "{{ x|default('d') }}{{ ''|default('e', true) }}{{ none|default('f') }}{{ zz|default('g') }}{{ zz|d('h') }}",
    "{% for a, b in [[1,2],[3,4]] %}{{a}}{{b}}{% endfor %}",
    "{{ loop }}|{% for x in [1,2,3] %}{{ loop.index }}{{ loop.index0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}{{ loop.revindex }}{{ loop.revindex0 }}{{ loop.previtem }}{{ loop.nextitem }};{% endfor %}",
    "{{ 1 < 2 < 3 }}{{ 'a' < 'b' }}{{ 3 > 2 > 5 }}{{ [1,2] < [1,3] }}",
    "{{ [1] + [2] }}{{ 'ab' * 2 }}{{ 2 * 'cd' }}{{ [0] * 3 }}",
    "{{ 'x' ~ 1 ~ none ~ true ~ 1.5 ~ [1] }}",
    "{% set ns = namespace(a=1) %}{{ ns.a }}{% set ns.a = ns.a + 1 %}{% set ns.b = 'q' %}{{ ns.a }}{{ ns.b }}{% for i in range(3) %}{% set ns.a = ns.a * 2 %}{% endfor %}{{ ns.a }}",
    "{{ -3|abs }}{{ 5 is divisibleby 5 }}{{ 1.5|int }}{{ '3'|int }}{{ 2|float }}{{ 'x'|int }}{{ '2.5'|float }}",
    "{{ dict(a=1, b='x') }}{{ {'a':1}.keys()|list }}{{ {'a':1}.values()|list }}{{ d.get('b') }}{{ d.get('zz') }}{{ d.get('zz', 5) }}",
    "{{ 10000000000000000.0 }} {{ 1e-5 }} {{ 0.0001 }} {{ 123456789012345678 }} {{ 1.0e3 }} {{ 2.5e-7 }} {{ 1_000 }}",
    "  {% if true %}\n    A\n  {% endif %}\nB",
    "{% for m in messages %}\n  {{ m.role }}\n{% endfor %}\nend\n",
    "a   {{- 'b' -}}   c  {%- if true -%}  d  {%- endif %}  e  {#- comment -#}  f {# c2 #}\ng",
    "x {%+ if true %}y{% endif +%}\nz",
    "line\r\nwindows {% if true %}\r\nbody\r\n{% endif %}\r\n",
    "{{ x is defined }}{{ zz is defined }}{{ zz is not defined }}{{ n is none }}{{ x is string }}{{ 1 is number }}{{ true is number }}{{ 1 is integer }}{{ 1.0 is float }}{{ d is mapping }}{{ x is iterable }}{{ zz is iterable }}{{ 3 is odd }}{{ 4 is even }}{{ none is sameas none }}{{ 'A' is upper }}{{ 2 is in [1,2] }}{{ 2 is gt 1 }}{{ 'a' is equalto 'a' }}{{ raise_exception is callable }}",
    "{{ 'yes' if x else 'no' }}{{ 'a' if false }}|{{ 'b' in 'abc' }}{{ 2 in [1,2] }}{{ 'k' in d }}{{ 'q' not in d }}{{ not true }}{{ true and 'v' }}{{ false or 'w' }}{{ none or 0 }}",
    "{{ messages | selectattr('role', 'equalto', 'user') | list | length }}{{ [{'a':1},{'b':2},{'a':0}] | selectattr('a') | list }}{{ [{'a':1},{'b':2}] | rejectattr('a') | list }}{{ [1,2,3,4]|select('odd')|list }}{{ [1,2,3]|reject('gt', 1)|list }}",
    "{{ [{'a':1},{'a':2}]|map(attribute='a')|list }}{{ ['a','b']|map('upper')|list }}{{ [1,1,2]|unique|list }}{{ [1,2]|reverse|list }}{{ 'abc'|reverse }}{{ [3,5,1]|max }}{{ [3,5,1]|min }}{{ [1,2,3]|sum }}",
    "{% for x in [1, 2, 3, 4] if x % 2 == 0 %}{{ loop.index }}:{{ x }}{% if not loop.last %},{% endif %}{% endfor %}",
    "{% for x in [] %}x{% else %}empty{% endfor %}{% for n in [1, 2, 3, 4] %}{% if n == 2 %}{% continue %}{% endif %}{% if n == 4 %}{% break %}{% endif %}{{ n }}{% endfor %}",
    "{% set cap %}hello {{ x }}{% endset %}[{{ cap }}]{{ cap|upper }}",
    "{{ 'abc'.startswith('a') }}{{ 'abc'.endswith(('x','c')) }}{{ 'a-b'.replace('-', '+') }}{{ 'aaa'|replace('a','b',2) }}{{ 'abc'.find('c') }}{{ ', '.join(['a','b']) }}{{ 'aXa'.count('a') }}",
    "{{ \"line1\\nline2\"|indent(2) }}|{{ \"l1\\nl2\\n\\nl4\"|indent(2, true) }}|{{ 'a<b'|e }}{{ 'a b c'|wordcount }}{{ 3.14159|round(2) }}{{ 2.5|round }}",
    "{{ [1,2,3]|first }}{{ []|first is defined }}{{ 'x'.upper() }}{{ x.lower() }}{{ 'Hello World'.split(' ')[1] }}",
    "{{ {'a': {'b': 1}} }}{{ {'a': {'b': 1}}['a']['b'] }}{{ d.a[1] }}{{ d['a'][-1] }}",
    "{% if x %}1{% elif n %}2{% else %}3{% endif %}{% if n %}1{% elif x %}2{% else %}3{% endif %}{% if n %}1{% elif n %}2{% else %}3{% endif %}",
    "{{ 'a' 'b' }}{{ \"tab\\there\" }}{{ '\\x41\\u00e9\\\\n' }}{{ ('a', 'b')|join }}",
    "{% for m in messages %}{{ m['role'] }}{{ m.content|upper }}{% endfor %}{{ messages[0].role }}{{ messages[-1]['content'] }}",
    "{{ 'ab'|first }}{{ {'k':1}|first }}{{ {'k':1}|list }}{{ 'ab'|list }}{{ none|string }}{{ 1|string }}{{ [1]|string }}",
    "{{ 1 if x }}{{ [1,2][0] + [3][0] }}{{ -(2) }}{{ +3 }}{{ - - 2 }}{{ not not x }}",
    "{{ 1 is divisibleby(3) }}{{ messages|map(attribute='role')|join(', ') }}{{ 'a'|tojson }}{{ none|tojson }}{{ true|tojson }}",
    "{%- set s = '  pad  ' -%}\n[{{ s }}]\n{%- for i in range(2) %}\n  item {{ i }}\n{%- endfor %}",
    "{{ '%s' }}{{ '{' }}{{ '}' }}{{ '{{' }}{{ {'x': {'y': 1}}.x }}{{ \"%}\" }}",
    "{% generation %}kept{% endgeneration %}",
    # Runtime errors (the expected entry records only that there is one).
    "{{ raise_exception('nope: ' + x) }}",
    "{{ undefined_thing + 1 }}",
    "{{ 'a' + 1 }}",
    "{{ y.z }}",
    "{{ 5 // 0 }}",
    "{% for x in 5 %}{% endfor %}",
]


def render(template, **kwargs):
    try:
        rendered, _ = render_jinja_template(conversations=[kwargs.pop("messages")], chat_template=template, **kwargs)
        return {"output": rendered[0]}
    except jinja2.exceptions.TemplateError as e:
        return {"error": str(e)}
    except (TypeError, ValueError, ZeroDivisionError) as e:
        return {"error": f"{type(e).__name__}: {e}"}


def main():
    cases = []
    for path in sorted(DATA.glob("*.jinja")):
        name = path.stem
        template = path.read_text(encoding="utf-8")
        bos, eos = SPECIAL[name]
        tokens = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
        for conv_name, conv in CONVERSATIONS.items():
            for agp in (True, False):
                case = {"template": name, "conversation": conv_name, "add_generation_prompt": agp, **tokens}
                case.update(render(template, messages=conv, add_generation_prompt=agp, **tokens))
                cases.append(case)
    snippets = []
    for template in SNIPPETS:
        variables = dict(VARS)
        entry = {"template": template}
        entry.update(render(template, **variables))
        snippets.append(entry)
    out = {
        "generator": {"transformers": transformers.__version__, "jinja2": jinja2.__version__},
        "conversations": CONVERSATIONS,
        "variables": VARS,
        "cases": cases,
        "snippets": snippets,
    }
    (DATA / "expected.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(cases)} template cases ({sum('error' in c for c in cases)} errors), {len(snippets)} snippets")


if __name__ == "__main__":
    main()
