"""Reports of a throughput record: a Markdown table and a bar chart."""

from __future__ import annotations


def _fmt(x, digits=2):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def markdown(record: dict) -> str:
    """A Markdown report of one record: training and inference per system, ratios to jaxcls."""
    s, a = record["system_info"], record["args"]
    lines = [f"# jaxcls throughput: {a['size']}, {a['dtype']}, trainable={a['trainable']}, "
             f"batch {a['batch']} x {a['seq_len']} tokens", "",
             f"- date: {s['date']}; device: {s['platform']} / {s['device_kind']} x{s['device_count']}; "
             f"CPU: {s.get('cpu_kind') or s['cpu_model']} ({s['cpu_count']} logical cores); threads: {s['threads']}; "
             f"load average at start {s.get('load_average') or s.get('load_average_1m')}, at end {s.get('load_average_end')}",
             f"- jax {s['jax']}, jaxlib {s['jaxlib']}, flax {s['flax']}, optax {s['optax']}, python {s['python']}"]
    peers = record.get("peers") or {}
    if peers.get("info"):
        i = peers["info"]
        lines.append(f"- torch {i.get('torch_version')} ({i.get('num_threads')} threads, "
                     f"{i.get('cpu_capability')}), transformers {i.get('transformers_version')}")
    lines.append(f"- command: `{record['command']}`")
    pk = record["peak"]
    lines.append(f"- measured peak: {pk['measured_flops_per_s'] / 1e9:,.1f} GFLOP/s ({pk['probe']})"
                 + (f"; datasheet {pk['datasheet_flops_per_s'] / 1e12:,.0f} TFLOP/s"
                    if pk.get("datasheet_flops_per_s") else ""))
    lines += ["", "## Training step (steady state, median)", "",
              "| system | ex/s | tokens/s | step (s) | first step incl. compile (s) | GFLOP/step | "
              "achieved GFLOP/s | MFU (measured peak) | vs jaxcls | peak RSS (MiB) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = record["train"]["examples_per_s"]
    rows = [record["train"]] + ([record["train_cached"]] if record.get("train_cached") else [])
    rows += peers.get("train", [])
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['system']} | failed: {r['error'][:80]} | | | | | | | | |")
            continue
        first = r.get("compile_s", 0) + r["first_step_s"] if "first_step_s" in r else r.get("warmup_s")
        ach = r.get("achieved_flops_per_s")
        mfu = ach / pk["measured_flops_per_s"] if ach else None
        note = " (different work: skips the frozen blocks)" if r.get("cached_prefix") else ""
        lines.append(f"| {r['system']}{note} | {_fmt(r['examples_per_s'])} | {_fmt(r['tokens_per_s'], 0)} | "
                     f"{_fmt(r['step_time_s_median'], 3)} | {_fmt(first, 1)} | "
                     f"{_fmt(r['flops_per_step'] / 1e9 if r.get('flops_per_step') else None, 1)} | "
                     f"{_fmt(ach / 1e9 if ach else None, 1)} | {_fmt(100 * mfu if mfu else None, 1)}% | "
                     f"{_fmt(r['examples_per_s'] / base)}x | {_fmt(r.get('peak_rss_mb'), 0)} |")
    lines.append("")
    lines += _fastest_train(record["train"], peers.get("train", []))
    lines.append("For peers, the first-step column is torch's warm-up time (all warm-up steps, "
                 "torch.compile included); for jaxcls it is lower+compile plus the first call.")
    if record.get("infer"):
        batches = [r["batch"] for r in record["infer"]]
        lines += ["", "## Inference (examples/s; ratio to jaxcls in parentheses)", "",
                  "| system | " + " | ".join(f"batch {b}" for b in batches) + " |",
                  "|---|" + "---:|" * len(batches)]
        base_i = {r["batch"]: r["examples_per_s"] for r in record["infer"]}
        lines.append("| jaxcls (jit) | " + " | ".join(_fmt(base_i[b]) for b in batches) + " |")
        systems = []
        for r in peers.get("infer", []):
            if r["system"] not in systems:
                systems.append(r["system"])
        for name in systems:
            cells = []
            for b in batches:
                r = next((x for x in peers["infer"] if x["system"] == name and x["batch"] == b), None)
                if r is None or "error" in r:
                    cells.append("–" if r is None else "failed")
                else:
                    cells.append(f"{_fmt(r['examples_per_s'])} ({_fmt(r['examples_per_s'] / base_i[b])}x)")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        comp = ", ".join(f"batch {r['batch']}: {r['compile_s']:.1f}" for r in record["infer"])
        lines.append("")
        lines.append(f"jaxcls predictor compile (s): {comp}.")
        lines += _fastest_infer(record["infer"], peers.get("infer", []))
    e2e = record.get("e2e") or []
    if e2e:
        lines += ["", "## End to end: the book's run (5 epochs, batch 8, eval every 50 steps), random init", "",
                  "| system | variant | steps | training loop (s) | total (s) | test accuracy |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in e2e:
            if r.get("estimate"):
                fast = " (the fastest peer)" if r.get("fastest") else ""
                final = r.get("final_eval_system", r["system"])
                how = "" if final == r["system"] else f"; final evaluation as {final}"
                lines.append(f"| {r['system']}{fast} | ESTIMATE from steady-state step times{how} | {r['steps']} | "
                             f"{_fmt(r.get('train_loop_s'), 0)} | {_fmt(r.get('total_s'), 0)} | not run |")
            else:
                acc = r.get("test_accuracy")
                lines.append(f"| {r['system']} | {r['variant']} | {r['steps']} | {_fmt(r['train_loop_s'], 1)} | "
                             f"{_fmt(r['total_s'], 1)} | {_fmt(100 * acc if acc is not None else None, 1)}% |")
        if record.get("e2e_accuracy_difference") is not None:
            lines.append("")
            lines.append(f"Test accuracy, default minus uncached: "
                         f"{100 * record['e2e_accuracy_difference']:+.1f} points (same seed, random init).")
    return "\n".join(lines) + "\n"


def _quickest(rows: list[dict]) -> dict | None:
    ok = [r for r in rows if "error" not in r and r.get("step_time_s_median")]
    return min(ok, key=lambda r: r["step_time_s_median"]) if ok else None


def _fastest_train(ours: dict, peers: list[dict]) -> list[str]:
    """The line that compares jaxcls with the quickest peer configuration, whatever its dtype."""
    best = _quickest(peers)
    if best is None:
        return []
    ratio = best["step_time_s_median"] / ours["step_time_s_median"]
    return [f"Fastest peer configuration (training): {best['system']}, {best['step_time_s_median']:.3f} s/step; "
            f"jaxcls ({ours.get('dtype', 'float32')}) runs {ratio:.2f}x its speed.", ""]


def _fastest_infer(ours: list[dict], peers: list[dict]) -> list[str]:
    lines = []
    for r in ours:
        best = _quickest([p for p in peers if p.get("batch") == r["batch"]])
        if best is not None:
            lines.append(f"Fastest peer configuration (inference, batch {r['batch']}): {best['system']}; "
                         f"jaxcls runs {r['examples_per_s'] / best['examples_per_s']:.2f}x its speed.")
    return [""] + lines if lines else []


def plot(record: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        return f"no plot: {e}"
    train = [r for r in [record["train"], record.get("train_cached")] + (record.get("peers") or {}).get("train", [])
             if r and "examples_per_s" in r]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    axes[0].barh([r["system"] for r in train], [r["examples_per_s"] for r in train])
    axes[0].set_xlabel("training examples/s")
    axes[0].set_title(f"train step, {record['args']['trainable']}")
    infer = [dict(r, system="jaxcls") for r in record.get("infer", [])]
    infer += [r for r in (record.get("peers") or {}).get("infer", []) if "examples_per_s" in r]
    systems = list(dict.fromkeys(r["system"] for r in infer))
    batches = sorted({r["batch"] for r in infer})
    width = 0.8 / max(len(systems), 1)
    for j, name in enumerate(systems):
        ys = [next((r["examples_per_s"] for r in infer if r["system"] == name and r["batch"] == b), 0)
              for b in batches]
        axes[1].bar([i + j * width for i in range(len(batches))], ys, width, label=name)
    axes[1].set_xticks([i + 0.4 - width / 2 for i in range(len(batches))], [f"batch {b}" for b in batches])
    axes[1].set_ylabel("inference examples/s")
    axes[1].legend(fontsize=8)
    a = record["args"]
    fig.suptitle(f"{a['size']} {a['dtype']}, {a['seq_len']} tokens, {record['system_info']['device_kind']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None

