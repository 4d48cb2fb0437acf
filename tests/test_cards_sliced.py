"""The card of a sliced model, end to end on a tiny config: `hf_prune.prune` with `slicegpt`, `export.save`, the card.

It must describe the model as sliced (residual widths per layer in the table and in the picture, never "every kept
layer keeps its widths") and, when `basis="auto"` chose the basis, give the choice and every candidate's held-out
perplexity from the plan's provenance."""

from __future__ import annotations

import torch
from tiny import tiny_model, tiny_tokenizer

import hf_prune
from hf_prune import cards
from hf_prune.export import ExportMetadata, ModelStats, save
from hf_prune.methods import get


def _batches(vocab: int, n: int = 4, b: int = 2, t: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(4, vocab, (b, t), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def _sliced_export(tmp_path, monkeypatch, **options):
    drawn = []
    real = cards._plot_residual
    monkeypatch.setattr(cards, "_plot_residual", lambda ax, dims, *a: (drawn.append(list(dims)), real(ax, dims, *a)))
    model = tiny_model("llama")
    meta = ExportMetadata(method="slicegpt", before=ModelStats.of(model))
    result = hf_prune.prune(model, get("slicegpt", slicing=0.25, progress=False, **options),
                            _batches(model.config.vocab_size))
    out = save(model, tiny_tokenizer(), tmp_path / "sliced", plan=result.plan, metadata=meta)
    return model, result.plan, out, (out / "README.md").read_text(), drawn


def test_card_of_an_auto_basis_slicing_gives_the_choice_and_every_candidate(tmp_path, monkeypatch):
    model, plan, out, text, drawn = _sliced_export(tmp_path, monkeypatch)
    dims = list(model.config.residual_dims)
    choice = plan.provenance["basis_choice"]

    # described as sliced, with a width per layer in the table and in the picture
    assert "keeps its widths" not in text and "The residual stream was sliced" in text
    for i in range(model.config.num_hidden_layers):
        assert f"| {i} | sliced | 64 → {dims[2 * i]} / {dims[2 * i + 1]} |" in text
    assert drawn == [dims] and (out / cards.PICTURE_FILENAME).is_file()
    assert f"![Per-layer widths before and after pruning]({cards.PICTURE_FILENAME})" in text

    # the basis choice and its evidence, one row per candidate
    chosen = choice["chosen"]
    assert f"Chosen: basis `{chosen['basis']}`, head `{chosen['head']}`." in text
    assert f"{choice['dense_held_out_ppl']:.2f}." in text and f"({choice['held_out_tokens']:,} tokens)" in text
    assert "| basis | head | held-out perplexity | parameters | seconds | |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.count("|") == 7
            and line.split("|")[1].strip() in ("global", "layer", "sublayer")]
    assert len(rows) == len(choice["candidates"]) >= 1
    rebuilt = any(c.get("rebuilt_on_all_batches") for c in choice["candidates"])
    assert ("rebuilt from every calibration batch" in text) == rebuilt
    for row, cand in zip(rows, choice["candidates"]):
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[:2] == [cand["basis"], cand["head"]]
        if cand.get("skipped"):
            assert cells[2] == "refused"
        else:
            assert cells[2] == f"{cand['held_out_ppl']:.2f}" and cells[3] == f"{cand['parameters']:,}"
        assert ("**chosen**" in cells[5]) == bool(cand.get("chosen"))
        assert (cand.get("schedule") or "") in cells[5]
    assert sum("**chosen**" in r for r in rows) == 1


def test_card_of_a_fixed_basis_slicing_has_no_choice_table(tmp_path, monkeypatch):
    model, plan, _, text, drawn = _sliced_export(tmp_path, monkeypatch, basis="global")
    assert "basis_choice" not in plan.provenance
    assert "The residual stream was sliced" in text and "keeps its widths" not in text
    assert "chosen by measurement" not in text and "held-out perplexity" not in text
    assert drawn == [list(model.config.residual_dims)]


def test_basis_choice_section_handles_composed_plans_and_refused_candidates():
    from hf_prune import PrunePlan

    evidence = {"criterion": "lowest loss", "chosen": {"basis": "layer", "head": "tied"}, "dense_held_out_ppl": 12.5,
                "held_out_tokens": 1024, "build_batches": 3, "held_out_batches": 1,
                "candidates": [{"basis": "global", "head": "tied", "skipped": "larger than dense; 2x"},
                               {"basis": "layer", "head": "tied", "held_out_ppl": 14.25, "parameters": 1000,
                                "seconds": 2.0, "chosen": True}]}
    composed = PrunePlan(provenance={"composed": True, "stages": [{"method": "slicegpt"},
                                                                   {"basis_choice": evidence}]})
    assert cards.basis_choice(composed) == evidence
    assert cards.basis_choice(PrunePlan(provenance={"method": "slicegpt"})) is None
    section = cards.basis_choice_section(evidence)
    assert section["rows"][0] == {"basis": "global", "head": "tied", "ppl": "refused", "parameters": "—",
                                  "seconds": "—", "note": "larger than dense"}
    assert section["rows"][1]["note"] == "**chosen**" and section["rows"][1]["ppl"] == "14.25"
    assert "(1,024 tokens)" in section["text"] and "12.50." in section["text"]
