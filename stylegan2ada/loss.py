"""StyleGAN2 loss: non-saturating logistic loss, lazy R1, path-length regularization, style mixing.

Extra discriminator terms (LeCam, ...) plug in as objects called with the real and fake logits of
each Dmain step; see `DiscriminatorTerm`.
"""

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

PHASES = ('Gmain', 'Greg', 'Gboth', 'Dmain', 'Dreg', 'Dboth')


class DiscriminatorTerm(Protocol):
    """Contract of an extra discriminator loss term (the engine's extension point)."""

    name: str

    def __call__(self, real_logits, gen_logits, cur_nimg):
        """Return (weighted 0-dim loss added to D's loss, dict of stats to report)."""

    def state_dict(self):
        """Plain state saved in snapshots."""

    def load_state_dict(self, state):
        """Restore the state saved by state_dict()."""

    def graph_key(self, cur_nimg):
        """Whatever host-side choice changes the term's ops at cur_nimg (one CUDA graph is captured per value)."""


def r1_penalty(real_logits, real_img):
    """Squared gradient norm of D's logits w.r.t. the real images, per sample: [N]."""
    grads, = torch.autograd.grad(outputs=real_logits.sum(), inputs=real_img, create_graph=True, only_inputs=True)
    return grads.square().sum(dim=[1, 2, 3])


class StyleGAN2Loss:
    """Losses of each training phase; call accumulate_gradients() once per phase and round."""

    def __init__(self,
        G,                              # generator with .mapping and .synthesis
        D,                              # discriminator D(img, c) -> logits [N, 1]
        augment_pipe        = None,     # applied to every image D sees; None = no augmentation
        r1_gamma            = 10,       # R1 weight (lazy, in Dreg)
        style_mixing_prob   = 0.9,      # probability of mixing two ws at a random layer
        pl_weight           = 2,        # path-length regularization weight; 0 = off
        pl_batch_shrink     = 2,        # path-length batch = minibatch // this
        pl_decay            = 0.01,     # decay of the tracked mean path length
        extra_d_terms       = (),       # DiscriminatorTerm objects added to D's loss in Dmain
        stats               = None,     # StatsCollector for Loss/... statistics; None = no reporting
    ):
        self.G = G
        self.D = D
        self.augment_pipe = augment_pipe
        self.r1_gamma = r1_gamma
        self.style_mixing_prob = style_mixing_prob
        self.pl_weight = pl_weight
        self.pl_batch_shrink = pl_batch_shrink
        self.pl_decay = pl_decay
        self.extra_d_terms = list(extra_d_terms)
        self.stats = stats
        self.pl_mean = torch.zeros([])
        self.last_losses = {}                                           # name -> detached tensor, for divergence checks

    # Snapshot state (the mean path length is part of the training state).
    def state_dict(self):
        """Loss state saved in snapshots."""
        return dict(pl_mean=self.pl_mean.detach().cpu().clone(),
                    extra_d_terms={term.name: term.state_dict() for term in self.extra_d_terms})

    def load_state_dict(self, state):
        """Restore state_dict()."""
        self.pl_mean.copy_(state['pl_mean'])
        for term in self.extra_d_terms:
            if term.name in state.get('extra_d_terms', {}):
                term.load_state_dict(state['extra_d_terms'][term.name])

    def graph_key(self, phase, cur_nimg):
        """Host-side choices that change a phase's ops at cur_nimg (e.g. LeCam switched on): one CUDA graph per key."""
        if phase not in ('Dmain', 'Dboth'):
            return ()                                                   # the extra terms act in D's main loss only
        missing = [type(term).__name__ for term in self.extra_d_terms if not hasattr(term, 'graph_key')]
        if missing:
            raise TypeError(f'extra discriminator terms without graph_key() cannot run in CUDA graphs: {missing}')
        return tuple(term.graph_key(cur_nimg) for term in self.extra_d_terms)

    def _store_pl_mean(self, pl_mean):
        # Moved to the device once, then updated in place: a replayed CUDA graph writes into the same tensor.
        if self.pl_mean.device != pl_mean.device:
            self.pl_mean = pl_mean.clone()
        else:
            self.pl_mean.copy_(pl_mean)

    def _report(self, name, value):
        if self.stats is not None:
            self.stats.report(name, value)
        self.last_losses[name] = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)

    def run_G(self, z, c):
        """Images and ws for latents z and labels c, with style mixing."""
        ws = self.G.mapping(z, c)                                       # [N, num_ws, w_dim]
        if self.style_mixing_prob > 0 and ws.shape[1] > 1:
            # Decided on the device (as NVIDIA does): the layers from a random cutoff on take the ws of other latents,
            # or none (cutoff = num_ws) with probability 1 - style_mixing_prob. The second mapping always runs, so
            # the work and every shape are the same each iteration and the host never reads the draw.
            num_ws = ws.shape[1]
            cutoff = torch.randint(1, num_ws, [], device=ws.device)
            cutoff = torch.where(torch.rand([], device=ws.device) < self.style_mixing_prob, cutoff, num_ws)
            mixed = self.G.mapping(torch.randn_like(z), c, skip_w_avg_update=True)
            layer = torch.arange(num_ws, device=ws.device).view(1, num_ws, 1)
            ws = torch.where(layer < cutoff, ws, mixed)
        img = self.G.synthesis(ws)
        return img, ws

    def run_D(self, img, c):
        """Logits of (augmented) images."""
        if self.augment_pipe is not None:
            img = self.augment_pipe(img)
        return self.D(img, c)

    def accumulate_gradients(self,
        phase,          # one of PHASES
        real_img,       # real images [N, C, H, W] in [-1, 1]
        real_c,         # real labels [N, c_dim]
        gen_z,          # latents [N, z_dim]
        gen_c,          # labels for generated images [N, c_dim]
        gain,           # gradient multiplier (the phase's interval, for lazy regularization)
        cur_nimg = 0,   # images shown so far (extra terms may schedule on it)
    ):
        """Compute the phase's losses and backpropagate them (gradients accumulate in .grad)."""
        if phase not in PHASES:
            raise ValueError(f'unknown phase {phase!r}')
        do_Gmain = phase in ('Gmain', 'Gboth')
        do_Dmain = phase in ('Dmain', 'Dboth')
        do_Gpl = phase in ('Greg', 'Gboth') and self.pl_weight != 0
        do_Dr1 = phase in ('Dreg', 'Dboth') and self.r1_gamma != 0

        # G: make D call generated images real.
        if do_Gmain:
            gen_img, _ = self.run_G(gen_z, gen_c)
            gen_logits = self.run_D(gen_img, gen_c)
            loss_Gmain = F.softplus(-gen_logits)                       # -log(sigmoid(gen_logits))
            self._report('Loss/scores/fake', gen_logits)
            self._report('Loss/signs/fake', gen_logits.sign())
            self._report('Loss/G/loss', loss_Gmain)
            loss_Gmain.mean().mul(gain).backward()

        # G: path-length regularization keeps the Jacobian of synthesis w.r.t. ws near-orthogonal.
        if do_Gpl:
            batch_size = max(gen_z.shape[0] // self.pl_batch_shrink, 1)
            gen_img, gen_ws = self.run_G(gen_z[:batch_size], gen_c[:batch_size])
            pl_noise = torch.randn_like(gen_img) / np.sqrt(gen_img.shape[2] * gen_img.shape[3])
            pl_grads, = torch.autograd.grad(outputs=(gen_img * pl_noise).sum(), inputs=gen_ws, create_graph=True, only_inputs=True)
            pl_lengths = pl_grads.square().sum(dim=2).mean(dim=1).sqrt()  # [N]
            pl_mean = self.pl_mean.to(pl_lengths.device).lerp(pl_lengths.mean(), self.pl_decay)
            self._store_pl_mean(pl_mean.detach())
            pl_penalty = (pl_lengths - pl_mean).square()
            loss_Gpl = pl_penalty * self.pl_weight
            self._report('Loss/pl_penalty', pl_penalty)
            self._report('Loss/G/reg', loss_Gpl)
            # The zero-weighted image term keeps every synthesis parameter in the graph (DDP-style safety).
            (gen_img[:, 0, 0, 0] * 0 + loss_Gpl).mean().mul(gain).backward()

        # D: logistic loss on fakes and reals, extra terms, and lazy R1 on reals.
        if do_Dmain or do_Dr1:
            loss = 0
            gen_logits = None
            if do_Dmain:
                with torch.no_grad():
                    gen_img, _ = self.run_G(gen_z, gen_c)                 # G frozen here; w_avg still tracks (NVIDIA)
                gen_logits = self.run_D(gen_img, gen_c)
                loss_Dgen = F.softplus(gen_logits)                     # -log(1 - sigmoid(gen_logits))
                self._report('Loss/scores/fake', gen_logits)
                self._report('Loss/signs/fake', gen_logits.sign())
                loss = loss + loss_Dgen.mean()

            real_img_tmp = real_img.detach().requires_grad_(do_Dr1)
            real_logits = self.run_D(real_img_tmp, real_c)
            if do_Dmain:
                loss_Dreal = F.softplus(-real_logits)                  # -log(sigmoid(real_logits))
                self._report('Loss/scores/real', real_logits)
                self._report('Loss/signs/real', real_logits.sign())
                self._report('Loss/D/loss', loss_Dgen + loss_Dreal)
                loss = loss + loss_Dreal.mean()
                for term in self.extra_d_terms:
                    term_loss, term_stats = term(real_logits=real_logits, gen_logits=gen_logits, cur_nimg=cur_nimg)
                    for name, value in term_stats.items():
                        self._report(name, value)
                    loss = loss + term_loss
            if do_Dr1:
                penalty = r1_penalty(real_logits, real_img_tmp)
                loss_Dr1 = penalty * (self.r1_gamma / 2)
                self._report('Loss/r1_penalty', penalty)
                self._report('Loss/D/reg', loss_Dr1)
                loss = loss + loss_Dr1.mean() + real_logits.mean() * 0
            (loss * gain).backward()
