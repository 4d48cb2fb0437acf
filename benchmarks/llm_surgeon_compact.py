"""LLM Surgeon structured results with the zeros left in place vs stored compacted (`hf_prune.compact_zeros`).

Head and channel surgery removes only whole query/kv head groups and MLP channels; LLM Surgeon also zeroes query and
key rows inside heads, single value/output dimensions and residual-stream rows and columns. `compact_zeros` stores
every projection without its zero rows and columns (CompactLinear: an index gather before and a scatter after a
smaller matmul). This benchmark runs one structured Surgeon trajectory on SmolLM2-135M-Instruct and, after each shot
whose target is in --targets, measures the model with zeros in place and compacted: parameters, safetensors size,
perplexity (must be equal) and greedy decode speed at batch 1 and 8 against the dense model (dense, in place and
compacted measured in alternation, best of --speed-repeats). JSON and Markdown go to benchmarks/results/.

    python benchmarks/llm_surgeon_compact.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from llm_surgeon import environment  # noqa: E402
from slicing import decode_seconds  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--targets", default="0.1,0.2,0.3")
    p.add_argument("--shots", type=int, default=3)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--damping-g", type=float, default=None)
    p.add_argument("--damping-a", type=float, default=0.01)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--ppl-max-tokens", type=int, default=8192)
    p.add_argument("--speed-new-tokens", type=int, default=32)
    p.add_argument("--speed-prompt", type=int, default=32)
    p.add_argument("--speed-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "llm_surgeon_compact.json"))
    return p.parse_args(argv)


def file_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))


def speeds(models: dict, prompts: dict, args) -> dict:
    """tokens/s of every model at each batch size, measured in alternation; best of the repeats."""
    res = {}
    for b, prompt in prompts.items():
        for m in models.values():
            decode_seconds(m, prompt, 4)
        best = {k: float("inf") for k in models}
        for _ in range(args.speed_repeats):
            for k, m in models.items():
                best[k] = min(best[k], decode_seconds(m, prompt, args.speed_new_tokens))
        res[f"b{b}"] = {k: b * args.speed_new_tokens / s for k, s in best.items()}
    return res


def markdown(res: dict) -> str:
    d = res["dense"]
    lines = ["# LLM Surgeon (structured): zeros in place vs compacted (`hf_prune.compact_zeros`)", "",
             f"Command: `{res['command']}`  ",
             f"Machine: {res['environment']['machine']['processor']}, {res['environment']['machine']['cpu_count']} "
             f"cores, torch {res['environment']['versions']['torch']}; decode: greedy, {res['config']['speed_prompt']}"
             f" prompt + {res['config']['speed_new_tokens']} new tokens, best of {res['config']['speed_repeats']}, "
             "dense / in place / compacted in alternation.", "",
             "| target | storage | params (M) | x dense | file MB | ppl | b1 tok/s (x dense) | b8 tok/s (x dense) |",
             "|---|---|---|---|---|---|---|---|",
             f"| 0 | dense | {d['parameters'] / 1e6:.2f} | 1.000 | {d['file_bytes'] / 1e6:.1f} | {d['ppl']:.2f} | - | - |"]
    for r in res["runs"]:
        for kind in ("in_place", "compacted"):
            x = r[kind]
            sp = r["speed"]
            lines.append(
                f"| {r['target']:.2f} | {kind.replace('_', ' ')} | {x['parameters'] / 1e6:.2f} | "
                f"{x['parameters'] / d['parameters']:.3f} | {x['file_bytes'] / 1e6:.1f} | {x['ppl']:.2f} | "
                f"{sp['b1'][kind]:.1f} ({sp['b1'][kind] / sp['b1']['dense']:.2f}x) | "
                f"{sp['b8'][kind]:.1f} ({sp['b8'][kind] / sp['b8']['dense']:.2f}x) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from hf_prune import compact_zeros
    from hf_prune.assets import load_smollm2
    from hf_prune.data import batches, read_texts, token_blocks
    from hf_prune.evaluate import perplexity
    from hf_prune.methods.llm_surgeon import LLMSurgeon
    from hf_prune.pipeline import run_stage

    torch.set_num_threads(args.threads)
    data = Path(args.data_dir)
    wiki = (data / "wiki_en.txt").read_text(encoding="utf-8")[: 16 * args.ppl_max_tokens]
    dense, tok = load_smollm2()
    model, _ = load_smollm2()
    dense.eval()
    blocks = token_blocks(tok, read_texts(data / "austen"), args.calib_samples, args.calib_len, seed=args.seed)
    calib = batches(blocks, args.batch_size)
    g = torch.Generator().manual_seed(args.seed)
    prompts = {b: torch.randint(100, tok.vocab_size, (b, args.speed_prompt), generator=g) for b in (1, 8)}

    def ppl(m) -> float:
        return perplexity(m, tok, wiki, window=args.window, max_tokens=args.ppl_max_tokens)["perplexity"]

    out = Path(args.out)
    res = {"command": "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]))] + sys.argv[1:]),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "environment": environment(),
           "config": vars(args),
           "dense": {"parameters": dense.num_parameters(), "file_bytes": file_bytes(dense), "ppl": ppl(dense)},
           "runs": []}
    targets = [float(x) for x in args.targets.split(",")]
    alpha = max(targets)
    method = LLMSurgeon(target=alpha, target_of="linears", shots=args.shots, mode="structured", criterion="surgeon",
                        seed=args.seed,
                        damping_g=args.damping_g, damping_a=args.damping_a)
    for stage in range(args.shots):
        run_stage(model, method, calib, stage)  # scores, the plan's weight update, surgery
        reached = (stage + 1) * alpha / args.shots
        hit = [t for t in targets if abs(t - reached) < 1e-9]
        if not hit:
            continue
        model.eval()
        packed = copy.deepcopy(model)
        t0 = time.perf_counter()
        stats = compact_zeros(packed)
        seconds = time.perf_counter() - t0
        run = {"target": hit[0], "compact_seconds": seconds, "compact": stats,
               "in_place": {"parameters": model.num_parameters(), "file_bytes": file_bytes(model), "ppl": ppl(model)},
               "compacted": {"parameters": packed.num_parameters(), "file_bytes": file_bytes(packed),
                             "ppl": ppl(packed)},
               "speed": speeds({"dense": dense, "in_place": model, "compacted": packed}, prompts, args)}
        res["runs"].append(run)
        print(json.dumps(run), flush=True)
        out.write_text(json.dumps(res, indent=2))
        out.with_suffix(".md").write_text(markdown(res))
        del packed
    return res


if __name__ == "__main__":
    main()
