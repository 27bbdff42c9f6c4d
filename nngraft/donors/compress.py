"""A full finetune as a LoRA adapter: ``F − P`` per module, truncated by SVD, written as a PEFT folder.

A Hub LoRA donor (:class:`~nngraft.donors.delta.HubLoraDonor`) sends nothing but its id to NDIF, but
only a LoRA finetune is one. :func:`compress_donor` turns a full finetune into one, honestly: for
every 2-D weight it keeps (the linear layers of the grafted modules), ``ΔW = W_F − W_P`` is
factored ``ΔW ≈ B·A`` by truncated SVD at a chosen ``rank`` or at the smallest rank that keeps a
chosen fraction ``energy`` of ``‖ΔW‖²``, and written as a PEFT adapter folder (``adapter_config.json``
with ``lora_alpha = r`` so the scale is 1, ``rank_pattern``/``alpha_pattern`` per module,
``adapter_model.safetensors``). Nothing is pushed anywhere. The report says, per module, the
relative Frobenius error ``‖ΔW − B·A‖/‖ΔW‖`` and the energy kept, and lists what a LoRA cannot
hold at all (changed norms, biases, embeddings: dropped, with their relative change).

What the approximation costs on the study's own metric (recovery of a graft) is measured by
:func:`nngraft.study.compress_check.recovery_cost` and ``nngraft donor compress --demo-out``
(docs/remote.md has the demo's numbers).

Example:
    >>> import torch
    >>> from nngraft.testing import tiny_pair
    >>> P, F, _ = tiny_pair("llama")
    >>> import tempfile
    >>> report = compress_donor(F, P, tempfile.mkdtemp(), rank=64, modules=["model.layers.0.mlp.up_proj"])
    >>> report.modules[0].rel_error < 1e-5  # rank 64 is this small matrix's full rank
    True
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..arch import get_module, stores_weight_in_out
from ..errors import ArgumentError, DonorMismatchError
from .delta import layout_of, to_map


@dataclass
class ModuleCompression:
    """One module's ΔW and what its rank-``rank`` factors keep of it."""

    path: str
    shape: tuple[int, int]  # (out, in)
    rank: int
    full_rank: int
    rel_error: float  # ‖ΔW − B·A‖_F / ‖ΔW‖_F
    energy: float  # Σ kept σ² / Σ σ²
    norm2: float = field(default=0.0, repr=False)  # ‖ΔW‖²

    @property
    def nbytes_bf16(self) -> int:
        return self.rank * sum(self.shape) * 2


@dataclass
class CompressReport:
    """What :func:`compress_donor` wrote and what it lost."""

    out: Path
    modules: list[ModuleCompression] = field(default_factory=list)
    dropped: list[tuple[str, float]] = field(default_factory=list)  # (parameter, ‖ΔW‖/‖W_P‖) a LoRA cannot hold
    unchanged: list[str] = field(default_factory=list)  # modules with ΔW = 0 (left out)

    @property
    def worst(self) -> ModuleCompression | None:
        return max(self.modules, key=lambda m: m.rel_error, default=None)

    @property
    def total_rel_error(self) -> float:
        """‖ΔW − B·A‖/‖ΔW‖ over all compressed modules together."""
        num = sum((m.rel_error ** 2) * m.norm2 for m in self.modules)
        den = sum(m.norm2 for m in self.modules)
        return math.sqrt(num / den) if den else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "total_rel_error": self.total_rel_error,
                "modules": [{"path": m.path, "shape": list(m.shape), "rank": m.rank, "full_rank": m.full_rank,
                             "rel_error": m.rel_error, "energy": m.energy} for m in self.modules],
                "dropped": [{"parameter": n, "rel_change": c} for n, c in self.dropped],
                "unchanged": self.unchanged}


def _check_choice(rank: Any, energy: Any) -> None:
    if (rank is None) == (energy is None):
        raise ArgumentError("compress_donor: give exactly one of rank= (an integer >= 1) or energy= (a fraction "
                            f"in (0, 1]), got rank={rank!r}, energy={energy!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ArgumentError(f"compress_donor: rank: Input should be an integer >= 1, got {rank!r}")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or not 0 < energy <= 1):
        raise ArgumentError(f"compress_donor: energy: Input should be a fraction in (0, 1], got {energy!r}")


def default_modules(model: torch.nn.Module) -> list[str]:
    """Every linear layer but the LM head (what a LoRA adapter usually targets): ``nn.Linear`` and
    GPT-2's ``Conv1D`` modules."""
    from ..arch import adapter_for

    lm_head = adapter_for(model).lm_head
    return [path for path, module in model.named_modules()
            if path and path != lm_head and (isinstance(module, torch.nn.Linear) or stores_weight_in_out(module))]


def compress_donor(finetuned: torch.nn.Module, pretrained: torch.nn.Module, out: str | Path, *,
                   rank: int | None = None, energy: float | None = None, modules: Sequence[str] | None = None,
                   base_model: str | None = None, progress: Any = None) -> CompressReport:
    """Write ``F − P`` on ``modules`` (default: :func:`default_modules`) as a PEFT LoRA adapter in
    ``out`` (a new or empty folder), truncated to ``rank`` or to the smallest rank keeping
    ``energy`` of each module's ``‖ΔW‖²``. ``base_model``: recorded as ``base_model_name_or_path``
    (P's Hub id, so the adapter is checked against its base). ``progress(done, total)`` is called
    after each module. Returns the :class:`CompressReport`."""
    _check_choice(rank, energy)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ArgumentError(f"compress_donor: out: {out} exists and is not an empty folder; nngraft writes a new "
                            "adapter folder and overwrites nothing")
    if type(finetuned) is not type(pretrained) or finetuned.config.to_dict().get("hidden_size") != \
            pretrained.config.to_dict().get("hidden_size"):
        raise DonorMismatchError(f"compress_donor: F ({type(finetuned).__name__}) and P ({type(pretrained).__name__}) "
                                 "are not the same architecture and size")
    paths = list(modules) if modules is not None else default_modules(pretrained)
    report = CompressReport(out)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    conv1d = False
    for i, path in enumerate(paths):
        try:
            p_module, f_module = get_module(pretrained, path), get_module(finetuned, path)
        except AttributeError:
            raise ArgumentError(f"compress_donor: modules: {path!r} is not a module of {type(pretrained).__name__}") from None
        w_p, w_f = getattr(p_module, "weight", None), getattr(f_module, "weight", None)
        if not isinstance(w_p, torch.Tensor) or w_p.ndim != 2:
            raise ArgumentError(f"compress_donor: modules: {path!r} has no 2-D weight (a LoRA adapts linear layers)")
        layout = layout_of(p_module)
        conv1d = conv1d or stores_weight_in_out(p_module)
        delta = to_map(w_f.detach().double() - w_p.detach().double(), layout).cpu()
        norm2 = float(delta.pow(2).sum())
        if norm2 == 0:
            report.unchanged.append(path)
            continue
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        s2 = s.pow(2)
        full = int((s > s[0] * max(delta.shape) * torch.finfo(torch.float64).eps).sum())
        if rank is not None:
            k = min(rank, s.numel())
        else:
            kept = torch.cumsum(s2, 0) / s2.sum()
            k = int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype)).item()) + 1
            k = min(k, s.numel())
        energy_kept = float(s2[:k].sum() / s2.sum())
        report.modules.append(ModuleCompression(path, tuple(delta.shape), k, full,
                                                math.sqrt(max(0.0, 1 - energy_kept)), energy_kept, norm2))
        ranks[path] = k
        key = f"base_model.model.{path}"
        tensors[f"{key}.lora_B.weight"] = (u[:, :k] * s[:k]).float().contiguous()
        tensors[f"{key}.lora_A.weight"] = vh[:k].float().contiguous()
        if progress is not None:
            progress(i + 1, len(paths))
    chosen = set(paths)
    p_params = dict(pretrained.named_parameters())
    for name, f_param in finetuned.named_parameters():
        owner = name.rpartition(".")[0]
        if owner in chosen and name.endswith(".weight"):
            continue
        p_param = p_params.get(name)
        if p_param is None or p_param.shape != f_param.shape:
            continue
        change = float((f_param.detach().double() - p_param.detach().double()).norm())
        if change > 0:
            report.dropped.append((name, change / max(float(p_param.detach().double().norm()), 1e-30)))
    if not report.modules:
        raise DonorMismatchError("compress_donor: F equals P on every chosen module: there is nothing to compress")
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    top = max(ranks.values())
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": top, "lora_alpha": top,
              "target_modules": sorted(ranks), "rank_pattern": {p: k for p, k in ranks.items() if k != top},
              "alpha_pattern": {p: k for p, k in ranks.items() if k != top}, "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": conv1d, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
              "base_model_name_or_path": base_model,
              "nngraft": {"made_by": "nngraft donor compress", "rank": rank, "energy": energy,
                          "total_rel_error": report.total_rel_error}}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return report


def report_table(report: CompressReport, *, per_module: bool = True) -> Any:
    """The report as a rich table (per module when ``per_module``) plus a summary line."""
    from rich.table import Table

    table = Table(title=f"F − P as a LoRA adapter in {report.out}")
    for column in ("module", "shape (out × in)", "rank / full", "rel. Frobenius error", "energy kept"):
        table.add_column(column, justify="left" if column == "module" else "right")
    rows = report.modules if per_module else sorted(report.modules, key=lambda m: -m.rel_error)[:5]
    for m in rows:
        table.add_row(m.path, f"{m.shape[0]} × {m.shape[1]}", f"{m.rank} / {m.full_rank}", f"{m.rel_error:.3f}",
                      f"{m.energy:.3f}")
    return table
