"""How far a request drafts while it shares its passes with other requests (continuous batching).

Alone, a request drafts what its window policy says. In a batch pass of B sessions its w
drafts add w rows to a pass that every session waits for, and the draft model's w steps
run on stage 0 before the pass. The pass's tokens per second, with this request drafting w:

    value(w)  = (B − 1 + tokens(w)) / (V(n + w) + c·w)
    tokens(w) = 1 + α + α² + … + α^w

with α the request's accept rate so far (pulled towards one half until it has drafted),
n = B rows (one per session) and V(n) = a + b·n fitted to the scheduler's recent passes by
their rows (window_cost.fit_pass_cost), c the draft's seconds per token. The request drafts
the w ≤ its policy's window with the best value; at 0 it decodes plainly for that step.
Alone (B = 1) the policy's window stands. So speculation yields as the batch grows, the
sooner the cheaper a row is next to a pass (a GPU, a CPU with f32 weights) and the lower
the accept rate.
"""

from __future__ import annotations

from collections.abc import Callable

from .window_cost import fit_pass_cost

PRIOR_DRAFTS = 2.0  # pseudo-drafts at an accept rate of one half, before a request has measured its own


def accept_estimate(drafted: int, accepted: int) -> float:
    """The request's accept rate so far, pulled towards one half while it has drafted little."""
    return (accepted + PRIOR_DRAFTS / 2) / (drafted + PRIOR_DRAFTS)


def batch_window(window: int, accept_rate: float, sessions: int, samples: list[tuple[int, float]],
                 draft_s_per_token: float) -> int:
    """The window worth drafting in a pass shared by `sessions` (the formula above)."""
    cost = fit_pass_cost(samples)
    if window <= 0 or sessions <= 1 or cost is None:
        return window
    best, best_value = 0, 0.0
    for w in range(window + 1):
        tokens = sum(accept_rate ** i for i in range(w + 1))
        value = (sessions - 1 + tokens) / (cost(sessions + w) + draft_s_per_token * w)
        if value > best_value * (1 + 1e-9):
            best, best_value = w, value
    return best


def window_cap(sessions: Callable[[], int], samples: Callable[[], list[tuple[int, float]]],
               draft_s_per_token: Callable[[], float | None]) -> Callable[[int, float], int]:
    """A decode loop's `window_cap` over a scheduler's live load."""
    def cap(window: int, accept_rate: float) -> int:
        return batch_window(window, accept_rate, sessions(), samples(), draft_s_per_token() or 0.0)
    return cap
