"""A Flower deployment on this machine: SuperLink + 3 SuperNodes on 127.0.0.1, TLS and node auth, one node killed.

Usage::

    python examples/flower-app/deploy_loopback.py WORKDIR [--no-kill]

Makes the certificates and node keys under WORKDIR (loopback.py, beside this file), starts the SuperLink
and three SuperNodes (partition-id 0, 1, 2), runs this app for 4 rounds of FedAvg + GMA on digits
with ``server.min_clients = 2``, SIGKILLs SuperNode 2 once it has started its ClientApp on round
2's train message, and prints each round's aggregated / lost / unreachable clients and the test
accuracy. Every process it starts is ended on exit. The automated version with assertions is
``tests/flower/test_deployment.py`` (``pytest tests/flower/test_deployment.py -m slow``).
"""

import json
import re
import sys
import time
from pathlib import Path

from loopback import LoopbackDeployment  # beside this file (the script's folder is on sys.path)

ROUND_2_AT_NODE_2 = re.compile(r"ROUND 2\][^\n]*\n[^\n]*Receiving: train message.*?Start `flwr-clientapp` process",
                               re.S)


def main(workdir: Path, kill: bool = True) -> None:
    run_dir = workdir / "run"
    run_config = (f"rounds=4 eval_every=1 data.num_clients=3 server.clients_per_round=3 server.min_clients=2 "
                  f"round-timeout=150.0 run-dir='{run_dir}'")
    with LoopbackDeployment(workdir / "deployment") as dep:
        dep.start_superlink()
        for k in range(3):
            dep.register_node(f"node{k}")
            dep.start_node(f"node{k}", node_config=f"partition-id={k} num-partitions=3")
        dep.wait_for_nodes(3)
        run_id = dep.run_app(Path(__file__).resolve().parent, run_config)
        print(f"run {run_id} started; logs in {dep.root}")
        deadline = time.monotonic() + 600
        killed = not kill
        while not (run_dir / "summary.json").is_file():
            if time.monotonic() > deadline or "Finished task" in dep.log("superlink"):
                time.sleep(1.0)
                if (run_dir / "summary.json").is_file():
                    break
                print(dep.run_log(run_id)[-4000:])
                raise SystemExit("the run did not finish")
            if not killed and ROUND_2_AT_NODE_2.search(dep.log("node2")):
                dep.kill("node2")
                killed = True
                print("SIGKILL to SuperNode 2 (partition 2) while it trains on round 2")
            time.sleep(0.2)
    for line in (run_dir / "rounds.jsonl").read_text().splitlines():
        r = json.loads(line)
        print(f"round {r['round']}: aggregated {r['aggregated']}, lost {r.get('lost', {})}, "
              f"unreachable {r.get('unreachable', [])}, {r['round_s']:.1f} s")
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"test accuracy: initial {summary['initial']['test_accuracy']:.4f}, "
          f"final {summary['final']['test_accuracy']:.4f}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]).resolve(), kill="--no-kill" not in sys.argv[2:])
