"""`jaxcls download` and `jaxcls generate`: fetch OpenAI's files; check that weights loaded right."""

from __future__ import annotations

from jaxcls.cli.common import MODEL_HINT, wrong_flag


def register(sub) -> None:
    p = sub.add_parser("download", help="fetch GPT-2 checkpoint files into the cache")
    p.add_argument("names", nargs="+", metavar="SIZE",
                   help="gpt2-small/124M, gpt2-medium/355M, gpt2-large/774M, gpt2-xl/1558M; "
                        "with --source hf also a Hub name (ORG/NAME, hf://ORG/NAME@REV)")
    p.add_argument("--source", choices=("openai", "hf"), default="openai",
                   help="openai: OpenAI's TensorFlow files into jaxcls's cache (default); hf: the "
                        "Hub's model.safetensors into the Hugging Face cache (needs jaxcls[hub])")
    p.add_argument("--cache-dir", default=None,
                   help="default: $JAXCLS_HOME or ~/.cache/jaxcls (openai); $HF_HUB_CACHE, "
                        "$HF_HOME/hub or ~/.cache/huggingface/hub (hf)")
    p.add_argument("--base-url", default=None,
                   help="default: $JAXCLS_BASE_URL or OpenAI's public bucket (openai); "
                        "$HF_ENDPOINT or huggingface.co (hf)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("generate", help="greedy text generation, to check that weights loaded right")
    p.add_argument("prompt", help="the text to continue")
    p.add_argument("--checkpoint", default="gpt2-small",
                   help="a pretrained GPT-2: checkpoint folder or released size (downloaded on first use)")
    p.add_argument("--max-new-tokens", type=int, default=15, help="tokens to generate")
    p.add_argument("--verify", action="store_true", help="check each tensor's crc32c (OpenAI files)")
    wrong_flag(p, "--model", MODEL_HINT)
    p.set_defaults(func=cmd_generate)


def cmd_download(args) -> int:
    from jaxcls.ckpt.download import download_checkpoint

    if args.source == "hf":
        from jaxcls.ckpt.hub import download_hub

        for name in args.names:
            print(download_hub(name, cache_dir=args.cache_dir, endpoint=args.base_url,
                               progress=not args.quiet))
        return 0
    for name in args.names:
        folder = download_checkpoint(name, cache_dir=args.cache_dir, base_url=args.base_url,
                                              progress=not args.quiet)
        print(folder)
    return 0


def cmd_generate(args) -> int:
    from jaxcls.generate import generate_greedy
    from jaxcls.ckpt.load import load_pretrained, load_tokenizer
    from jaxcls.tokenizer import encode

    model = load_pretrained(args.checkpoint, verify=args.verify)
    enc = load_tokenizer(args.checkpoint)
    ids = generate_greedy(model, encode(enc, args.prompt), args.max_new_tokens)
    print(enc.decode(ids))
    return 0
