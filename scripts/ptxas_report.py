#!/usr/bin/env python3
"""Turns `ptxas -v` output (nvcc -Xptxas -v) into a per-kernel table: registers, spill stores and
loads, stack frame, static shared memory, barriers. Exits 1 when a "hot" kernel (--hot, a regex on
the demangled name) spills registers to local memory.

    python3 scripts/ptxas_report.py --hot 'gemv_kernel|tc_kernel' --md table.md --tsv table.tsv [SOURCE=]LOG...

A LOG may also be a Ninja build log of nvcc compiles with -Xptxas -v: "Building CUDA object" lines
name the source of the ptxas output that follows them.

Dynamic shared memory (extern __shared__, sized at launch) does not appear in ptxas output.
"""
import argparse
import re
import shutil
import subprocess
import sys

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
PROPS = re.compile(r"Function properties for (\S+)")
SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")
SMEM = re.compile(r"(\d+) bytes smem")
BARRIERS = re.compile(r"used (\d+) barriers")
NINJA_CU = re.compile(r"Building CUDA object \S*?([\w.-]+\.cu)\.o")  # a build log: which file follows


def parse(path, source):
    kernels = {}  # (arch, mangled) -> dict
    current = None
    props_for = None
    with open(path, errors="replace") as f:
        for line in f:
            m = NINJA_CU.search(line)
            if m:
                source = m.group(1)
                continue
            m = ENTRY.search(line)
            if m:
                current = (m.group(2), m.group(1))
                kernels.setdefault(current, {"arch": m.group(2), "mangled": m.group(1), "source": source})
                continue
            m = PROPS.search(line)
            if m:
                props_for = m.group(1)
                continue
            m = SPILL.search(line)
            if m and current and props_for == current[1]:
                k = kernels[current]
                k["stack"], k["spill_stores"], k["spill_loads"] = (int(m.group(i)) for i in (1, 2, 3))
                continue
            m = USED.search(line)
            if m and current:
                k = kernels[current]
                k["registers"] = int(m.group(1))
                s = SMEM.search(line)
                k["smem"] = int(s.group(1)) if s else 0
                b = BARRIERS.search(line)
                k["barriers"] = int(b.group(1)) if b else 0
    return list(kernels.values())


def demangle(names):
    tool = shutil.which("c++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def short(name):
    """fineserve::cuda::(anonymous namespace)::tc_kernel<__half, 4>(Args) -> tc_kernel<__half, 4>"""
    name = name.replace("(anonymous namespace)::", "")
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # drop the parameter list: the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    name = name[:cut]
    for prefix in ("void ", "fineserve::cuda::", "fineserve::"):
        name = name.replace(prefix, "")
    return name


SAMPLE = """ptxas info    : Compiling entry function '_Z9hot_kernelPf' for 'sm_90a'
ptxas info    : Function properties for _Z9hot_kernelPf
    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem, 360 bytes cmem[0]
ptxas info    : Compiling entry function '_Z10cold_kernelPf' for 'sm_90a'
ptxas info    : Function properties for _Z10cold_kernelPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 360 bytes cmem[0]
"""


def self_test():
    """The parser on a known sample: the spilling hot kernel is caught, the cold one is not."""
    import os
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(SAMPLE)
    try:
        ks = {k["mangled"]: k for k in parse(f.name, "sample.cu")}
    finally:
        os.unlink(f.name)
    hot, cold = ks["_Z9hot_kernelPf"], ks["_Z10cold_kernelPf"]
    assert (hot["registers"], hot["spill_stores"], hot["spill_loads"], hot["stack"], hot["smem"], hot["barriers"]) == (
        255, 8, 4, 8, 1024, 1), hot
    assert (cold["registers"], cold["spill_stores"], cold["spill_loads"], cold["smem"]) == (32, 0, 0, 0), cold
    assert short("void fineserve::cuda::(anonymous namespace)::tc_kernel<__half, 4>(fineserve::cuda::Args)") == \
        "tc_kernel<__half, 4>"
    print("ptxas_report self-test: ok")
    return 0


def main():
    if sys.argv[1:] == ["--self-test"]:
        return self_test()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", help="ptxas -v output; SOURCE=PATH names the source file")
    ap.add_argument("--hot", default="", help="regex: kernels that must not spill")
    ap.add_argument("--md", help="write the Markdown table here")
    ap.add_argument("--tsv", help="write a TSV table here")
    a = ap.parse_args()

    kernels = []
    for spec in a.logs:
        source, _, path = spec.rpartition("=")
        kernels += parse(path, source or path)
    for k, d in zip(kernels, demangle([k["mangled"] for k in kernels])):
        k["name"] = short(d)
    hot = re.compile(a.hot) if a.hot else None
    kernels.sort(key=lambda k: (k["arch"], k["source"], k["name"]))

    cols = ["arch", "source", "kernel", "registers", "spill stores", "spill loads", "stack", "smem", "barriers", "hot"]
    rows = []
    bad = []
    for k in kernels:
        is_hot = bool(hot and hot.search(k["name"]))
        spills = k.get("spill_stores", 0) + k.get("spill_loads", 0)
        if is_hot and spills:
            bad.append(k)
        rows.append([k["arch"], k["source"], k["name"], k.get("registers", "?"), k.get("spill_stores", "?"),
                     k.get("spill_loads", "?"), k.get("stack", "?"), k.get("smem", "?"), k.get("barriers", "?"),
                     "yes" if is_hot else ""])
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    text = "\n".join(md) + "\n"
    print(text, end="")
    if a.md:
        with open(a.md, "w") as f:
            f.write("# ptxas report (static shared memory only; dynamic shared memory is sized at launch)\n\n" + text)
    if a.tsv:
        with open(a.tsv, "w") as f:
            f.write("\t".join(cols) + "\n" + "".join("\t".join(str(c) for c in r) + "\n" for r in rows))
    if not kernels:
        print("error: no kernels found in the ptxas output", file=sys.stderr)
        return 1
    if hot and not any(hot.search(k["name"]) for k in kernels):
        print(f"error: no kernel matches the hot pattern {a.hot!r}", file=sys.stderr)
        return 1
    for k in bad:
        print(f"error: hot kernel {k['name']} ({k['arch']}) spills: {k['spill_stores']} bytes stored, "
              f"{k['spill_loads']} bytes loaded", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
