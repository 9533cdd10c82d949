"""Seeded, CPU-friendly PyTorch training for the zoo's recipes."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def train_classifier(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int = 3, lr: float = 1e-3,
                     batch_size: int = 64, seed: int = 0, weight_decay: float = 0.0) -> nn.Module:
    """Train with Adam and cross-entropy; deterministic for a seed; returns the model in eval mode."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            optimiser.zero_grad()
            loss_fn(model(xb), yb).backward()
            optimiser.step()
    return model.eval()


def torch_predict(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Arg-max labels from a PyTorch model."""
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[i:i + batch_size])).argmax(1).numpy()
                               for i in range(0, len(x), batch_size)])
