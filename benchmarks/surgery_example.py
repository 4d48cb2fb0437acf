"""The surgery issue's real example on SmolLM2-135M: 4 layers dropped, 1 of 3 kv groups removed in two layers,
25% of MLP channels removed in five layers. Reports parameter counts, perplexity before/after and the reload check
in fresh processes (with hf_prune importable, and hidden with trust_remote_code).

    python benchmarks/surgery_example.py --eval-text ../shared/data/wiki_en.txt --max-tokens 16384
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from recipe_utils import run_info, write_json  # noqa: E402

import hf_prune  # noqa: E402
from hf_prune import PrunePlan, apply, predicted_num_parameters  # noqa: E402
from hf_prune.assets import load_smollm2  # noqa: E402
from hf_prune.data import read_texts  # noqa: E402
from hf_prune.evaluate import perplexity  # noqa: E402

CHECK = """
import sys, json, torch
if sys.argv[2] == "hide":
    import importlib.abc
    class B(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "hf_prune": raise ImportError("hidden")
    sys.meta_path.insert(0, B())
else:
    import hf_prune
from transformers import AutoModelForCausalLM
d = sys.argv[1]
m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)
ids = torch.load(d + "/ids.pt")
with torch.no_grad():
    diff = (m(ids).logits - torch.load(d + "/logits.pt")).abs().max().item()
gen = m.generate(ids, max_new_tokens=16, do_sample=False).tolist()
print("RESULT" + json.dumps({"class": type(m).__module__ + "." + type(m).__name__, "max_abs_logit_diff": diff,
                             "generate_equal": gen == torch.load(d + "/gen.pt")}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-text", default="../shared/data/wiki_en.txt", help="Evaluation text file.")
    ap.add_argument("--max-tokens", type=int, default=16384, help="Evaluation tokens (None = all).")
    ap.add_argument("--window", type=int, default=512, help="Perplexity window.")
    ap.add_argument("--out", default="benchmarks/results/surgery_example.json")
    args = ap.parse_args()

    model, tok = load_smollm2()
    text = read_texts(args.eval_text)
    res: dict = {"info": run_info(), "eval_text": args.eval_text, "window": args.window}
    res["params_before"] = sum(p.numel() for p in model.parameters())
    res["dense"] = perplexity(model, tok, text, window=args.window, max_tokens=args.max_tokens)
    plan = PrunePlan(
        drop_layers=[20, 22, 24, 26],
        kv_heads={5: [0, 2], 12: [1, 2]},
        mlp_channels={i: [c for c in range(1536) if c % 4] for i in (3, 8, 13, 18, 23)},
        provenance={"method": "manual example (surgery issue)"},
    )
    res["params_predicted"] = predicted_num_parameters(model, plan)
    t0 = time.perf_counter()
    apply(model, plan)
    res["surgery_seconds"] = time.perf_counter() - t0
    res["params_after"] = sum(p.numel() for p in model.parameters())
    res["pruned"] = perplexity(model, tok, text, window=args.window, max_tokens=args.max_tokens)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        plan.save(d)
        ids = tok("The Lord is my shepherd; I shall not want. He maketh me", return_tensors="pt").input_ids
        with torch.no_grad():
            torch.save(model(ids).logits, f"{d}/logits.pt")
        torch.save(ids, f"{d}/ids.pt")
        torch.save(model.generate(ids, max_new_tokens=16, do_sample=False).tolist(), f"{d}/gen.pt")
        res["config_model_type"] = json.loads(Path(d, "config.json").read_text())["model_type"]
        res["files"] = sorted(p.name for p in Path(d).iterdir())
        for mode in ("with_hf_prune", "hide"):
            out = subprocess.run([sys.executable, "-c", CHECK, d, mode], capture_output=True, text=True, cwd="/tmp")
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")]
            res[f"reload_{mode}"] = json.loads(line[0][6:]) if line else {"error": out.stderr[-2000:]}
    write_json(args.out, res)
    print(json.dumps({k: v for k, v in res.items() if k != "info"}, indent=2))


if __name__ == "__main__":
    main()
