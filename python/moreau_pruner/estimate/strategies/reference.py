"""The ``reference`` memory strategy: w̃ in a new tensor swapped into ``param.data``.

Each noise sample perturbs every parameter into a fresh tensor (``moreau_kernels.perturb``) and
points ``param.data`` at it; the original tensor objects are put back after the backward, so the
weights are bit-identical afterwards. Gradients accumulate in ``.grad`` and are read after the
step's backward passes. It runs every configuration (``group='structure'``, the published
``noise='torch'`` stream), at the cost of a perturbed copy and a gradient of every weight.
"""
from __future__ import annotations

import torch

import moreau_kernels as mk

from .base import State, Strategy


class Reference(Strategy):
    name = "reference"

    def prepare(self, model, named, wanted, cfg, updates):
        self.cfg = cfg
        self.states = [State(n, p, i, wanted(n)) for i, (n, p) in enumerate(named)]
        # noise='torch': one torch.randn per parameter, model.parameters() order, CPU generator
        self.gen = torch.Generator(device="cpu").manual_seed(cfg.seed) if cfg.noise == "torch" else None
        self.clean: list[torch.Tensor] = []
        return self.states

    def perturb(self, key):
        cfg = self.cfg
        self.clean = [st.param.data for st in self.states]
        for st, w in zip(self.states, self.clean):
            noise = torch.randn(w.shape, generator=self.gen).to(w.device) if self.gen is not None else None
            st.param.data = mk.perturb(w, st.delta, cfg.std, cfg.seed, key, st.index, noise=noise)

    def restore(self):
        for st, w in zip(self.states, self.clean):  # the original tensors: exact restore
            st.param.data = w
        self.clean = []
