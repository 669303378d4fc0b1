"""How many prompt tokens a step's prefill call may take: large when no row decodes, sized by
measured time while rows decode.

A step runs a prefill call and then a decode call, so running rows wait for both between two
tokens. A fixed token budget cannot serve both goals: small enough to keep the decode rows'
inter-token latency bounded, it makes a prompt take many calls, each paying the cost of
streaming the weights once (on SmolLM2 a 1-token prefill call costs ~40% of a 64-token one),
and first tokens come late. So the budget follows the clock:

- no row decodes: nobody waits on the prefill, so it takes up to `cap` tokens per call;
- rows decode: the call is sized so that its predicted time is at most `share` of the last
  decode calls' time (an exponential average), i.e. it adds at most `share` to each running
  row's inter-token gap. Prefill time is modelled as `fixed + per_token * tokens`, fitted by
  least squares with forgetting over the calls so far, so it follows the machine's load.
  A chunk is at most twice the last ones run beside decoding rows (from `floor` up): calls
  of one size alone cannot tell the fixed part from the per-token part, so a first fit
  (e.g. from one large call while nothing decoded) could badly overestimate what fits.
"""

from __future__ import annotations

_DECAY = 0.9
"""Weight kept by older prefill observations at each new one."""
_DECODE_ALPHA = 0.3
"""Weight of the newest decode call in the decode-time average."""


class StepBudget:
    """Prompt tokens (padding included) for the next prefill call."""

    def __init__(self, cap: int, share: float, floor: int) -> None:
        self.cap = cap
        self.share = share
        self.floor = min(floor, cap)
        self.decode_s: float | None = None
        self._sums = [0.0] * 5
        """Weighted sums of 1, n, n^2, seconds, n * seconds over prefill calls."""
        self._last_beside_decode = 0
        """Size of the last prefill calls run while rows decoded (halving per call)."""

    def observe_decode(self, seconds: float) -> None:
        if self.decode_s is None:
            self.decode_s = seconds
        else:
            self.decode_s += _DECODE_ALPHA * (seconds - self.decode_s)

    def observe_prefill(self, tokens: int, seconds: float, decoding: bool) -> None:
        if decoding:  # a prompt's short last chunk does not set the growth back
            self._last_beside_decode = max(tokens, self._last_beside_decode // 2)
        s = self._sums
        for i, value in enumerate((1.0, tokens, tokens * tokens, seconds, tokens * seconds)):
            s[i] = _DECAY * s[i] + value

    def model(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per token) of a prefill call, or None before any call."""
        w, n, nn, t, nt = self._sums
        if w == 0.0 or n == 0.0:
            return None
        det = w * nn - n * n
        if det > 1e-9 * w * nn:
            per_token = (w * nt - n * t) / det
            fixed = (t - per_token * n) / w
            if per_token > 0.0 and fixed >= 0.0:
                return fixed, per_token
        return 0.0, t / n  # one call size so far, or a fit that makes no sense: no fixed part

    def tokens(self, decoding: bool) -> int:
        """The next prefill call's token budget."""
        if not decoding:
            return self.cap
        fit = self.model()
        if fit is None or self.decode_s is None:
            return self.floor
        fixed, per_token = fit
        room = self.share * self.decode_s - fixed
        grown = max(self.floor, 2 * self._last_beside_decode)
        return max(self.floor, min(self.cap, grown, int(room / per_token)))
