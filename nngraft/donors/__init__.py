"""Donors: where F's weights come from, and what of them a graft ships.

- :mod:`nngraft.donors.donor` — the :class:`~nngraft.donors.donor.Donor` contract and donors built from a
  loaded model, a safetensors checkpoint or a dict of tensors;
- :mod:`nngraft.donors.delta` — donors as data (dense F, ΔW = F − P) and what each ships;
- :mod:`nngraft.donors.lora` — PEFT LoRA adapters (a folder, or a Hub repo) as donors;
- :mod:`nngraft.donors.shipment` — what a travelling donor ships (:class:`~nngraft.donors.shipment.Shipment`)
  and how it reads a weight as a linear map;
- :mod:`nngraft.donors.partial` — donors derived from a weight selection (a fraction of ΔW);
- :mod:`nngraft.donors.loading` — load P and F by name or path (Hugging Face folders, GGUF files);
- :mod:`nngraft.donors.names` — names that stand for a model a package provides (the study's ``smollm2``).

Example:
    >>> from nngraft.donors.donor import TensorDonor  # F given as {parameter name: tensor}
"""
