"""The help text of every `jaxcls train` flag, by --help group: kept apart from the command so
that the command reads in one screen."""

from __future__ import annotations

# Every field of SPECS, by --help group; a field left out here fails test_every_option_has_help_text_and_its_default.
GROUPS: dict[str, dict[str, str]] = {
    "data": {
        "data": "sms-spam (the book's data set, downloaded on first use), imdb (the book's bonus IMDB "
                "reviews, 35,000/5,000/10,000), or a CSV/TSV/JSONL file of "
                "texts and labels, split 70/10/20 (--split) by --seed, stratified by label, unless "
                "--validation/--test are given",
        "data_path": "--data sms-spam or imdb only: a local SMSSpamCollection, its zip or folder; or "
                     "aclImdb_v1.tar.gz or its folder (default: downloaded into the cache)",
        "validation": "a validation file; with --validation or --test, --data is used whole for "
                      "training (default: the seeded split of --data)",
        "test": "a test file, scored once at the end (default: the seeded split of --data)",
        "text_column": 'the column or JSON key holding the text (default: the one named "text", any case)',
        "label_column": 'the column or JSON key holding the label (default: the one named "label", any case)',
        "task": "single | multilabel | regression | pair | pair-multilabel | pair-regression | similarity | "
                "similarity-multilabel | similarity-regression | choice (docs/tasks.md)",
        "pair_column": 'pair and similarity tasks: the second text\'s column (default: "text_pair")',
        "context_column": 'choice: the context\'s column (default: "context")',
        "question_column": 'choice: an optional question column, appended to the context (default: "question")',
        "choices_column": 'choice: the column holding a JSON list of options (default: "choices")',
        "choice_columns": "choice: option columns instead of a list, e.g. ending0,ending1,ending2,ending3",
        "label_separator": "multilabel CSV/TSV: the separator between label names in one field (or write a "
                           "JSON list)",
        "split": "train,validation,test fractions of a --data file without --validation/--test: three "
                 "non-negative numbers summing to 1, e.g. 0.8,0.2,0 (no test split); each label keeps its "
                 "share in every split (multilabel: each row's rarest label; regression and choice: random)",
        "delimiter": "what joins the two parts of a pair, similarity or choice row (default: GPT-2's "
                     "<|endoftext|> token)",
    },
    "model": {
        "checkpoint": "the pretrained GPT-2 to start from: a checkpoint folder (OpenAI or Hugging Face), "
                      "a released size (gpt2-small/124M, gpt2-medium/355M, gpt2-large/774M, gpt2-xl/1558M; "
                      "downloaded on first use), or tiny/mini (random-init presets)",
        "weights": "pretrained | random (the checkpoint's shape, freshly initialized)",
        "pooling": "token(s) the head reads: last_real (the last non-padding token) | last (the book: "
                   "the last padded position) | first | mean (over real tokens)",
        "trainable": "head (book: last_layer) | last_block | last_two_blocks | last_k_blocks:K | all | "
                     "lora | adapters (bottleneck adapters and the head) | a regex over parameter paths",
        "lora_rank": "LoRA rank, with --trainable lora",
        "lora_alpha": "LoRA alpha, with --trainable lora (book: the update is scaled by alpha; peft: by "
                      "alpha / rank)",
        "lora_style": "with --trainable lora: book (appendix E: separate query/key/value adapters, adapters "
                      "on every linear and the frozen head) | peft (Hugging Face PEFT's GPT-2 default: one "
                      "adapter on c_attn, the head trained fully); docs/lora.md",
        "adapter_size": "bottleneck width of each adapter, with --trainable adapters (two per block: after "
                        "the attention and after the MLP; docs/lora.md)",
        "head": "the classification head: linear (the book) | mlp:HIDDEN (Linear, ReLU, dropout, Linear; "
                "e.g. mlp:256, usually with --trainable head)",
        "head_dropout": "dropout between an MLP head's two layers while training",
        "causal": "causal attention mask; --no-causal attends over all real tokens",
        "dropout": "dropout rate while training (disables the frozen-prefix cache)",
        "dtype": "compute dtype: auto (bfloat16 where the device runs it faster: GPU, TPU, a CPU with AMX "
                 "and jaxcls[amx]; else float32) | float32 | bfloat16 | float16 (parameters, optimizer "
                 "state and loss stay float32)",
    },
    "training loop": {
        "epochs": "passes over the training split",
        "batch_size": "training examples per step (the book's 8; this changes the result, while "
                      "classify/eval/serve's --batch-size only changes speed)",
        "accumulation": "micro-batches of --batch-size per optimizer update",
        "lr": "AdamW learning rate",
        "weight_decay": "AdamW weight decay",
        "schedule": "learning-rate schedule: constant | cosine",
        "warmup_steps": "linear warm-up steps before the schedule",
        "clip_norm": "clip gradients to this global norm (default: no clipping)",
        "class_weights": "loss weight per class: none | balanced | w0,w1,...",
        "label_smoothing": "cross-entropy label smoothing, in [0, 1)",
        "pos_weight": "multilabel: loss weight of each label's positives: none | auto (negatives/positives) | w1,w2,...",
        "thresholds": "multilabel: decision threshold of every label (0.5), or 'tune': per label, the best F1 "
                      "on the validation split, saved with the model",
        "standardize": "regression: train on standardised targets (mean 0, std 1 on the training split; "
                       "predictions are in the targets' units)",
        "seed": "seed of the head's initialization, the shuffles, and the split of a single --data file",
        "eval_freq": "steps between validation estimates in the log",
        "eval_iter": "batches per validation estimate",
        "keep_best": "keep the parameters of the epoch with the best --monitor (default: the lowest validation loss)",
        "early_stop_patience": "stop after this many epochs whose validation --monitor did not improve by more "
                               "than --min-delta, keeping the best epoch's parameters (default: off)",
        "monitor": "what --keep-best and --early-stop-patience compare, on the whole validation split at each "
                   "epoch's end: val_loss | val_accuracy (single, choice) | val_macro_f1 (single, multilabel)",
        "min_delta": "an improvement of --monitor is one by more than this",
        "drop_last": "drop the last partial training batch, as the book does",
        "max_steps": "stop after this many steps (default: no limit)",
        "padding": "auto | longest (the book) | context | buckets | none | N",
        "batching": "with length buckets: auto (global when the frozen prefix is cached, else buckets) | "
                    "buckets (each batch from one length bucket: least padding) | global (the book's "
                    "shuffle, each batch padded to the bucket of its longest text)",
        "cache": "reuse frozen-prefix activations across epochs (exact; never for lora/all/dropout)",
        "cache_budget_mb": "host memory (MiB) the frozen-prefix cache may take; over it, the cache spills to a "
                           "memory-mapped file in --cache-dir (or the run folder)",
        "cache_dtype": "cached states stored as auto (the compute dtype) | float32 (exact) | bfloat16 "
                       "(half the memory)",
        "cache_memory": "host | device: keep cached states in device memory (one device), so batches are "
                        "built there",
        "cache_dir": "folder for a frozen-prefix cache over --cache-budget-mb (default: the run folder, --out)",
        "keep_cache": "keep a spilled cache's file (prefix-cache-*.bin, described by prefix-cache.json) after the run",
        "compilation_cache": "keep compiled programs in this folder so the next run starts faster "
                             "(a folder only you can write; default: $JAXCLS_HOME/compilation-cache, "
                             "at most 2 GiB, least recently used programs evicted first)",
    },
    "output": {
        "out": "run folder: the saved classifier (pass it to classify/eval/serve as --model), metrics, "
               "curves, resumable state (default: runs/<name of --data>)",
        "save_every": "steps between resumable train-state saves",
        "save_full": "save every weight, not only the trained ones and the base checkpoint's path",
    },
    "devices and hosts (see docs/scaling.md)": {
        "data_parallel": "split each batch over all devices (and processes)",
        "fsdp": "also shard large parameters and their optimizer state over the devices",
    },
}
