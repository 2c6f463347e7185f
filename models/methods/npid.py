"""NPID (Wu, Xiong, Yu & Lin 2018): non-parametric instance discrimination against a memory bank, as
zhirongw/lemniscate.pytorch trains it.

Every training sample is its own class. A bank keeps one L2-normalised 128-d vector per sample (row i for
the sample at position i of the shard set, `Batch.indices`); a view's embedding is scored against its own
row (the positive) and K = 4096 rows drawn uniformly from the bank (the negatives), then written into its
row with momentum. `MemoryBank` holds the bank, the draw, both loss forms and the update; the pure losses
are module functions. Rotation feature decoupling (models/methods/decoupling.py) reuses all of it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.distributed import at_least_fp32, autocast_off, gather_with_grad, mean_over_ranks_, rank
from models.methods.base import Method, Progress

LOSSES = ("nce", "softmax")
NCE_EPS = 1e-7  # lemniscate's NCECriterion adds it to both posteriors' denominators


# ------------------------------------------------------------------------------------------- pure losses


def nce_loss(positive: Tensor, negatives: Tensor, z: Tensor | float, num_samples: int,
             temperature: float = 0.07) -> Tensor:
    """NPID's noise-contrastive estimation (Wu et al., eq. 5-7; lemniscate's NCECriterion). A similarity s
    gives P(i | v) = exp(s / T) / Z, the noise distribution is uniform, P_n = 1 / n, and a pair's posterior
    of coming from the data is h = P / (P + K P_n). With `positive` (B,) the similarities to the sample's
    own bank row and `negatives` (B, K) those to K noise rows:

        loss = -mean_i [ log h(positive_i) + sum_j log(1 - h(negatives_ij)) ]

    (1 - h = K P_n / (P + K P_n); 1e-7 is added to both denominators, as upstream does)."""
    with autocast_off(positive):
        noise = negatives.shape[1] / num_samples  # K * P_n
        p_data = torch.exp(at_least_fp32(positive) / temperature) / z
        p_noise = torch.exp(at_least_fp32(negatives) / temperature) / z
        log_data = torch.log(p_data / (p_data + noise + NCE_EPS))
        log_noise = torch.log(noise / (p_noise + noise + NCE_EPS))
        return -(log_data + log_noise.sum(dim=1)).mean()


def softmax_loss(positive: Tensor, negatives: Tensor, temperature: float = 0.07) -> Tensor:
    """The softmax (InfoNCE) form: -mean_i log( exp(positive_i / T) / (exp(positive_i / T) + sum_j
    exp(negatives_ij / T)) ), i.e. cross-entropy of [positive, negatives] / T with label 0."""
    with autocast_off(positive):
        logits = torch.cat([at_least_fp32(positive)[:, None], at_least_fp32(negatives)], dim=1) / temperature
        return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


def full_softmax_loss(embeddings: Tensor, bank: Tensor, indices: Tensor, temperature: float = 0.07) -> Tensor:
    """The paper's non-parametric softmax over the whole bank (eq. 2; lemniscate's LinearAverage with
    --nce-k 0): cross-entropy of (embeddings . bank^T) / T against each sample's own row."""
    with autocast_off(embeddings):
        logits = at_least_fp32(embeddings) @ bank.detach().to(torch.promote_types(embeddings.dtype, torch.float32)).t()
        return F.cross_entropy(logits / temperature, indices)


def estimate_z(positive: Tensor, negatives: Tensor, num_samples: int, temperature: float = 0.07) -> Tensor:
    """NCE's normalisation constant by Monte Carlo (Wu et al., eq. 8): Z ~ n * mean exp(s / T) over the
    batch's positive and negative similarities (lemniscate: over its first batch, then kept)."""
    with torch.no_grad(), autocast_off(positive):
        both = torch.cat([at_least_fp32(positive)[:, None], at_least_fp32(negatives)], dim=1)
        return torch.exp(both / temperature).mean() * num_samples


def momentum_update(old: Tensor, new: Tensor, momentum: float) -> Tensor:
    """The bank rows after an update, in the paper's convention (lemniscate's NCEFunction.backward):
    v <- normalise(m * v_old + (1 - m) * f), `momentum` m weighting the OLD row (m = 0.5: the plain mean)."""
    return F.normalize(momentum * old + (1 - momentum) * new, dim=1)


def sample_negatives(indices: Tensor, num_samples: int, count: int, generator: torch.Generator,
                     exclude_positive: bool = False) -> Tensor:
    """(B, count) bank rows drawn uniformly with replacement for each of `indices` (B,), int64 on their
    device. `exclude_positive`: uniformly from the other num_samples - 1 rows (a draw from [0, n - 1) moved
    up by one at or past the sample's own row); otherwise the own row can be drawn, as upstream's alias
    sampler allows. `generator` is a CPU generator: the draws are the same whatever the device (int32 on
    the host, copied over asynchronously from pinned memory)."""
    high = num_samples - 1 if exclude_positive else num_samples
    drawn = torch.randint(0, high, (indices.shape[0], count), generator=generator, dtype=torch.int32)
    if indices.device.type == "cuda":
        drawn = drawn.pin_memory().to(indices.device, non_blocking=True)
    drawn = drawn.to(indices.device).long()
    return drawn + (drawn >= indices[:, None]).long() if exclude_positive else drawn


# ------------------------------------------------------------------------------------------- the bank


class L2Normalize(nn.Module):
    """Rows to unit length, in at least float32."""

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(at_least_fp32(x), dim=1)


def batch_indices(batch, method: str) -> Tensor:
    """`batch.indices`, or a one-line error naming what the caller must do."""
    indices = getattr(batch, "indices", None)
    if indices is None:
        raise ValueError(f"{method} needs each sample's position in the training set (Batch.indices): build the "
                         f"input stack with sample_indices=True")
    return indices


class MemoryBank(nn.Module):
    """One L2-normalised `dim`-vector per training sample (`memory`, sized by `resize`), NPID's loss against
    it and its momentum update.

    `loss` (inside the training step) scores this rank's embeddings against their own rows and `num_negatives`
    rows drawn per sample (0: the softmax over the whole bank) and keeps the embeddings; `update_` (after the
    optimizer step) gathers every rank's embeddings and indices and writes them into the bank, so every rank
    holds the same bank (a replicated buffer: rank 0's copy in the checkpoint serves all).

    Randomness: the bank starts as unit vectors drawn from N(0, I) (uniform on the sphere) by a generator
    seeded with `seed`, the same on every rank; each step's negatives come from a generator seeded with
    (`seed`, step, rank): an exact resume draws the same ones, with no generator state to save, and a GPU
    run draws what a CPU run draws. `seed` None: torch's initial seed (train.py's --seed), the same on every
    rank.

    NCE's normalisation constant Z (`nce_z`, -1 until known) is estimated from the first batch's
    similarities (averaged over ranks) and kept, as the paper does; it is a buffer, so a resume restores it.
    """

    def __init__(self, dim: int, *, loss: str = "nce", num_negatives: int = 4096, temperature: float = 0.07,
                 momentum: float = 0.5, exclude_positive: bool = False, proximal: float = 0.0,
                 seed: int | None = None, method: str = "npid"):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"{method} loss={loss!r}: use one of {', '.join(LOSSES)}")
        if not isinstance(num_negatives, int) or num_negatives < 0:
            raise ValueError(f"{method} num_negatives={num_negatives!r}: give a whole number >= 0 (0: softmax over "
                             f"the whole bank)")
        if loss == "nce" and num_negatives == 0:
            raise ValueError(f"{method} num_negatives=0 (the whole bank) needs loss=softmax: NCE draws noise samples")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"{method} bank_momentum={momentum!r}: the old row's weight must be in [0, 1)")
        if not temperature > 0:
            raise ValueError(f"{method} temperature={temperature!r}: must be positive")
        if proximal < 0:
            raise ValueError(f"{method} proximal={proximal!r}: must be >= 0")
        self.method = method
        self.dim = dim
        self.loss_form = loss
        self.num_negatives = num_negatives
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.exclude_positive = bool(exclude_positive)
        self.proximal = float(proximal)
        self.seed = int(torch.initial_seed() if seed is None else seed) % (2**62)
        self.register_buffer("memory", torch.zeros(0, dim))
        self.register_buffer("nce_z", torch.tensor(-1.0))
        self._z_known = False  # nce_z > 0, on the host: reading the buffer each step would wait for the device
        self._pending: tuple[Tensor, Tensor, Tensor | None] | None = None
        self._generator = torch.Generator()

    @property
    def num_samples(self) -> int:
        return self.memory.shape[0]

    def resize(self, num_samples: int) -> None:
        """A fresh bank of `num_samples` random unit rows (the same for the same seed, on every rank)."""
        minimum = 2 if self.num_negatives and self.exclude_positive else 1
        if num_samples < minimum:
            raise ValueError(f"{self.method} needs at least {minimum} training samples for its memory bank, got "
                             f"{num_samples}")
        generator = torch.Generator().manual_seed(self.seed)
        bank = F.normalize(torch.randn(num_samples, self.dim, generator=generator), dim=1)
        self.memory = bank.to(self.memory.device)
        self.nce_z.fill_(-1.0)
        self._z_known = False
        self._pending = None

    def step_generator(self, step: int) -> torch.Generator:
        """The (CPU) generator of step `step`'s negatives on this rank, re-seeded on every call."""
        self._generator.manual_seed((self.seed * 1_000_003 + step * 7_919 + rank() * 104_729 + 4_242) % (2**63))
        return self._generator

    def similarities(self, embeddings: Tensor, indices: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """(positive (B,), negatives (B, K)) cosine similarities of unit `embeddings` (B, dim), float32+, to
        their own rows and to the step's negative rows. When the whole bank is smaller than the gathered
        rows (n < B K) one product with the bank is cheaper than B K gathered rows, and gives the same values."""
        bank = self.memory.detach()
        positive = (embeddings * bank[indices].to(embeddings.dtype)).sum(dim=1)
        drawn = sample_negatives(indices, self.num_samples, self.num_negatives,
                                 self.step_generator(step), self.exclude_positive)
        if self.num_samples < drawn.numel():
            negatives = (embeddings @ bank.to(embeddings.dtype).t()).gather(1, drawn)
        else:
            negatives = torch.einsum("bd,bkd->bk", embeddings, bank[drawn].to(embeddings.dtype))
        return positive, negatives

    def loss(self, embeddings: Tensor, indices: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, metrics) of unit `embeddings` (B, dim) of the samples at `indices` (B,) at optimizer step
        `step`; remembers them for `update_`. Metrics stay on the device (no host sync)."""
        if self.num_samples == 0:
            raise ValueError(f"{self.method}: the memory bank has no rows: call adapt_to_data(num_samples) with "
                             f"the training set's size first")
        with autocast_off(embeddings):
            f = at_least_fp32(embeddings)
            z = None
            if self.num_negatives == 0:
                loss = full_softmax_loss(f, self.memory, indices, self.temperature)
                positive = (f * self.memory.detach()[indices].to(f.dtype)).sum(dim=1)
            else:
                positive, negatives = self.similarities(f, indices, step)
                if self.loss_form == "softmax":
                    loss = softmax_loss(positive, negatives, self.temperature)
                else:
                    if self._z_known:
                        z_used = self.nce_z
                    else:  # the first batch: every rank's estimate, averaged, so all ranks keep one Z
                        z = z_used = mean_over_ranks_(estimate_z(positive, negatives, self.num_samples,
                                                                 self.temperature))
                    loss = nce_loss(positive, negatives, z_used, self.num_samples, self.temperature)
            metrics = {"positive_similarity": positive.detach().mean()}
            if self.proximal:
                # the paper's proximal term lambda * ||v_i(t) - v_i(t-1)||^2 against the sample's bank row
                proximal = (f - self.memory.detach()[indices].to(f.dtype)).pow(2).sum(dim=1).mean()
                metrics["proximal"] = proximal.detach()
                loss = loss + self.proximal * proximal
        self._pending = (f.detach(), indices.detach(), z)
        return loss, metrics

    @torch.no_grad()
    def update_(self) -> None:
        """Writes the embeddings the last `loss` kept, gathered from every rank, into their rows:
        v <- normalise(m v_old + (1 - m) f) (`momentum_update`); stores Z if that step estimated it."""
        if self._pending is None:
            return
        embeddings, indices, z = self._pending
        self._pending = None
        everyone, rows = gather_with_grad(embeddings), gather_with_grad(indices)
        self.memory[rows] = momentum_update(self.memory[rows], everyone.to(self.memory.dtype), self.momentum)
        if z is not None:
            self.nce_z.copy_(z)
            self._z_known = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        stored = state_dict.get(prefix + "memory")
        if stored is not None and self.num_samples == 0 and stored.shape[0] > 0:  # a bank not sized yet
            self.memory = torch.zeros(stored.shape, dtype=self.memory.dtype, device=self.memory.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "nce_z" in state_dict:
            self._z_known = bool(self.nce_z > 0)
        self._pending = None


# ------------------------------------------------------------------------------------------- the method


class NPID(Method):
    """The backbone, a linear 128-d embedding (L2-normalised), NCE against the memory bank (one view per
    image; `needs_sample_indices`: the loop hands it `Batch.indices`)."""

    name = "npid"
    recipe_preset = "npid"
    needs_sample_indices = True
    # the bank and Z are the same on every rank (updated from gathered embeddings; Z averaged over ranks)
    REPLICATED_BUFFERS = ("bank.memory", "bank.nce_z")
    # Wu et al.: SGD 0.03 (momentum 0.9), weight decay 5e-4, batch 256, 200 epochs (x0.1 at 120 and 160;
    # here cosine); lemniscate's main.py trains one process of batch 256 (DataParallel) with weight decay 1e-4
    paper = dict(optimizer="sgd", lr=0.03, weight_decay=5e-4, warmup_epochs=0.0, epochs=200, batch_size=256,
                 multicrop="1x224")
    # CPU: base LR 0.003 measured best of 0.001-0.12 for 2 epochs on the demo (kNN 78.30; docs/RESULTS.md)
    cpu_overrides: ClassVar[dict[str, Any]] = {"multicrop": "1x32", "epochs": 2, "batch_size": 64, "lr": 0.003}
    # loss: the paper's NCE on a GPU; on CPU the softmax form: in a 2-epoch run NCE's Z, estimated while the bank
    # is still random, is far below the normaliser once the bank holds the (correlated) embeddings, and its loss
    # and gradients blow up (docs/RESULTS.md)
    HEAD_PRESETS = {"paper": dict(out_dim=128, num_negatives=4096, loss="nce"),
                    "small": dict(out_dim=128, num_negatives=4096, loss="softmax")}

    def __init__(self, backbone: str | nn.Module | None = None, *, on_gpu: bool = True, head_preset: str | None = None,
                 out_dim: int | None = None, num_negatives: int | None = None, loss: str | None = None,
                 temperature: float = 0.07, bank_momentum: float = 0.5, exclude_positive: bool = False,
                 proximal: float = 0.0, seed: int | None = None, num_samples: int | None = None,
                 **backbone_options):
        """`loss`: nce (the paper's, and its released code's default; the "paper" preset) or softmax (InfoNCE
        over the positive and the negatives, with num_negatives=0 over the whole bank; the "small" preset). `bank_momentum` m weights the old row:
        v <- normalise(m v + (1 - m) f). `proximal`: the paper's lambda (0: off, as the released code).
        `num_samples`: size the bank now (otherwise `adapt_to_data` does)."""
        super().__init__(backbone, on_gpu=on_gpu, **backbone_options)
        sizes = self.head_sizes(head_preset, on_gpu, out_dim=out_dim, num_negatives=num_negatives, loss=loss)
        self.embedding = nn.Sequential(nn.Linear(self.feature_dim, sizes["out_dim"]), L2Normalize())
        self.bank = MemoryBank(sizes["out_dim"], loss=sizes["loss"], num_negatives=sizes["num_negatives"],
                               temperature=temperature, momentum=bank_momentum, exclude_positive=exclude_positive,
                               proximal=proximal, seed=seed, method=self.name)
        if num_samples is not None:
            self.adapt_to_data(num_samples)

    @classmethod
    def check_recipe(cls, recipe, batch_size: int) -> None:
        if len(recipe.groups) != 1 or recipe.groups[0].count != 1:
            raise ValueError(f"{cls.name} trains on one view per image; --multicrop '{recipe.multicrop}' is not "
                             f"that: use e.g. 1x224 (1x32 on CPU)")

    def adapt_to_data(self, num_samples: int) -> None:
        if self.bank.num_samples != num_samples:
            self.bank.resize(num_samples)

    def memory_bank(self) -> tuple[Tensor, nn.Module]:
        return self.bank.memory, nn.Sequential(self.backbone, self.embedding)

    def training_step(self, batch, progress: Progress):
        indices = batch_indices(batch, self.name)
        embeddings = self.embedding(self.backbone(batch.views[0]))
        loss, metrics = self.bank.loss(embeddings, indices, progress.step)
        return loss, {"loss": loss.detach(), **metrics}

    def after_step(self, progress: Progress) -> None:
        super().after_step(progress)
        self.bank.update_()
