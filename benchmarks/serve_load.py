"""`jaxcls serve` under load: requests/s and p50/p99 latency at 1, 8 and 64 concurrent clients,
each request one text, with dynamic batching on (`--max-batch-delay-ms`, default 2) and off (0:
each request alone), against the predictor's own offline throughput on the same texts.

    .venv/bin/python -m benchmarks.serve_load --size gpt2-small          # from the repo root

The texts are the SMS collection's (../shared) when present, else generated sentences; the
classifier is a random one of the preset's shape (speed does not depend on the weights). The
server runs in this process, as `jaxcls serve` runs it (same row buckets, limits and warm-up);
the clients run in a separate process (threads with http.client), so they do not share the
server's interpreter lock. Each (mode, clients) cell sends `--requests-per-client` requests per
client after a short warm-up. Prints a Markdown table and appends a JSON record (system info
included) to benchmarks/results.jsonl. Never asserts a speed."""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks import system


def _client_run(address, texts: list[str], clients: int, n: int) -> dict:
    """In the client process: `n` requests over `clients` threads; wall time and latencies."""

    def one(i):
        conn = http.client.HTTPConnection(*address, timeout=120)
        body = json.dumps({"text": texts[i % len(texts)]})
        t0 = time.perf_counter()
        conn.request("POST", "/classify", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        return resp.status, time.perf_counter() - t0

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        out = list(pool.map(one, range(n)))
    return {"seconds": time.perf_counter() - start, "latencies": [t for _, t in out],
            "errors": sum(status != 200 for status, _ in out)}


def load_texts(n: int = 1000) -> tuple[list[str], str]:
    if system.DEFAULT_SMS.exists():
        with open(system.DEFAULT_SMS, encoding="utf-8", errors="replace") as f:
            texts = [line.rstrip("\n").split("\t", 1)[-1] for line in f][:n]
        return texts, f"SMS collection, first {len(texts)} texts"
    words = "call me now free prize lunch tomorrow meeting win cash text reply stop".split()
    return [" ".join(words[(i * 7 + k) % len(words)] for k in range(5 + i % 20)) for i in range(n)], "generated"


def offline(predictor, texts, repeats: int) -> float:
    """Texts/s of predictor.predict on all the texts at once (warm), median of `repeats`."""
    predictor.predict(texts)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predictor.predict(texts)
        times.append(time.perf_counter() - t0)
    return len(texts) / statistics.median(times)


def measure(srv, pool, texts, clients: int, n: int) -> dict:
    from benchmarks.serve_load import _client_run  # picklable by name in the client process

    def batches():
        reg = srv.service.metrics.registry
        return reg.get_sample_value("jaxcls_batch_texts_count"), reg.get_sample_value("jaxcls_batch_texts_sum")

    pool.apply(_client_run, (srv.address, texts, clients, min(n, 2 * clients)))  # warm-up
    calls0, texts0 = batches()
    r = pool.apply(_client_run, (srv.address, texts, clients, n))
    calls, ran = batches()
    lat = sorted(r["latencies"])
    return {"clients": clients, "requests": n, "errors": r["errors"], "seconds": r["seconds"],
            "requests_per_s": n / r["seconds"], "p50_ms": 1000 * lat[len(lat) // 2],
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "texts_per_model_call": (ran - texts0) / max(calls - calls0, 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="gpt2-small", help="model preset (tiny for a smoke run)")
    p.add_argument("--clients", default="1,8,64", help="concurrent clients, comma-separated")
    p.add_argument("--requests-per-client", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32, help="the predictor's rows per batch")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-batch-delay-ms", type=float, default=2.0, help="the batching-on setting")
    p.add_argument("--texts", type=int, default=1000, help="how many texts to cycle through")
    p.add_argument("--repeats", type=int, default=3, help="offline throughput: median of this many")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--results", default=str(system.RESULTS))
    args = p.parse_args(argv)

    from jaxcls.classifier import Classifier
    from jaxcls.infer.serve import make_server

    threads = args.threads or system.usable_cores()
    info = system.system_info(threads)
    texts, source = load_texts(args.texts)
    clf = Classifier.from_pretrained(args.size, label_names=["ham", "spam"], weights="random",
                                     tokenizer=system.DEFAULT_TOKENIZER)
    rows_b = tuple(sorted({1, min(8, args.batch_size), args.batch_size}))  # as `jaxcls serve`
    predictor = clf.predictor(batch_size=args.batch_size, row_buckets=rows_b)
    t0 = time.perf_counter()
    predictor.warmup()
    compile_s = time.perf_counter() - t0
    offline_tps = offline(predictor, texts, args.repeats)
    rows = []
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        for delay in (args.max_batch_delay_ms, 0.0):
            with make_server(clf, predictor=predictor, warmup=False, max_batch_size=args.max_batch_size,
                             max_batch_delay_ms=delay, max_connections=1024) as srv:
                for c in (int(x) for x in args.clients.split(",")):
                    row = measure(srv, pool, texts, c, c * args.requests_per_client)
                    row["mode"] = f"batching on ({delay:g} ms)" if delay else "batching off"
                    rows.append(row)
                    print(f"{row['mode']}, {c} clients: {row['requests_per_s']:.1f} req/s", file=sys.stderr)
    print(f"jaxcls serve, {args.size} (random weights), one text per request ({source}), "
          f"{threads} threads, {info['cpu_kind']}; predictor batch {args.batch_size}, rows {rows_b}; "
          f"compiled in {compile_s:.1f}s; offline Predictor.predict: {offline_tps:.1f} texts/s\n")
    print("| mode | clients | requests | req/s | p50 ms | p99 ms | texts per model call | errors |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['mode']} | {r['clients']} | {r['requests']} | {r['requests_per_s']:.1f} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['texts_per_model_call']:.1f} | {r['errors']} |")
    record = {"kind": "serve_load", "command": "python -m benchmarks.serve_load "
              + " ".join(sys.argv[1:] if argv is None else argv), "size": args.size, "texts": source,
              "batch_size": args.batch_size, "row_buckets": list(rows_b), "max_batch_size": args.max_batch_size,
              "compile_s": compile_s, "offline_texts_per_s": offline_tps, "rows": rows,
              "date": time.strftime("%Y-%m-%d"), "system_info": info}
    system.append_record(args.results, record, threads=threads)
    return record


if __name__ == "__main__":
    system.pin_threads_from_argv(sys.argv)
    main()
