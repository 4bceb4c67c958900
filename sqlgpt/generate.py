"""Sampling the next token and generating text from a trained model."""
import numpy as np

from .errors import SqlgptError


def sample(logits, rng, temperature=1.0, top_k=0, top_p=1.0, banned=()):
    """One token id from a logits row (V,): temperature 0 is greedy; top_k keeps
    the k most likely; top_p keeps the smallest set with that much probability."""
    logits = np.asarray(logits, dtype=np.float64).copy()
    logits[list(banned)] = -np.inf
    if temperature <= 0:
        return int(np.argmax(logits))
    logits /= temperature
    if 0 < top_k < logits.size:
        kth = np.partition(logits, -top_k)[-top_k]
        logits[logits < kth] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


def generate_ids(model, prompt_ids, max_tokens, temperature=1.0, top_k=0, top_p=1.0, seed=None,
                 banned=()):
    """Yield max_tokens sampled ids after prompt_ids; the context is the last
    seq_len tokens, run in eval mode."""
    if max_tokens < 0:
        raise SqlgptError("max_tokens must be >= 0")
    if temperature < 0:
        raise SqlgptError("temperature must be >= 0")
    if not 0 < top_p <= 1:
        raise SqlgptError("top_p must be in (0, 1]")
    rng = np.random.default_rng(seed)
    context = [int(i) for i in prompt_ids]
    T = model.cfg.seq_len
    for _ in range(max_tokens):
        window = np.array(context[-T:], dtype=np.int32)[None, :]
        model.forward(window)
        last = model.acts.logits[window.shape[1] - 1]
        token = sample(last, rng, temperature, top_k, top_p, banned)
        context.append(token)
        yield token
