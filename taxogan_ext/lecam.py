"""LeCam regularization (Tseng et al., CVPR 2021) as an extra discriminator term of the engine's loss.

R_LC = mean(relu(D(x) - ema_fake)^2) + mean(relu(ema_real - D(G(z)))^2), on the logits of the images D
sees in the Dmain step (after augmentation). ema_real and ema_fake are moving averages of the batch
means of the real and fake logits. The regulariser keeps the logits attached to D's graph (only the
EMA update uses detached values): detaching them would make the term a constant and LeCam a no-op.
"""

import torch
import torch.nn.functional as F

from stylegan2ada.util import UserError

LECAM_HELP = (
    'Weights in the literature depend on the loss and on the logit scale: the LeCam-GAN paper uses 0.3 for '
    'BigGAN on CIFAR (hinge loss, spectrally normalised D: logits of order 1); its StyleGAN2-ADA scripts use 1e-6 on CIFAR-10 (32 px) '
    'and 3e-7 on FFHQ-1k (256 px), and follow-up StyleGAN2-ADA code uses 3e-7 up to 1e-2. StyleGAN2 logits are '
    'unbounded and grow with resolution, so try ~1e-4..1e-2 at low resolution down to ~1e-7 at 256 px and above.'
)


class LeCamSettingError(UserError):
    """A LeCam weight, decay or start outside its range; one line naming the setting."""


def lecam_penalty(
    real_logits,    # D's logits of real images [N, 1] (or [N])
    gen_logits,     # D's logits of generated images [M, 1] (or [M])
    ema_real,       # moving average of real logits: float or 0-dim tensor
    ema_fake,       # moving average of fake logits: float or 0-dim tensor
):
    """Unweighted LeCam regulariser: mean(relu(real - ema_fake)^2) + mean(relu(ema_real - fake)^2)."""
    return F.relu(real_logits - ema_fake).square().mean() + F.relu(ema_real - gen_logits).square().mean()


def _global_means(real_logits, gen_logits):
    """Detached batch means of real and fake logits [2], averaged over ranks when torch.distributed runs."""
    means = torch.stack([real_logits.detach().float().mean(), gen_logits.detach().float().mean()])
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # Every replica must keep the same EMAs, or the replicas' D losses (and weights) drift apart.
        torch.distributed.all_reduce(means)                            # sum over ranks
        means = means / torch.distributed.get_world_size()
    return means


class LeCamRegularizer:
    """LeCam term for StyleGAN2Loss(extra_d_terms=[...]): EMAs of the logit means, weighted regulariser, state for snapshots.

    The EMAs are updated from this step's (detached, rank-averaged) batch means first, and the
    regulariser then uses the updated EMAs, in the order of the official LeCam-GAN code. They start at
    0 with no bias correction, so in the first ~1/(1-decay) updates they are pulled towards 0: the
    anchors sit between 0 and the true means, which makes the term slightly stronger than at steady
    state (the official StyleGAN2 version debiases them instead). They keep updating before
    start_kimg, so they are warm when the term switches on. The term is called once per Dmain round,
    so with gradient accumulation (batch > batch_gpu * gpus) the EMA advances once per round.
    """

    name = 'lecam'

    def __init__(self,
        weight      = 0.0,  # multiplier of the regulariser in D's loss; 0 = off (stats still reported)
        decay       = 0.99, # EMA decay per update, in [0, 1)
        start_kimg  = 0.0,  # apply the term from this many thousand images on; EMAs update before that too
    ):
        if not weight >= 0:
            raise LeCamSettingError(f'LeCam weight must be >= 0, got {weight}')
        if not 0 <= decay < 1:
            raise LeCamSettingError(f'LeCam decay must be in [0, 1), got {decay}')
        if not start_kimg >= 0:
            raise LeCamSettingError(f'LeCam start_kimg must be >= 0, got {start_kimg}')
        self.weight = float(weight)
        self.decay = float(decay)
        self.start_kimg = float(start_kimg)
        # Kept on the logits' device (no host sync per step) and updated in place (a replayed CUDA graph writes them).
        self.ema_real = torch.zeros([], dtype=torch.float32)
        self.ema_fake = torch.zeros([], dtype=torch.float32)
        self.num_updates = torch.zeros([], dtype=torch.int64)

    def is_active(self, cur_nimg):
        """Whether the weighted term enters D's loss at this point of training."""
        return self.weight > 0 and cur_nimg >= self.start_kimg * 1000

    def graph_key(self, cur_nimg):
        """The host-side choice that changes this term's ops (whether it is active): one CUDA graph per value."""
        return f'{self.name} {"on" if self.is_active(cur_nimg) else "off"}'

    def update_ema(self, real_logits, gen_logits):
        """Move the EMAs towards this step's batch means (averaged over ranks); returns the means [2]."""
        means = _global_means(real_logits, gen_logits)
        if self.ema_real.device != means.device:                       # the first update moves the state to the device
            self.ema_real, self.ema_fake, self.num_updates = (t.to(means.device) for t in (self.ema_real, self.ema_fake, self.num_updates))
        self.ema_real.lerp_(means[0], 1 - self.decay)                  # d * ema + (1 - d) * mean
        self.ema_fake.lerp_(means[1], 1 - self.decay)
        self.num_updates.add_(1)
        return means

    def __call__(self, real_logits, gen_logits, cur_nimg):
        """Update the EMAs, then return (weighted regulariser, stats); the loss is an exact 0 when inactive."""
        self.update_ema(real_logits, gen_logits)
        ema_real = self.ema_real.to(real_logits.dtype)
        ema_fake = self.ema_fake.to(real_logits.dtype)
        if self.is_active(cur_nimg):
            penalty = lecam_penalty(real_logits, gen_logits, ema_real, ema_fake)   # attached to D's graph
            loss = penalty * self.weight
        else:
            with torch.no_grad():
                penalty = lecam_penalty(real_logits, gen_logits, ema_real, ema_fake)
            loss = torch.zeros([], device=real_logits.device, dtype=real_logits.dtype)
        stats = {
            'Loss/D/lecam': loss.detach(),                             # what is added to D's loss
            'LeCam/penalty': penalty.detach(),                         # unweighted R_LC
            'LeCam/ema_real': self.ema_real.detach().clone(),
            'LeCam/ema_fake': self.ema_fake.detach().clone(),
        }
        return loss, stats

    def state_dict(self):
        """EMAs and update count as plain numbers (saved in every snapshot)."""
        return dict(ema_real=float(self.ema_real), ema_fake=float(self.ema_fake), num_updates=int(self.num_updates))

    def load_state_dict(self, state):
        """Restore state_dict() so a resumed run continues with the saved EMAs."""
        missing = {'ema_real', 'ema_fake'} - set(state)
        if missing:
            raise KeyError(f'LeCam state lacks {sorted(missing)}')
        self.ema_real.fill_(float(state['ema_real']))
        self.ema_fake.fill_(float(state['ema_fake']))
        self.num_updates.fill_(int(state.get('num_updates', 0)))

    def __repr__(self):
        return f'LeCamRegularizer(weight={self.weight:g}, decay={self.decay:g}, start_kimg={self.start_kimg:g})'
