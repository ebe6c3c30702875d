"""Log-prob and entropy exactly as TRL computes them for GRPO (trl/trainer/utils.py,
`selective_log_softmax` and `entropy_from_logits`, TRL 0.2x), copied so the comparison needs
no TRL install. Both loop over rows/chunks "to reduce peak memory", as TRL does."""

import torch
import torch.nn.functional as F


def selective_log_softmax(logits, index):
    if logits.dtype in (torch.float32, torch.float64):
        selected_logits = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
        logsumexp_values = torch.stack([torch.logsumexp(lg, dim=-1) for lg in logits])
        return selected_logits - logsumexp_values
    per_token_logps = []
    for row_logits, row_labels in zip(logits, index):
        row_logps = F.log_softmax(row_logits, dim=-1)
        per_token_logps.append(row_logps.gather(dim=-1, index=row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(per_token_logps)


def entropy_from_logits(logits, chunk_size: int = 128):
    original_shape = logits.shape[:-1]
    flat_logits = logits.reshape(-1, logits.shape[-1])
    entropies = []
    for chunk in flat_logits.split(chunk_size, dim=0):
        logps = F.log_softmax(chunk, dim=-1)
        entropies.append(-(torch.exp(logps) * logps).sum(-1))
    return torch.cat(entropies, dim=0).reshape(original_shape)


def grpo_loss(logps, old_logps, advantages, mask, eps_low=0.2, eps_high=0.28):
    """TRL's GRPO loss with loss_type="dapo" (token mean over the batch)."""
    coef_1 = torch.exp(logps - old_logps)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss1 = coef_1 * advantages.unsqueeze(1)
    per_token_loss2 = coef_2 * advantages.unsqueeze(1)
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
