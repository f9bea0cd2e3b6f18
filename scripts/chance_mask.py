"""GMA's mask when the clients' signs carry no information: the chance level a measured mask is read against.

    python scripts/chance_mask.py [--threshold 0.4] [--out docs/results/science/chance_mask.csv]

With K clients whose update signs on a coordinate are independent fair coins, the number of positive signs
is B ~ Binomial(K, 1/2) and the (unweighted) agreement is A = |2B − K| / K, which takes the values
0, 2/K, 4/K, ... (K even) or 1/K, 3/K, ... (K odd). The soft mask is m = 1 where A ≥ τ, else A
(Tenison et al., TMLR 2023). Per K this prints and writes, exactly (scipy's binomial pmf):

* ``chance_density``: E[m], the mask density a coin-flip round would show;
* ``chance_pass_rate``: P(A ≥ τ), the fraction of coordinates the threshold lets through unchanged;
* ``net_agreeing_clients``: the smallest |#positive − #negative| that reaches τ, i.e. what τ means as a
  count of clients for that K (τ = 0.4 asks for a net 4 of 10 clients but a net 40 of 100).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

from scipy.stats import binom

KS = (5, 10, 20, 50, 100)


def chance_mask(k: int, threshold: float) -> dict[str, float]:
    """Exact E[m] and P(A ≥ τ) for K = ``k`` coin-flip signs, and τ as a net count of agreeing clients."""
    density = pass_rate = 0.0
    for positives in range(k + 1):
        p = float(binom.pmf(positives, k, 0.5))
        agreement = abs(2 * positives - k) / k
        passes = agreement >= threshold
        density += p * (1.0 if passes else agreement)
        pass_rate += p * passes
    net = next(n for n in range(k % 2, k + 1, 2) if n / k >= threshold) if threshold > 0 else 0
    return {"clients_per_round": k, "threshold": threshold, "net_agreeing_clients": net,
            "chance_density": round(density, 4), "chance_pass_rate": round(pass_rate, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threshold", type=float, default=0.4)
    parser.add_argument("--out", type=Path, default=Path("docs/results/science/chance_mask.csv"))
    args = parser.parse_args(argv)
    if not (0 <= args.threshold <= 1) or math.isnan(args.threshold):
        parser.error(f"--threshold must lie in [0, 1], got {args.threshold}")
    rows = [chance_mask(k, args.threshold) for k in KS]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(", ".join(f"{k} {v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
