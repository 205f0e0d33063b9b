"""A tiny stand-in with the native Sa2VA layout (vlm.model.language_model, vlm.lm_head, sam2.mask_decoder, ...)
so the generic training machinery can be tested in milliseconds, without the real model."""

from __future__ import annotations

import random

import torch
from torch import nn


class ToyLLM(nn.Module):
    def __init__(self, vocab: int = 12, hidden: int = 16):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.q_proj = nn.Linear(hidden, hidden)
        self.up_proj = nn.Linear(hidden, hidden)

    def forward(self, ids: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(ids) + extra[:, None]
        return h + self.up_proj(torch.tanh(self.q_proj(h)))


class ToyVLMBody(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_tower = nn.Linear(4, 8)
        self.multi_modal_projector = nn.Linear(8, 16)
        self.language_model = ToyLLM()


class ToyVLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = ToyVLMBody()
        self.lm_head = nn.Linear(16, 12, bias=False)


class ToySam2(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_encoder = nn.Linear(4, 8)
        self.prompt_encoder = nn.Linear(8, 8)
        self.mask_decoder = nn.Linear(8 + 8, 6)


class ToySa2VA(nn.Module):
    """Loss touches every part, and point sampling draws from torch's global RNG like the real one."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.vlm = ToyVLM()
        self.sam2 = ToySam2()
        self.text_hidden_fcs = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
        self.nan_at_call: int | None = None
        self.calls = 0

    def training_forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.calls += 1
        feats = self.vlm.model.multi_modal_projector(torch.relu(self.vlm.model.vision_tower(batch["x"])))
        hidden = self.vlm.model.language_model(batch["ids"], feats)
        ce = nn.functional.cross_entropy(self.vlm.lm_head(hidden).flatten(0, 1), batch["ids"].flatten())
        prompt = self.text_hidden_fcs(hidden[:, -1])
        image = self.sam2.vision_encoder(batch["x"])
        logits = self.sam2.mask_decoder(torch.cat([image, prompt], dim=-1))
        keep = torch.randint(0, logits.shape[1], (4,))  # "point sampling": uses the global torch RNG
        bce = nn.functional.binary_cross_entropy_with_logits(logits[:, keep], batch["y"][:, keep])
        loss = ce + bce
        if self.nan_at_call is not None and self.calls >= self.nan_at_call:
            loss = loss * float("nan")
        return {"loss": loss, "loss_ce": ce, "loss_mask": bce}


def make_samples(n: int = 10, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "x": torch.randn(4, generator=g),
            "ids": torch.randint(0, 12, (5,), generator=g),
            "y": (torch.rand(6, generator=g) > 0.5).float(),
        }
        for _ in range(n)
    ]


def make_batch(samples: list[dict[str, torch.Tensor]], rng: random.Random) -> dict[str, torch.Tensor]:
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    if rng.random() < 0.5:  # a "prompt" choice drawn from the per-batch rng
        batch["ids"] = batch["ids"].flip(1)
    return batch


def loss_fn(model: ToySa2VA, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return model.training_forward(batch)
