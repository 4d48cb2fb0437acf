"""Per-rank memory of recovery training for Llama-3.1-8B and Llama-3.1-70B under DDP and FSDP2 with 1, 2 and 8 GPUs,
and what hf-prune's sharded stage needs between two train() calls. Arithmetic only (no model is loaded):

    python benchmarks/sharded_memory_table.py          # writes benchmarks/results/sharded_memory_table.md

Assumptions (stated again in the output):
- shapes: 8B = hidden 4096, 32 layers, 32/8 heads (head_dim 128), intermediate 14336, vocab 128256; 70B = hidden
  8192, 80 layers, 64/8 heads, intermediate 28672, vocab 128256; input and output embeddings untied.
- full fine-tuning in bf16 mixed precision: fp32 master weights (4 B/param; accelerate's FSDP2 upcasts trainable
  parameters to fp32), fp32 gradients (4 B), AdamW exp_avg + exp_avg_sq in fp32 (8 B).
- LoRA r=16 on the 7 projections of every layer: frozen base in bf16 (2 B/param), adapter weights, gradients and
  AdamW states in fp32 (16 B per adapter parameter).
- DDP replicates everything; FSDP2 divides weights, gradients and optimizer state by the number of ranks and, in
  the weights column, adds the transient bf16 copies of two all-gathered decoder layers (the running one and the
  prefetched one) and the unsharded embedding + head group.
- activations per rank: one sequence of 4096 tokens per micro-batch, bf16, activation checkpointing at every decoder
  layer (the layer inputs kept, one layer recomputed at a time: 2 B x tokens x (6 hidden + 2 kv_dim + 5
  intermediate)) plus the logits of the Trainer's default loss (bf16 logits and their fp32 copy: 6 B x tokens x
  vocab). Data parallelism does not divide activations; they scale with the per-rank micro-batch.
- framework overhead (CUDA context, allocator fragmentation, NCCL buffers: typically 2-6 GiB) is not included.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

GiB = 1024**3
TOKENS = 4096
LORA_RANK = 16
GPUS = (1, 2, 8)
DEVICE_GIB = {"H100 80GB": 80 * 1e9 / GiB, "H200 141GB": 141 * 1e9 / GiB}
CALIBRATION_TOKENS = 128 * 2048  # a typical scoring set: 128 sequences of 2048 tokens


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int = 128

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        attention = h * self.heads * self.head_dim * 2 + h * kv * 2  # q, o; k, v
        return attention + 3 * h * i + 2 * h  # gate, up, down; two norms

    @property
    def outside_params(self) -> int:
        return 2 * self.vocab * self.hidden + self.hidden  # embeddings, head, final norm

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.outside_params

    @property
    def lora_params(self) -> int:
        h, kv, i, r = self.hidden, self.kv_dim, self.intermediate, LORA_RANK
        q_o = 2 * r * (h + self.heads * self.head_dim)
        k_v = 2 * r * (h + kv)
        mlp = 3 * r * (h + i)
        return self.layers * (q_o + k_v + mlp)


LLAMA_8B = Shape("Llama-3.1-8B", 4096, 32, 32, 8, 14336, 128256)
LLAMA_70B = Shape("Llama-3.1-70B", 8192, 80, 64, 8, 28672, 128256)


def activations(s: Shape, tokens: int = TOKENS) -> int:
    checkpoints = s.layers * tokens * s.hidden * 2
    one_layer = tokens * (6 * s.hidden + 2 * s.kv_dim + 5 * s.intermediate) * 2
    logits = tokens * s.vocab * 6
    return checkpoints + one_layer + logits


@dataclass
class Row:
    strategy: str
    regime: str
    gpus: int
    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def per_rank(s: Shape, strategy: str, regime: str, gpus: int) -> Row:
    """Bytes per rank (as GiB) of one training configuration."""
    shard = gpus if strategy == "FSDP2" else 1
    act = activations(s) / GiB
    if regime == "full":
        weights, grads, optim = 4 * s.params, 4 * s.params, 8 * s.params
    else:  # LoRA: frozen bf16 base; the adapter trains in fp32
        weights, grads, optim = 2 * s.params + 4 * s.lora_params, 4 * s.lora_params, 8 * s.lora_params
    weights /= shard
    grads /= shard
    optim /= shard
    if strategy == "FSDP2" and gpus > 1:  # transient all-gathered bf16 copies
        weights += 2 * (2 * s.layer_params) + 2 * s.outside_params
    return Row(strategy, regime, gpus, weights / GiB, grads / GiB, optim / GiB, act)


def fits(total: float) -> str:
    return " / ".join("yes" if total <= cap else "no" for cap in DEVICE_GIB.values())


def stage_needs(s: Shape, regime: str) -> dict[str, float]:
    """What hf-prune's sharded stage needs between two train() calls (GiB)."""
    weights = (4 if regime == "full" else 2) * s.params
    state = 8 * s.params if regime == "full" else 0  # the re-created adapter starts fresh: nothing carried
    layerwise = 2 * s.outside_params + 2 * s.layer_params + 2 * CALIBRATION_TOKENS * s.hidden * 4
    return {"host_weights": weights / GiB, "host_optimizer": state / GiB, "device_layerwise": layerwise / GiB}


def table(shapes: list[Shape]) -> str:
    lines = [
        "# Per-rank memory of recovery training: DDP vs FSDP2 (written by benchmarks/sharded_memory_table.py)",
        "",
        f"GiB per rank. Full fine-tuning: fp32 master weights, fp32 gradients, AdamW fp32 states (16 B/param). "
        f"LoRA r={LORA_RANK} on all 7 projections: frozen bf16 base, fp32 adapter. Activations: one {TOKENS}-token "
        "sequence per micro-batch, bf16, activation checkpointing per decoder layer, plus the logits of the default "
        "loss (bf16 + fp32 copy). FSDP2's weights column includes the transient bf16 copies of two all-gathered "
        "layers and the embedding/head group. Framework overhead (CUDA context, fragmentation, NCCL: 2-6 GiB) is "
        "not included. 'fits' = total <= 80 GB (H100) / 141 GB (H200).",
        "",
    ]
    for s in shapes:
        lines += [f"## {s.name} ({s.params / 1e9:.2f} B parameters; LoRA adds {s.lora_params / 1e6:.1f} M)", "",
                  "| strategy | training | GPUs | weights | gradients | optimizer state | activations | total | "
                  "fits H100 / H200 |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for regime in ("full", "lora"):
            for strategy in ("DDP", "FSDP2"):
                for g in GPUS:
                    if strategy == "FSDP2" and g == 1:
                        continue  # one rank: FSDP2 shards nothing (same as DDP's row)
                    r = per_rank(s, strategy, regime, g)
                    lines.append(f"| {strategy} | {'full fine-tune' if regime == 'full' else 'LoRA'} | {g} | "
                                 f"{r.weights:.1f} | {r.gradients:.1f} | {r.optimizer:.1f} | {r.activations:.1f} | "
                                 f"{r.total:.1f} | {fits(r.total)} |")
        lines.append("")
    lines += [
        "## Between two stages: hf-prune's sharded route (`PruneCallback` under FSDP2)",
        "",
        "The stage runs on a gathered copy in the main process's host memory; a layer-by-layer method (ShortGPT, "
        "IteRABRe, SliceGPT) keeps embeddings, head, one decoder layer (bf16) and the calibration activations "
        f"({CALIBRATION_TOKENS} tokens, two fp32 streams) on one GPU; any other method runs on the host copy. "
        "With `fsdp_cpu_ram_efficient_loading: true` only the main process holds the pruned copy.",
        "",
        "| model | training | host: full weights | host: optimizer state gathered | GPU: layer-by-layer scoring |",
        "|---|---|---:|---:|---:|",
    ]
    for s in shapes:
        for regime in ("full", "lora"):
            n = stage_needs(s, regime)
            lines.append(f"| {s.name} | {'full fine-tune (fp32 master)' if regime == 'full' else 'LoRA (bf16 base)'} "
                         f"| {n['host_weights']:.1f} | {n['host_optimizer']:.1f} | {n['device_layerwise']:.1f} |")
    lines += ["", "When the optimizer state does not fit next to the weights in the main host's free memory it is "
              "dropped (the new optimizer starts fresh) and the reason, with these sizes, is logged.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sharded_memory_table.md"))
    args = parser.parse_args()
    text = table([LLAMA_8B, LLAMA_70B])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
