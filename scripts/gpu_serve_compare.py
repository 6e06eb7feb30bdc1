#!/usr/bin/env python3
"""Serves one checkpoint on two devices in turn (`fineserve serve --device A`, then `--device B`, each
on a free loopback port), sends the same N concurrent greedy /generate requests to each, and
compares the generated token ids one for one. Python standard library only.

    python3 scripts/gpu_serve_compare.py --fineserve build/fineserve --model tests/data/golden/opt-preln \
        --devices cuda cpu --requests 20 --out serve_compare.json

Exit status: 0 when every request produced the same tokens on both devices, 1 otherwise (the JSON
then names each divergent request, the first position that differs and both sides' logprobs there,
so a near-tie between two tokens can be told from a wrong kernel).
"""
import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

PROMPTS = [
    "In the beginning", "The capital of France is", "Once upon a time there was", "1, 2, 3, 4,",
    "The quick brown fox", "Hello, my name is", "def fibonacci(n):", "The weather today is",
    "She opened the door and", "Water boils at", "A list of fruits: apple,", "The meaning of life is",
    "In 1492, Columbus", "To be or not to be", "The best way to learn is", "Dear Sir or Madam,",
    "Large language models", "The cat sat on the", "Yesterday I went to", "import numpy as np",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status


def post(url, body, timeout):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def run_device(a, device, log):
    port = free_port()
    cmd = [a.fineserve, "serve", "--model", a.model, "--device", device, "--host", "127.0.0.1", "--port", str(port),
           "--max-seqs", str(max(a.requests, 1))]
    print(f"[{device}] {' '.join(cmd)}", flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + a.startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{device}: the server exited with status {proc.returncode} before it was ready")
            try:
                if get(base + "/ready") == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.time() > deadline:
                raise RuntimeError(f"{device}: not ready after {a.startup_timeout} s")
            time.sleep(0.2)
        ready_s = time.time() - t0

        def one(i):
            body = {"inputs": PROMPTS[i % len(PROMPTS)],
                    "parameters": {"max_new_tokens": a.max_new_tokens, "details": True, "do_sample": False}}
            r = post(base + "/generate", body, a.request_timeout)
            toks = r["details"]["tokens"]
            return {"ids": [t["id"] for t in toks], "logprobs": [t.get("logprob") for t in toks],
                    "text": r.get("generated_text", "")}

        t1 = time.time()
        with concurrent.futures.ThreadPoolExecutor(max_workers=a.requests) as ex:
            results = list(ex.map(one, range(a.requests)))
        return {"device": device, "ready_s": round(ready_s, 2), "requests_s": round(time.time() - t1, 2),
                "results": results}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fineserve", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--devices", nargs=2, default=["cuda", "cpu"], metavar=("A", "B"))
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--startup-timeout", type=float, default=120)
    ap.add_argument("--request-timeout", type=float, default=120)
    ap.add_argument("--log-dir", default=".", help="where each server's log goes")
    ap.add_argument("--out", help="JSON result path")
    a = ap.parse_args()

    runs = []
    for device in a.devices:
        with open(os.path.join(a.log_dir, f"serve_{device.replace(':', '_')}.log"), "w") as log:
            runs.append(run_device(a, device, log))
    ra, rb = runs
    divergent = []
    for i, (x, y) in enumerate(zip(ra["results"], rb["results"])):
        if x["ids"] == y["ids"]:
            continue
        pos = next((j for j, (p, q) in enumerate(zip(x["ids"], y["ids"])) if p != q), min(len(x["ids"]), len(y["ids"])))
        pick = lambda r: {"id": r["ids"][pos] if pos < len(r["ids"]) else None,
                          "logprob": r["logprobs"][pos] if pos < len(r["logprobs"]) else None}
        divergent.append({"request": i, "prompt": PROMPTS[i % len(PROMPTS)], "first_difference": pos,
                          a.devices[0]: pick(x), a.devices[1]: pick(y)})
    summary = {"model": a.model, "devices": a.devices, "requests": a.requests, "max_new_tokens": a.max_new_tokens,
               "identical": a.requests - len(divergent), "divergent": divergent,
               "timing_s": {r["device"]: {"ready": r["ready_s"], "requests": r["requests_s"]} for r in runs},
               "tokens": {r["device"]: [x["ids"] for x in r["results"]] for r in runs}}
    print(f"{summary['identical']}/{a.requests} requests generated identical tokens on {a.devices[0]} and {a.devices[1]}")
    for d in divergent:
        print(f"  request {d['request']} ({d['prompt']!r}) differs at token {d['first_difference']}: "
              f"{a.devices[0]} {d[a.devices[0]]} vs {a.devices[1]} {d[a.devices[1]]}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=1)
    return 0 if not divergent else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # a server that never came up, a failed request: say so, exit 1
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
