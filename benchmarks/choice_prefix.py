"""Multiple choice, flattened rows against the shared context (jaxcls/shared_prefix.py): B examples
of R options, each row `context DELIM option` with the context (and delimiter) 4x as long as the
option. The flattened form runs B*R rows of the whole length; the shared form runs the context
once per example and only the options' tokens per row. Random weights, float32, random token ids.

    python -m benchmarks.choice_prefix                  # gpt2-small, 8 examples x 4 options, 128 + 32 tokens
    python -m benchmarks.choice_prefix --preset tiny    # a smoke run
    python -m benchmarks.choice_prefix --record         # also append the record to benchmarks/results.jsonl
    python -m benchmarks.choice_prefix --predictor      # also the Predictor end to end, shared_prefix on/off

Timed: the jitted forward (Choice logits) and, unless --no-train, the jitted loss and gradient of
every parameter (the train step's expensive part; the optimizer update is the same for both forms).
Each round times `--steps` calls of each form after a warm-up, the order alternating; the figure is
the median over rounds of each round's median, with min and max, and the speed-up per round. The
record also holds the largest logit difference between the two forms (they are equal up to float
rounding).

With --predictor, a third mode, "predictor", times `Predictor.logits` end to end on `--examples`
choice examples (fields in, logits out: encoding, batching, bucketing and the model calls) with
`shared_prefix=True` (a call takes the shared form when it runs fewer positions) and False; texts
are token ids written out, so no tokenizer files are needed. The record adds its largest logit
difference and each form's `tokens_run` (token positions run, padding included) for one call."""

import argparse
import sys

from benchmarks import system

COMMAND = "python -m benchmarks.choice_prefix"
PRESETS = {"gpt2-small": dict(size="gpt2-small", batch=8, option_len=32),
           "tiny": dict(size="tiny", batch=2, option_len=4)}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpt2-small")
    p.add_argument("--size", help="model preset (default: the --preset's)")
    p.add_argument("--batch", type=int, help="examples per call (default: the --preset's)")
    p.add_argument("--options", type=int, default=4)
    p.add_argument("--option-len", type=int, help="tokens per option (default: the --preset's)")
    p.add_argument("--context-ratio", type=int, default=4, help="context + delimiter = ratio x option tokens")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no-train", action="store_true", help="time the forward only")
    p.add_argument("--predictor", action="store_true", help="also time Predictor.logits with shared_prefix on/off")
    p.add_argument("--examples", type=int, default=None, help="examples per --predictor call (default: 4 x --batch)")
    p.add_argument("--threads", type=int, default=None, help="pin to the first N cores (read before jax imports)")
    p.add_argument("--record", action="store_true", help="append the record to --results")
    p.add_argument("--results", default=str(system.RESULTS))
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def choice_batch(batch: int, options: int, option_len: int, prefix_len: int, n_vocab: int, seed: int = 0):
    """Flattened rows (B*R, prefix_len + option_len): one random context ending in the delimiter per
    example, then a random option per row; every row full length, every option present."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = min(n_vocab - 1, 50256)
    context = rng.integers(0, vocab, (batch, 1, prefix_len))
    context[..., -1] = min(50256, n_vocab - 1)
    option = rng.integers(0, vocab, (batch, options, option_len))
    rows = np.concatenate([np.broadcast_to(context, (batch, options, prefix_len)), option], axis=-1)
    T = prefix_len + option_len
    return rows.reshape(batch * options, T).astype(np.int32), np.full(batch * options, T, np.int32)


def timed(fn, steps: int) -> float:
    import statistics
    import time

    import jax

    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build(args):
    """The two forms' jitted forward and loss-and-gradient functions, closed over one batch."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks import measure
    from jaxcls.model import GPT2Classifier
    from jaxcls.shared_prefix import shared_prefix_logits, split_rows
    from jaxcls.task import Choice

    cfg = measure.model_config(args.size).replace(dropout=0.0)
    model = GPT2Classifier(cfg, 1, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    task = Choice(args.options)
    ids, lengths = choice_batch(args.batch, args.options, args.option_len,
                                args.context_ratio * args.option_len, cfg.n_vocab)
    shared = jax.tree.map(jnp.asarray, split_rows(ids, lengths, args.options))
    ids, lengths = jnp.asarray(ids), jnp.asarray(lengths)
    labels, weights = jnp.zeros(args.batch, jnp.int32), jnp.ones(args.batch)

    def logits(p, form):
        m = nnx.merge(graphdef, p)
        if form == "shared":
            return shared_prefix_logits(m, task, shared)
        return task.logits_from_features(m.head, m.features(ids, lengths), lengths)

    def loss(p, form):
        total, weight = task.loss_terms(logits(p, form), labels, weights)
        return total / weight

    fwd = jax.jit(logits, static_argnums=1)
    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    return cfg, params, fwd, grad, shared


def predictor_mode(args, cfg, params):
    """(fn(params, form) -> the logits of `--examples` choice examples through a Predictor with
    shared_prefix on ("shared") or off ("flat"), the two Predictors). Each example has its own
    random context and options, as token ids written out in text."""
    from flax import nnx

    from jaxcls.infer.predictor import Predictor
    from jaxcls.model import GPT2Classifier
    from jaxcls.task import Choice

    model = GPT2Classifier(cfg, 1, rngs=nnx.Rngs(0))
    nnx.update(model, params)
    n = args.examples or 4 * args.batch
    ids, _ = choice_batch(n, args.options, args.option_len, args.context_ratio * args.option_len, cfg.n_vocab, seed=1)
    rows = ids.reshape(n, args.options, -1)
    words = lambda xs: " ".join(map(str, xs))  # noqa: E731
    split = args.context_ratio * args.option_len - 1  # the encoder adds the delimiter
    examples = [{"context": words(r[0, :split]), "choices": [words(o[split + 1:]) for o in r]} for r in rows]
    encode = lambda text: [int(t) for t in text.split()]  # noqa: E731
    preds = {form: Predictor(model, encode, task=Choice(args.options), batch_size=args.batch * args.options,
                             shared_prefix=form == "shared") for form in ("flat", "shared")}
    return (lambda _, form: preds[form].logits(examples)), preds


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import numpy as np

    info = system.system_info(args.threads)  # the load before the run
    cfg, params, fwd, grad, shared = build(args)
    diff = float(np.max(np.abs(np.asarray(fwd(params, "shared")) - np.asarray(fwd(params, "flat")))))
    modes = {"forward": fwd} if args.no_train else {"forward": fwd, "loss_and_grad": grad}
    if args.predictor:
        modes["predictor"], preds = predictor_mode(args, cfg, params)
        end_to_end = {"max_abs_logit_diff": float(np.max(np.abs(modes["predictor"](params, "shared")
                                                                - modes["predictor"](params, "flat")))),
                      "tokens_run": {form: p.stats.tokens_run for form, p in preds.items()}}  # one call each
    runs = {m: {"flat": [], "shared": []} for m in modes}
    for mode, fn in modes.items():
        for form in ("flat", "shared"):
            timed(lambda: fn(params, form), 1)  # compile and warm up
        for rnd in range(args.rounds):
            for form in (("flat", "shared") if rnd % 2 == 0 else ("shared", "flat")):
                runs[mode][form].append(timed(lambda: fn(params, form), args.steps))
    summary = {m: {f: system.spread(v) for f, v in r.items()} for m, r in runs.items()}
    speedup = {m: system.spread([a / b for a, b in zip(r["flat"], r["shared"])]) for m, r in runs.items()}
    T = args.context_ratio * args.option_len + args.option_len
    record = {"kind": "choice_prefix", "command": f"{COMMAND} {' '.join(sys.argv[1:] if argv is None else argv)}",
              "size": args.size, "dtype": "float32", "batch": args.batch, "options": args.options,
              "option_len": args.option_len, "prefix_len": int(shared.prefix_len[0]), "row_len": T,
              "rounds": args.rounds, "steps": args.steps, "max_abs_logit_diff": diff,
              "tokens_per_call": {"flat": args.batch * args.options * T,
                                  "shared": args.batch * (T - args.option_len + args.options * args.option_len)},
              "system_info": info, "runs": runs, "time_s": summary, "speedup": speedup}
    if args.predictor:
        record["predictor"] = end_to_end
    system.append_record(args.results if args.record else None, record, threads=args.threads)
    for mode in modes:
        s = summary[mode]
        print(f"{mode}: flattened {s['flat']['median'] * 1e3:.2f} ms, shared context "
              f"{s['shared']['median'] * 1e3:.2f} ms, speed-up {speedup[mode]['median']:.2f}x "
              f"({speedup[mode]['min']:.2f}-{speedup[mode]['max']:.2f}) over {args.rounds} rounds")
    if args.predictor:
        print(f"predictor: max |logit difference| {end_to_end['max_abs_logit_diff']:.2e}")
    print(f"max |logit difference| {diff:.2e}" + (f"; recorded in {args.results}" if args.record else ""))
    return record


if __name__ == "__main__":
    system.pin_threads_from_argv(sys.argv)
    main()
