"""How many samples a spreading assertion needs ("users spread over the workers"), so that it
fails by chance less often than FALSE_FAILURE although the proxy spreads as it should."""

from __future__ import annotations

import math

# Worst case share of the ring one worker owns. With `minimum_ring_size: 1024` and three workers
# each owns about 1/3 of the ring; 0.5 leaves a wide margin for uneven rings.
MAX_WORKER_SHARE = 0.5
# Accepted chance that a spreading assertion fails although Envoy spreads as it should.
FALSE_FAILURE = 1e-6
DEVICES_PER_USER = 3


def samples_for_spread(max_share: float = MAX_WORKER_SHARE, p_fail: float = FALSE_FAILURE) -> int:
    """How many independently placed keys make "all on one worker" less likely than p_fail.

    P(all n on one worker) = sum_i s_i^n <= max_share^(n-1) * sum_i s_i = max_share^(n-1).
    """
    return 1 + math.ceil(math.log(p_fail) / math.log(max_share))
